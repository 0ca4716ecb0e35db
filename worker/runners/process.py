"""The process runner: the trainer entrypoint as a subprocess on this host (local mode).

For a laptop, CI and a single GPU box without Docker. The trainer dies with the worker
(PR_SET_PDEATHSIG), so a killed worker never leaves a training run behind.
"""

import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from worker.runners.base import Outcome, RunRequest, RunResult, failure_reason

PR_SET_PDEATHSIG = 1
GRACE_S = 10  # between SIGTERM and SIGKILL


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class ProcessRunner:
    def __init__(self, python: str, trainer_dir: Path):
        self.python = str(Path(python).absolute()) if "/" in python else python
        self.trainer_dir = Path(trainer_dir).absolute()

    def image_for(self, request: RunRequest) -> str | None:
        return None

    def run(self, request: RunRequest, on_line: Callable[[str], None], cancel: threading.Event) -> RunResult:
        if request.image:
            return RunResult(Outcome.failed, None, f"this worker runs built-in trainers as processes; a job naming the image "
                             f"{request.image!r} needs a worker with RETRAIN_RUNNER=docker")
        entrypoint = self.trainer_dir / request.trainer / "train"
        if not entrypoint.is_file():
            return RunResult(Outcome.failed, None, f"no trainer {request.trainer!r} at {entrypoint}")
        workspace = request.workspace
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "CUDA_VISIBLE_DEVICES": ",".join(request.gpus),
            **workspace.sm_env(workspace.root.absolute(), num_gpus=len(request.gpus)),
            **request.env,
        }
        process = subprocess.Popen(
            [self.python, str(entrypoint), "train"], cwd=workspace.root, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1,
            start_new_session=True, preexec_fn=_die_with_parent,
        )
        reader = threading.Thread(target=lambda: [on_line(line.rstrip("\n")) for line in process.stdout], daemon=True)
        reader.start()

        deadline = time.monotonic() + request.deadline_s
        stopped_for = None
        while process.poll() is None:
            if stopped_for is None and cancel.is_set():
                stopped_for = Outcome.cancelled
            elif stopped_for is None and time.monotonic() > deadline:
                stopped_for = Outcome.timeout
            if stopped_for is not None:
                self._stop(process)
                break
            time.sleep(0.2)
        code = process.wait()
        reader.join(timeout=10)

        if stopped_for == Outcome.cancelled:
            return RunResult(Outcome.cancelled, code, "cancelled")
        if stopped_for == Outcome.timeout:
            return RunResult(Outcome.timeout, code, f"timeout: still running after the {request.deadline_s} s deadline")
        if code == 0:
            return RunResult(Outcome.succeeded, 0)
        return RunResult(Outcome.failed, code, failure_reason(workspace, f"trainer exited with code {code}"))

    @staticmethod
    def _stop(process: subprocess.Popen) -> None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
