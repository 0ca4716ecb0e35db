"""The dataset checks of a submission (api/validation.py: the CSV parsed and bounded, every clip it
names extracted once and decoded once) run in a child process, never in the API's interpreter.

Why: a CSV of 100,000 rows is a few seconds of pure-Python work holding the GIL; five such
uploads in flight made every other request of the API (`/healthz`, job status, dispatch) wait
for it. In a child, that work costs a CPU, not the API's responsiveness, and it is bounded like
the archive reader: the child caps its own CPU time and address space and lowers its priority
before it reads a byte, and the parent kills it after a wall-clock timeout.

The children are forked from a multiprocessing *forkserver* that has already imported the
checks (a fork costs milliseconds, not the second a fresh interpreter takes to import numpy and
soundfile). The uploads travel as file descriptors, not bytes. The child answers with the
refusal (an InputError, field/file/row intact) or with what the API needs to know of the data.
"""

import multiprocessing
import os
import signal
from dataclasses import dataclass
from multiprocessing import reduction
from typing import BinaryIO

from api.validation import InputError, UploadLimits, check_audio_files, read_manifest
from jobs.spec import Task

_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(["__main__", "api.validation"])  # __main__: imported once, not per child


def warm_up() -> None:
    """Start the forkserver (it imports the checks once: about a second) before the first upload."""
    from multiprocessing import forkserver

    forkserver.ensure_running()


@dataclass(frozen=True)
class CheckLimits:
    """Bounds on one dataset check (jobs/settings.py: check_cpu_seconds, check_memory_bytes,
    check_timeout_s)."""

    cpu_seconds: int = 300
    memory_bytes: int = 4 * 1024**3
    timeout_s: float = 600.0

    @classmethod
    def from_settings(cls, settings) -> "CheckLimits":
        return cls(settings.check_cpu_seconds, settings.check_memory_bytes, settings.check_timeout_s)


@dataclass(frozen=True)
class DatasetSummary:
    rows: int
    label_counts: dict[str, int]  # classification only; empty otherwise
    by_split: dict[str, dict[str, int]]  # classification: split ('' = unassigned) -> label -> rows
    first_rows: dict[str, int]  # classification: label -> the CSV row where it first occurs


class _Fd:
    """An open file handed to the child as a duplicate of its descriptor (how multiprocessing
    itself passes sockets to a child)."""

    def __init__(self, fileobj: BinaryIO):
        fileobj.flush()
        self.fd = fileobj.fileno()  # a SpooledTemporaryFile rolls over to disk here

    def __reduce__(self):
        return _rebuild_fd, (reduction.DupFd(self.fd),)


def _rebuild_fd(dup) -> int:
    return dup.detach()


def check_dataset(
    dataset: BinaryIO, dataset_name: str, audio: BinaryIO | None, audio_name: str | None,
    task: Task, limits: UploadLimits, check: CheckLimits, fields: tuple[str, str] = ("dataset", "audio"),
) -> DatasetSummary:
    """The CSV and the clips it names, checked in a bounded child; raises the InputError the
    checks raised there, or a 413 when the child ran out of the CPU, memory or time allowed.
    `fields`: the form fields of the CSV and of the archive, as refusals name them."""
    receive, send = _context.Pipe(duplex=False)
    child = _context.Process(
        target=_child, name="retrain-dataset-check", daemon=True,
        args=(send, _Fd(dataset), dataset_name, _Fd(audio) if audio else None, audio_name, task.value, limits, check),
    )
    child.start()
    send.close()
    try:
        answer = receive.recv() if receive.poll(check.timeout_s) else None
    except EOFError:  # the child died without answering (a limit killed it)
        answer = None
    finally:
        receive.close()
        if child.is_alive():
            child.kill()
        child.join()
        for upload in (dataset, audio):
            if upload is not None:
                upload.seek(0)
    if answer is None:
        raise InputError(fields[0], f"could not be checked within the CPU, memory and time allowed for one upload "
                         f"({check.cpu_seconds} s of CPU, {check.memory_bytes // 1024**2} MiB, {check.timeout_s:g} s)",
                         file=dataset_name, status=413)
    kind, value = answer
    if kind == "refused":
        value["field"] = dict(zip(("dataset", "audio"), fields)).get(value["field"], value["field"])
        raise InputError(**value)
    if kind == "bug":
        raise RuntimeError(f"dataset check failed: {value}")
    return value


def _summary(manifest) -> DatasetSummary:
    by_split: dict[str, dict[str, int]] = {}
    first_rows: dict[str, int] = {}
    for row in manifest.rows:
        if "label" in row:
            counts = by_split.setdefault(row.get("split", ""), {})
            counts[row["label"]] = counts.get(row["label"], 0) + 1
            first_rows.setdefault(row["label"], int(row["_row"]))
    return DatasetSummary(len(manifest.rows), dict(manifest.label_counts), by_split, first_rows)


def _child(send, dataset_fd: int, dataset_name: str, audio_fd: int | None, audio_name: str | None,
           task: str, limits: UploadLimits, check: CheckLimits) -> None:
    import resource

    # Soft limits: they stop this process, and the archive reader it starts sets its own.
    for limit, value in ((resource.RLIMIT_CPU, check.cpu_seconds), (resource.RLIMIT_AS, check.memory_bytes), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, resource.getrlimit(limit)[1]))
    os.nice(10)  # the API's own requests come first
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the API's Ctrl-C is the API's to handle
    from api.validation import Archive

    try:
        with open(dataset_fd, "rb", closefd=True) as fp:
            fp.seek(0)
            data = fp.read(limits.csv_max_bytes + 1)
        manifest = read_manifest(data, Task(task), dataset_name, limits)
        del data
        archive = None
        if audio_fd is not None:
            with open(audio_fd, "rb", closefd=True) as audio:
                archive = Archive(audio, "audio", audio_name, limits.archive)
                check_audio_files(manifest, archive)
        else:
            check_audio_files(manifest, archive)
        answer = ("ok", _summary(manifest))
    except InputError as err:
        answer = ("refused", {"field": err.field, "message": err.message, "row": err.row, "file": err.file, "status": err.status})
    except MemoryError:
        answer = ("refused", {"field": "dataset", "message": f"needs more than {check.memory_bytes // 1024**2} MiB to check",
                              "row": None, "file": dataset_name, "status": 413})
    except Exception as err:  # a bug of ours, not the client's: the API logs it as one
        answer = ("bug", f"{type(err).__name__}: {err}")
    send.send(answer)
    send.close()
