"""jobs/splits.py (the API's refusal at submission) and the trainers' `make_splits` agree: on
every small data set below, the API refuses exactly those the trainer would refuse, naming the
same class. The trainer's code runs in its own environment (.venv-trainer), on clips made from
the same counts; the defaults of both trainers' arguments are the module's. And a test split the
trainer accepts but that is too small to trust is said so in its notes (metrics.json, model card)."""

import itertools
import json
import os
import subprocess
from collections import Counter
from pathlib import Path

from jobs import splits

ROOT = Path(__file__).resolve().parents[2]
TRAINER_PYTHON = Path(os.environ.get("RETRAIN_TRAINER_PYTHON", ROOT / ".venv-trainer" / "bin" / "python"))

TRAINER_SIDE = """
import json, sys
sys.path[:0] = [sys.argv[1]]
from audio_trainer.args import TrainingArguments
from audio_trainer.data import make_splits
from trainer_core.manifest import Clip
from trainer_core.errors import TrainerError
from hf_audio.args import FineTuningArguments
cases = json.load(sys.stdin)
answers, notes = [], None
for by_split, fv, ft in cases:
    clips = [Clip(f"{label}{split}{i}.wav", split, 2 + i, "train", label=label)
             for split, counts in by_split.items() for label, n in counts.items() for i in range(n)]
    try:
        made = make_splits(clips, fv, ft, seed=0)
        answers.append(None)
        if notes is None and len(made.test) == 2:
            notes = made.notes
    except TrainerError as err:
        answers.append(str(err))
defaults = [(TrainingArguments.validation_fraction, TrainingArguments.test_fraction),
            (FineTuningArguments.validation_fraction, FineTuningArguments.test_fraction)]
print(json.dumps({"answers": answers, "defaults": defaults, "notes_of_a_tiny_test_split": notes}))
"""


def cases() -> list:
    out = []
    for a, b in itertools.product(range(0, 8), range(1, 8)):  # two classes, no split column
        out.append(({"": {"yes": a, "no": b}}, splits.VALIDATION_FRACTION, splits.TEST_FRACTION))
        out.append(({"": {"yes": a, "no": b}}, 0.3, 0.0))
    for train, validation, unassigned in itertools.product(range(0, 4), range(0, 3), range(0, 4)):  # a split column
        out.append(({"train": {"yes": train, "no": 3}, "validation": {"yes": validation}, "": {"yes": unassigned}},
                    splits.VALIDATION_FRACTION, splits.TEST_FRACTION))
    out.append(({"train": {"yes": 5, "no": 5}, "test": {"maybe": 2}}, 0.15, 0.15))  # a class only in test
    return out


def test_the_api_refuses_what_the_trainer_would():
    all_cases = cases()
    run = subprocess.run([str(TRAINER_PYTHON), "-c", TRAINER_SIDE, str(ROOT / "trainer_images" / "audio")],
                         input=json.dumps(all_cases), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    trainer = json.loads(run.stdout)
    assert trainer["defaults"] == [[splits.VALIDATION_FRACTION, splits.TEST_FRACTION]] * 2
    refused = 0
    for (by_split, fv, ft), trainer_says in zip(all_cases, trainer["answers"]):
        api_says = splits.split_refusal({s: Counter(c) for s, c in by_split.items()}, fv, ft)
        assert (api_says is None) == (trainer_says is None), (by_split, fv, ft, api_says, trainer_says)
        if api_says is not None:
            refused += 1
            assert repr(api_says[0]) in trainer_says or api_says[0] in trainer_says, (by_split, api_says, trainer_says)
    assert 10 < refused < len(all_cases) - 10  # both kinds of answer were tried
    # A data set the trainer accepts with a test split of two clips: its card says not to trust it.
    assert any("test split has only 2 clip(s)" in note and "±0.69" in note for note in trainer["notes_of_a_tiny_test_split"])
