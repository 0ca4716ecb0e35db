"""Data: assign the clips (trainer_core.manifest, decoded once into memory by
trainer_core.audio) to train/validation/test.

Data sets for this trainer are small enough (minutes to a few hours of audio) that decoding once
and keeping float32 waveforms in RAM is both simpler and much faster than decoding per epoch.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from trainer_core.errors import TrainerError
from trainer_core.manifest import Clip


@dataclass
class Splits:
    train: list[Clip]
    validation: list[Clip]
    test: list[Clip]
    labels: list[str]
    eval_split: str  # the split the reported metrics come from
    notes: list[str] = field(default_factory=list)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


def _stratified_take(clips: list[Clip], fraction: float, rng: random.Random, purpose: str, keep_min: int) -> tuple[list[Clip], list[Clip]]:
    """Move round(fraction * n) (at least 1) clips of every label out; at least `keep_min` stay."""
    by_label: dict[str, list[Clip]] = defaultdict(list)
    for c in clips:
        by_label[c.label].append(c)
    kept, taken = [], []
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        n_take = max(1, round(fraction * len(group)))
        if len(group) - n_take < keep_min:
            rows = ", ".join(str(c.row) for c in sorted(group, key=lambda c: c.row)[:10])
            raise TrainerError(
                f"Label {label!r} has only {len(group)} example(s) left to split (CSV lines {rows}); at least "
                f"{n_take + keep_min} are needed to hold out a {purpose} split. Add recordings of {label!r}, "
                "or give a split column."
            )
        taken += group[:n_take]
        kept += group[n_take:]
    return kept, taken


# Below this many clips, the split the metrics are reported on is too small to trust (the 95%
# interval of an accuracy near 0.5 is wider than ±0.1); the model card and metrics.json say so.
SMALL_EVALUATION_SPLIT = 100


def make_splits(clips: list[Clip], validation_fraction: float, test_fraction: float, seed: int,
                base_labels: list[str] | None = None) -> Splits:
    """Honour given splits; divide the unassigned rows, stratified by label with a fixed seed.

    - rows of the validation channel are validation;
    - rows whose `split` column says train/validation/test stay there;
    - unassigned rows fill whatever is missing: a validation split when none is given, and a test
      split when none is given and the train CSV's split column assigns nothing (a user who assigns only
      train/validation has chosen to have no test split: metrics are then reported on validation,
      and metrics.json says so).
    """
    rng = random.Random(seed)
    notes: list[str] = []
    train = [c for c in clips if c.split == "train"]
    validation = [c for c in clips if c.split == "validation"]
    test = [c for c in clips if c.split == "test"]
    unassigned = [c for c in clips if c.split == ""]
    # Did the train CSV's own split column assign anything? (A validation channel alone does not
    # mean the user gave up on a test split.)
    train_csv_assigns = any(c.split for c in clips if c.source == "train")

    pool = unassigned
    if not test and not train_csv_assigns and test_fraction > 0:
        pool, test = _stratified_take(pool, test_fraction, rng, "test", keep_min=2)
        notes.append(f"test split: stratified {test_fraction:.0%} of the data (seed {seed})")
    if not validation:
        if pool:
            pool, validation = _stratified_take(pool, validation_fraction, rng, "validation", keep_min=1)
            notes.append(f"validation split: stratified {validation_fraction:.0%} of the unassigned rows (seed {seed})")
        else:
            train, validation = _stratified_take(train, validation_fraction, rng, "validation", keep_min=1)
            notes.append(f"no validation rows given: stratified {validation_fraction:.0%} of the train rows (seed {seed})")
    train = train + pool

    eval_split = "test"
    if not test:
        eval_split = "validation"
        notes.append("no test split: the reported metrics are on the validation split, which also chose the best epoch")
    evaluated = len(test or validation)
    if evaluated < SMALL_EVALUATION_SPLIT:
        notes.append(f"the {eval_split} split has only {evaluated} clip(s): an accuracy measured on it is uncertain by up to "
                     f"±{0.98 / math.sqrt(evaluated):.2f} (95% interval); do not trust it, or small differences between models")

    train_labels = Counter(c.label for c in train)
    if len(train_labels) < 2:
        raise TrainerError(f"The training split has {len(train_labels)} label(s) {sorted(train_labels)}; at least two are needed.")
    for name, part in (("validation", validation), ("test", test)):
        unknown = sorted({c.label for c in part} - set(train_labels))
        if unknown:
            example = next(c for c in part if c.label in unknown)
            raise TrainerError(
                f"Label(s) {unknown} occur in the {name} split but never in the training split "
                f"(e.g. {example.source}/dataset.csv line {example.row}); the model cannot learn them."
            )

    # Logit order: a base model's labels keep their positions, new labels follow in sorted order.
    base_labels = [lab for lab in (base_labels or []) if lab in train_labels]
    labels = base_labels + sorted(set(train_labels) - set(base_labels))
    return Splits(train, validation, test, labels, eval_split, notes)
