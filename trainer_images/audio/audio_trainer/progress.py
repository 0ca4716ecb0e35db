"""What the worker reads: one JSON object per stdout line for progress, anything else is a log line.

Progress goes to stdout and is flushed at once, so the worker relays it while training runs.
Log lines go to stderr, so they can never be mistaken for progress.
"""

from __future__ import annotations

import contextlib
import json
import math
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
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()
