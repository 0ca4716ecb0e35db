"""What the worker reads (trainer_images/CONTRACT.md, "Progress"): a progress record is the line
`retrain-progress <RETRAIN_PROGRESS_TOKEN> <json object>`; anything else is a log line.

The token is a secret the worker makes for each run, so no text this trainer prints (a label, a
file name, a hyperparameter name from the user) can pass for progress. Without the variable (the
trainer run by hand, or on SageMaker) the record is printed as a bare JSON line, for a reader of
the output. Progress goes to stdout and is flushed at once, so the worker relays it while
training runs; log lines go to stderr.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time

_START = time.monotonic()
_PHASE: str | None = None  # set while an extra run (a learning-curve subset) trains


@contextlib.contextmanager
def phase(name: str):
    """Label the log lines (prefix) and progress lines (`"phase"` key) of an extra run."""
    global _PHASE
    previous, _PHASE = _PHASE, name
    try:
        yield
    finally:
        _PHASE = previous


def log(message: str) -> None:
    label = f"[{_PHASE}] " if _PHASE else ""
    print(f"[audio-trainer {time.monotonic() - _START:7.1f}s] {label}{message}", file=sys.stderr, flush=True)


def _clean(value):
    # JSON has no NaN/inf; a diverged loss is reported as null rather than breaking the line.
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    return value


def emit_progress(epoch: int, epochs: int, step: int, metrics: dict[str, float]) -> None:
    line = {"epoch": epoch, "epochs": epochs, "step": step, "metrics": {k: _clean(v) for k, v in metrics.items()}}
    if _PHASE:
        line["phase"] = _PHASE
    sys.stdout.write(progress_line(line) + "\n")
    sys.stdout.flush()


def progress_line(record: dict) -> str:
    """The record as the contract's progress line (one line: JSON never holds a raw newline)."""
    text = json.dumps(record, allow_nan=False, separators=(", ", ": "))
    token = os.environ.get("RETRAIN_PROGRESS_TOKEN")
    return f"retrain-progress {token} {text}" if token else text
