"""The process runner: the trainer entrypoint as a subprocess on this host (local mode).

FOR TRUSTED LOCAL USE ONLY: a laptop, CI, a single GPU box running its own built-in trainers.
The trainer runs as the worker's own user, on the host's file system and network: nothing but
a few resource limits stands between it and the host. It can read whatever the worker can read
and write wherever the worker can write. A shared service, or any job whose trainer or data you
do not trust, belongs on the docker runner (RETRAIN_RUNNER=docker: no network, non-root, read-only
root, cgroup limits).

What it does bound, with setrlimit in the child before `exec` (inherited by the trainer's own
children, each of which gets the same limits):
- RLIMIT_AS: address space = the job's memory limit (spec.resources.memory_mb, else the worker's
  cap, Settings.job_max_memory_mb = half the host's RAM when unset), so one job cannot take the
  machine's memory and freeze Kafka, MinIO and the API on it. Not set when the job has GPUs
  (CUDA reserves far more address space than it uses); a warning says so.
- RLIMIT_CPU: CPU seconds = deadline x CPUs (+ a minute), a backstop for the deadline;
- RLIMIT_FSIZE: no single file larger than Settings.process_max_file_mb;
- RLIMIT_NPROC: at most `pids` more processes/threads than the user has now (not enforced for root);
- RLIMIT_CORE: no core dumps.
The trainer dies with the worker (PR_SET_PDEATHSIG), so a killed worker never leaves a training
run behind.
"""

import ctypes
import logging
import os
import resource
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from worker.runners.base import (
    Outcome,
    ResourceCaps,
    ResourceLimits,
    ResourcesRefused,
    RunRequest,
    RunResult,
    apply_caps,
    cpu_count_for,
    failure_reason,
    fd_chunks,
    relay_lines,
)

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
GRACE_S = 10  # between SIGTERM and SIGKILL
DEFAULT_PIDS = 4096


class ProcessRunner:
    """See the module docstring: trusted local use only."""

    def __init__(self, python: str, trainer_dir: Path, *, caps: ResourceCaps | None = None,
                 default_limits: ResourceLimits | None = None, max_file_bytes: int | None = None):
        """`caps`: the most a job may ask for (default: from the settings, Settings.job_max_*);
        unset limits of a job become these caps. `max_file_bytes`: RLIMIT_FSIZE (default:
        Settings.process_max_file_mb)."""
        self.python = str(Path(python).absolute()) if "/" in python else python
        self.trainer_dir = Path(trainer_dir).absolute()
        if caps is None or max_file_bytes is None:
            from jobs.settings import get_settings

            settings = get_settings()
            caps = caps or ResourceCaps.from_settings(settings)
            max_file_bytes = max_file_bytes or settings.process_max_file_mb * 1024**2
        self.caps = caps
        self.default_limits = default_limits or ResourceLimits(memory_bytes=None, cpus=None, pids=DEFAULT_PIDS,
                                                               shm_bytes=None)
        self.max_file_bytes = max_file_bytes
        log.warning(
            "PROCESS RUNNER: trainers run as this worker's user (%s) on this host, with only rlimits "
            "(memory %s MiB, file size %d MiB) between them and it. For trusted local use only; use "
            "RETRAIN_RUNNER=docker for anything else.",
            _user(), caps.memory_bytes // 2**20 if caps.memory_bytes else "unlimited", max_file_bytes // 2**20,
        )

    def image_for(self, request: RunRequest) -> str | None:
        return None

    def run(self, request: RunRequest, on_line: Callable[[str], None], cancel: threading.Event) -> RunResult:
        if request.image:
            return RunResult(Outcome.failed, None, f"this worker runs built-in trainers as processes; a job naming the image "
                             f"{request.image!r} needs a worker with RETRAIN_RUNNER=docker")
        try:
            request = apply_caps(request, self.caps, self.default_limits)
        except ResourcesRefused as err:
            return RunResult(Outcome.failed, None, str(err))
        entrypoint = self.trainer_dir / request.trainer / "train"
        if not entrypoint.is_file():
            return RunResult(Outcome.failed, None, f"no trainer {request.trainer!r} at {entrypoint}")
        workspace = request.workspace
        limits = request.limits
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "CUDA_VISIBLE_DEVICES": ",".join(request.gpus),
            **workspace.sm_env(workspace.root.absolute(), num_gpus=len(request.gpus), num_cpus=cpu_count_for(limits)),
            **request.env,
            **request.trainer_env(),
        }
        rlimits = self._rlimits(request)
        process = subprocess.Popen(
            [self.python, str(entrypoint), "train"], cwd=workspace.root, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0,
            start_new_session=True, preexec_fn=lambda: _child_setup(rlimits),
        )
        reader = threading.Thread(target=relay_lines, args=(fd_chunks(process.stdout.fileno()), on_line),
                                  kwargs={"what": f"job {request.job_id}"}, name=f"out-{request.job_id}", daemon=True)
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
        # The trainer is gone; a child it left behind may still hold the pipe: end it too.
        _kill_group(process.pid)
        reader.join(timeout=10)
        process.stdout.close()

        if stopped_for == Outcome.cancelled:
            return RunResult(Outcome.cancelled, code, "cancelled")
        if stopped_for == Outcome.timeout:
            return RunResult(Outcome.timeout, code, f"timeout: still running after the {request.deadline_s} s deadline")
        if code == 0:
            return RunResult(Outcome.succeeded, 0)
        if code == -signal.SIGXCPU:
            return RunResult(Outcome.timeout, code, "timeout: the trainer used up its CPU time limit")
        if code == -signal.SIGXFSZ:
            return RunResult(Outcome.failed, code, f"the trainer wrote a file larger than {self.max_file_bytes // 2**20} MiB")
        return RunResult(Outcome.failed, code, failure_reason(workspace, f"trainer exited with code {code}"))

    def _rlimits(self, request: RunRequest) -> list[tuple[int, int, int]]:
        limits = request.limits
        out = [(resource.RLIMIT_CORE, 0, 0), (resource.RLIMIT_FSIZE, self.max_file_bytes, self.max_file_bytes)]
        if limits.memory_bytes:
            if request.gpus:
                log.warning("job %s: GPUs assigned, so no address-space limit (CUDA reserves more than it uses): "
                            "the trainer's memory is not bounded by the process runner", request.job_id)
            else:
                out.append((resource.RLIMIT_AS, limits.memory_bytes, limits.memory_bytes))
        cpu_s = int(request.deadline_s * (limits.cpus or os.cpu_count() or 1)) + 60
        out.append((resource.RLIMIT_CPU, cpu_s, cpu_s + 30))
        if limits.pids:
            nproc = _tasks_of(os.getuid()) + limits.pids
            out.append((resource.RLIMIT_NPROC, nproc, nproc))
        # Never above what this process may set (an unprivileged worker has its own hard limits).
        fitted = []
        for which, soft, hard in out:
            _, current_hard = resource.getrlimit(which)
            if current_hard != resource.RLIM_INFINITY:
                soft, hard = min(soft, current_hard), min(hard, current_hard)
            fitted.append((which, soft, hard))
        return fitted

    @staticmethod
    def _stop(process: subprocess.Popen) -> None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _child_setup(rlimits: list[tuple[int, int, int]]) -> None:
    """Runs in the child between fork and exec: only async-signal-safe-ish calls, no locks."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    for which, soft, hard in rlimits:
        resource.setrlimit(which, (soft, hard))


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tasks_of(uid: int) -> int:
    """Processes and threads that belong to `uid` now (what RLIMIT_NPROC counts)."""
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid:
                continue
            count += len(os.listdir(f"/proc/{entry.name}/task"))
        except OSError:
            continue
    return count


def _user() -> str:
    uid = os.getuid()
    try:
        import pwd

        name = pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        name = str(uid)
    return f"{name}, uid {uid}" + (" - ROOT" if uid == 0 else "")
