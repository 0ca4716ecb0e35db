"""Whether the built-in audio-classification trainers can divide a data set into train,
validation and test splits, decided from its counts alone, so the API refuses at submission
(a 422 naming the class and its first row) what the trainer would refuse minutes later.

The rule is the trainers' own (trainer_images/audio/audio_trainer/data.py `make_splits`, used
by the CNN and the Hugging Face trainers), replayed on counts: rows keep the split their CSV
gives them; when the CSV assigns no row at all, a test split of round(test_fraction * n) (at
least 1) clips of every class is held out, leaving at least 2; then, when no row is
validation, round(validation_fraction * n) (at least 1) of every class's unassigned rows (or,
with none unassigned, of its train rows) are held out, leaving at least 1. The training split
then needs two classes, and every class of validation and test must occur in training.
tests/trainer/test_split_rule.py checks this module against `make_splits` itself.
"""

from collections import Counter

# The trainers' defaults (audio_trainer/args.py and hf_audio/args.py; the test above checks them).
VALIDATION_FRACTION = 0.15
TEST_FRACTION = 0.15


class _Unsplittable(Exception):
    def __init__(self, label: str, why: str):
        super().__init__(why)
        self.label, self.why = label, why


def _take(counts: Counter, fraction: float, keep_min: int, purpose: str) -> tuple[Counter, Counter]:
    """`_stratified_take` on counts: (kept, taken) per class."""
    kept, taken = Counter(), Counter()
    for label in sorted(counts):
        n = counts[label]
        n_take = max(1, round(fraction * n))
        if n - n_take < keep_min:
            raise _Unsplittable(label, f"class {label!r} has {n} clip(s) to split; at least {n_take + keep_min} are needed "
                                       f"to hold out a {purpose} split: add recordings of {label!r}, or give the CSV a split column")
        kept[label], taken[label] = n - n_take, n_take
    return kept, taken


def split_refusal(by_split: dict[str, dict[str, int]], validation_fraction: float = VALIDATION_FRACTION,
                  test_fraction: float = TEST_FRACTION) -> tuple[str, str] | None:
    """`by_split`: clips per class for each split of the CSV ('train', 'validation', 'test', and
    '' for rows it leaves unassigned). Returns (class, why) for the first class the trainer
    could not split, or None when it can."""
    train, validation, test = (+Counter(by_split.get(s, {})) for s in ("train", "validation", "test"))  # + drops zeros
    pool = +Counter(by_split.get("", {}))
    assigns = any(sum(by_split.get(s, {}).values()) for s in ("train", "validation", "test"))
    try:
        if not test and not assigns and test_fraction > 0:
            pool, test = _take(pool, test_fraction, 2, "test")
            pool = +pool
        if not validation:
            if pool:
                pool, validation = _take(pool, validation_fraction, 1, "validation")
            else:
                train, validation = _take(+train, validation_fraction, 1, "validation")
    except _Unsplittable as err:
        return err.label, err.why
    train = +(train + pool)
    if len(train) < 2:
        return next(iter(train), ""), f"the training split would have {len(train)} class(es) {sorted(train)}; at least two are needed"
    for name, part in (("validation", validation), ("test", test)):
        unknown = sorted(set(+part) - set(train))
        if unknown:
            return unknown[0], f"class {unknown[0]!r} is in the {name} split but never in the training split; the model cannot learn it"
    return None
