"""The `asr` task's splits and batches."""

from __future__ import annotations

import random
from dataclasses import dataclass

from trainer_core.errors import TrainerError
from trainer_core.manifest import Clip

from .asr_args import ASRArguments


@dataclass
class Splits:
    train: list[Clip]
    validation: list[Clip]
    test: list[Clip]
    eval_split: str
    notes: list[str]


def make_splits(utts: list[Clip], args: ASRArguments) -> Splits:
    """Given splits are kept; unassigned rows are shuffled with the seed and divided.

    A test split is carved out only when the train CSV's split column assigns nothing (a user who
    assigns only train/validation has chosen to have no test split; metrics are then reported on
    validation and metrics.json says so)."""
    rng = random.Random(args.seed)
    notes: list[str] = []
    train = [u for u in utts if u.split == "train"]
    validation = [u for u in utts if u.split == "validation"]
    test = [u for u in utts if u.split == "test"]
    pool = [u for u in utts if u.split == ""]
    rng.shuffle(pool)
    assigns = any(u.split for u in utts if u.source == "train")

    if not test and not assigns and args.test_fraction > 0:
        n = max(1, round(args.test_fraction * len(pool)))
        if len(pool) - n < 2:
            raise TrainerError(f"Only {len(utts)} transcribed clips: too few to hold out a test split and still train "
                               "and validate. Add recordings, or give a split column.")
        test, pool = pool[:n], pool[n:]
        notes.append(f"test split: {args.test_fraction:.0%} of the rows, chosen at random with seed {args.seed}")
    if not validation:
        source = pool if pool else train
        n = max(1, round(args.validation_fraction * len(source)))
        if len(source) - n < 1:
            raise TrainerError("Too few training clips to hold out a validation split; add recordings or give a split column.")
        if source is train:
            rng.shuffle(train)
            validation, train = train[:n], train[n:]
            notes.append(f"no validation rows given: {args.validation_fraction:.0%} of the train rows (seed {args.seed})")
        else:
            validation, pool = pool[:n], pool[n:]
            notes.append(f"validation split: {args.validation_fraction:.0%} of the unassigned rows (seed {args.seed})")
    train = train + pool
    if not train:
        raise TrainerError("The training split is empty: every row was assigned to validation or test.")
    eval_split = "test"
    if not test:
        eval_split = "validation"
        notes.append("no test split: the reported metrics are on the validation split, which also chose the best epoch")
    return Splits(train, validation, test, eval_split, notes)
