"""The worker's GPUs: discovery and a thread-safe allocator.

Discovery (`discover_gpus`), first that answers wins:
  1. `configured` ids, when given (RETRAIN_GPUS="0,1" or "" for none): an operator's explicit
     choice overrides what the machine reports, e.g. to leave a GPU to something else;
  2. NVML through `pynvml` (nvidia-ml-py), when it is importable (an optional dependency);
  3. `nvidia-smi -L`, when the binary is on PATH;
  4. none: CPU-only jobs still run.

The ids are the ones Docker's device requests and CUDA_VISIBLE_DEVICES take: NVML indexes as
strings ("0", "1"), or whatever the operator configured (indexes or GPU-… UUIDs).

`GpuAllocator.acquire(n)` hands out n distinct ids and blocks while fewer are free; waiters
are served first come, first served (a job asking for 2 is not starved by a stream of 1-GPU
jobs). n = 0 always succeeds at once with ().
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Gpu:
    id: str
    name: str = ""
    uuid: str = ""
    memory_bytes: int | None = None


def parse_gpu_ids(value: str | Sequence[str] | None) -> list[str] | None:
    """'0,1' / ['0', '1'] -> ['0', '1']; '' -> []; None -> None (not configured)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(i).strip() for i in items if str(i).strip()]


def _from_nvml() -> list[Gpu] | None:
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError: no driver, no device
        log.info("NVML present but not usable: %s", exc)
        return None
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle).total
            gpus.append(Gpu(str(i), name.decode() if isinstance(name, bytes) else name,
                            uuid.decode() if isinstance(uuid, bytes) else uuid, int(mem)))
        return gpus
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


_SMI_LINE = re.compile(r"^GPU (\d+): (.*?)(?: \(UUID: ([^)]+)\))?$")


def parse_nvidia_smi_list(text: str) -> list[Gpu]:
    """Parse `nvidia-smi -L`: 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-…)' per line."""
    gpus = []
    for line in text.splitlines():
        m = _SMI_LINE.match(line.strip())
        if m:
            gpus.append(Gpu(m.group(1), m.group(2), m.group(3) or ""))
    return gpus


def _from_nvidia_smi() -> list[Gpu] | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.info("nvidia-smi -L failed: %s", exc)
        return None
    if out.returncode != 0:
        log.info("nvidia-smi -L exited %s: %s", out.returncode, out.stderr.strip())
        return None
    return parse_nvidia_smi_list(out.stdout)


def discover_gpus(configured: str | Sequence[str] | None = None) -> list[Gpu]:
    ids = parse_gpu_ids(configured)
    if ids is not None:
        return [Gpu(i) for i in ids]
    for probe in (_from_nvml, _from_nvidia_smi):
        found = probe()
        if found is not None:
            return found
    return []


class GpuAllocator:
    """Thread-safe pool of GPU ids. Use `lease(n)` as a context manager, or acquire/release."""

    def __init__(self, ids: Iterable[str | Gpu]):
        self._all = tuple(g.id if isinstance(g, Gpu) else str(g) for g in ids)
        if len(set(self._all)) != len(self._all):
            raise ValueError(f"duplicate GPU ids: {self._all}")
        self._free = list(self._all)
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()  # waiting tickets, first come first served

    @property
    def total(self) -> int:
        return len(self._all)

    @property
    def ids(self) -> tuple[str, ...]:
        return self._all

    def free_count(self) -> int:
        with self._cond:
            return len(self._free)

    def acquire(self, n: int, timeout: float | None = None, cancel: threading.Event | None = None) -> tuple[str, ...]:
        """Take n GPUs, waiting while fewer are free. Raises TimeoutError after `timeout` seconds,
        InterruptedError when `cancel` is set while waiting, ValueError when n can never be met."""
        if n < 0:
            raise ValueError("n must be >= 0")
        if n == 0:
            return ()
        if n > len(self._all):
            raise ValueError(f"asked for {n} GPUs; this worker has {len(self._all)}")
        deadline = None if timeout is None else time.monotonic() + timeout
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            try:
                while not (self._queue[0] is ticket and len(self._free) >= n):
                    if cancel is not None and cancel.is_set():
                        raise InterruptedError("cancelled while waiting for a GPU")
                    wait = 0.5 if cancel is not None else None
                    if deadline is not None:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise TimeoutError(f"no {n} GPU(s) free within {timeout} s")
                        wait = left if wait is None else min(wait, left)
                    self._cond.wait(wait)
                taken, self._free = tuple(self._free[:n]), self._free[n:]
                return taken
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()

    def release(self, ids: Iterable[str]) -> None:
        ids = tuple(ids)
        with self._cond:
            for i in ids:
                if i not in self._all:
                    raise ValueError(f"unknown GPU id {i!r}")
                if i in self._free:
                    raise ValueError(f"GPU {i!r} released twice")
            # Keep the discovery order so allocation stays predictable.
            self._free = [g for g in self._all if g in self._free or g in ids]
            self._cond.notify_all()

    @contextmanager
    def lease(self, n: int, timeout: float | None = None, cancel: threading.Event | None = None) -> Iterator[tuple[str, ...]]:
        ids = self.acquire(n, timeout=timeout, cancel=cancel)
        try:
            yield ids
        finally:
            if ids:
                self.release(ids)
