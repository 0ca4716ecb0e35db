"""The container contract's ending, in one place for every method of the audio image: a run
either returns 0 or writes a one-paragraph reason to `$SM_OUTPUT_DIR/failure` and returns 1
(trainer_images/CONTRACT.md).

SIGTERM (the worker cancels the job, or its deadline passed) raises `Terminated` in the main
thread. It is a BaseException, like KeyboardInterrupt, so the `except Exception` blocks of the
libraries a trainer is inside at that moment (an import of torch, a decoder's fallback) cannot
swallow it. Should anything swallow it anyway (a bare `except:` inside an import), the run is
ended from a watchdog thread SWALLOWED_GRACE_S later, with the same reason, and a run that returns
after a SIGTERM still ends as terminated, never as a success.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

from .args import Paths
from .errors import TrainerError
from .progress import log


class Terminated(BaseException):
    """SIGTERM arrived: stop now; checkpoints already written stay for a rerun."""


SWALLOWED_GRACE_S = 3.0  # well inside the runners' SIGTERM-to-SIGKILL grace (5 s in Docker)
_terminated = False
_output_dir = Path("/opt/ml/output")


def _terminated_reason(what: str) -> str:
    return (f"The {what} was stopped by SIGTERM (cancelled or past its deadline). Checkpoints are kept, so a "
            "rerun of this job resumes from the last one.")


def _on_sigterm(what: str):
    def handler(signum, frame):
        global _terminated
        if not _terminated:
            _terminated = True
            watchdog = threading.Timer(SWALLOWED_GRACE_S, _end_swallowed, (what,))
            watchdog.daemon = True
            watchdog.start()
        raise Terminated()
    return handler


def _end_swallowed(what: str) -> None:
    """The Terminated exception was caught by the code it landed in and the run went on: end it."""
    reason = _terminated_reason(what)
    log(f"FAILED (SIGTERM was swallowed; ending the run): {reason}")
    write_failure(_output_dir, reason)
    os._exit(1)


def write_failure(output_dir: Path, reason: str) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "failure").write_text(reason.strip() + "\n")
    except OSError as e:
        log(f"could not write the failure file: {e}")


def run_main(job: Callable[[Paths], object], what: str, memory_hint: str = "use a smaller batch_size") -> int:
    """Run `job(paths)` under the contract: 0 when it returned, else 1 with the reason written."""
    global _output_dir
    output_dir = _output_dir = Path(os.environ.get("SM_OUTPUT_DIR") or "/opt/ml/output")
    signal.signal(signal.SIGTERM, _on_sigterm(what))
    try:
        paths = Paths.from_env()
        output_dir = _output_dir = paths.output_dir
        job(paths)
        if _terminated:  # a library swallowed the Terminated exception
            raise Terminated()
        return 0
    except TrainerError as e:
        reason = str(e)
    except Terminated:
        reason = _terminated_reason(what)
    except MemoryError:
        reason = f"The {what} ran out of memory; {memory_hint} or a machine with more memory."
    except Exception as e:  # noqa: BLE001 - an unexpected error still gets a reason, and its traceback in the log
        traceback.print_exc(file=sys.stderr)
        reason = f"Unexpected error in the {what}: {type(e).__name__}: {e}. See the job's log lines for the traceback."
        if "out of memory" in str(e).lower():
            reason = f"The GPU ran out of memory ({e}); {memory_hint}."
    log(f"FAILED: {reason}")
    write_failure(output_dir, reason)
    return 1
