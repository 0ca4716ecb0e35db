"""Checks a submission's files before anything is stored: a bad input is refused with a message
that names the file, the row and the problem, and leaves nothing behind."""

import csv
import io
import json
import re
import shutil
import subprocess
import tempfile
import tarfile
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import BinaryIO

import soundfile

from jobs.spec import Task

# Columns each task's CSV must have; `split` (train/validation/test) is optional everywhere.
REQUIRED_COLUMNS = {
    Task.audio_classification: ("audio", "label"),
    Task.asr: ("audio", "text"),
    Task.transcribe: ("audio",),
}
SPLITS = {"train", "validation", "test"}
MAX_DECODE_CHECK_BYTES = 256 * 1024 * 1024  # bigger members are spooled to disk for the check


class InputError(ValueError):
    """A client mistake; becomes a 422 (or 413) naming the field, file and row."""

    def __init__(self, field: str, message: str, *, row: int | None = None, file: str | None = None, status: int = 422):
        super().__init__(message)
        self.field, self.message, self.row, self.file, self.status = field, message, row, file, status

    def detail(self) -> dict:
        where = {"field": self.field}
        if self.file is not None:
            where["file"] = self.file
        if self.row is not None:
            where["row"] = self.row
        return {**where, "error": self.message}


@dataclass
class Manifest:
    rows: list[dict[str, str]]
    label_counts: Counter

    @property
    def audio_paths(self) -> list[str]:
        return [row["audio"] for row in self.rows]


def read_manifest(data: bytes, task: Task, filename: str = "dataset") -> Manifest:
    """Parse and check the CSV. Rows are numbered as a spreadsheet shows them (header = row 1)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise InputError("dataset", f"not UTF-8 text (byte {err.start} is invalid)", row=line, file=filename) from None
    if not text.strip():
        raise InputError("dataset", "the CSV is empty", file=filename)
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    missing = [c for c in REQUIRED_COLUMNS[task] if c not in header]
    if missing:
        raise InputError(
            "dataset", f"missing column(s) {', '.join(missing)}; header is {','.join(header) or '(empty)'}; "
            f"a {task.value} CSV needs {','.join(REQUIRED_COLUMNS[task])}", row=1, file=filename)
    rows = []
    for number, raw in enumerate(reader, start=2):
        row = {k: (v or "").strip() for k, v in raw.items() if k is not None}
        for column in REQUIRED_COLUMNS[task]:
            if not row.get(column):
                raise InputError("dataset", f"empty '{column}'", row=number, file=filename)
        if "split" in row and row["split"] and row["split"] not in SPLITS:
            raise InputError("dataset", f"split must be one of {sorted(SPLITS)}, got {row['split']!r}", row=number, file=filename)
        row["audio"] = _relative_path(row["audio"], "dataset", row=number, file=filename)
        row["_row"] = str(number)
        rows.append(row)
    if not rows:
        raise InputError("dataset", "the CSV has a header but no rows", file=filename)
    counts = Counter(row["label"] for row in rows) if "label" in REQUIRED_COLUMNS[task] else Counter()
    if task == Task.audio_classification and len(counts) < 2:
        raise InputError("dataset", f"at least two classes are needed, found only {sorted(counts)}", file=filename)
    return Manifest(rows, counts)


def _check_keras(fileobj: BinaryIO, filename: str) -> None:
    """A .keras file is a zip with config.json; a Lambda layer in it is Python bytecode."""
    try:
        with zipfile.ZipFile(fileobj) as zf:
            config = zf.read("config.json").decode("utf-8", "replace")
    except (zipfile.BadZipFile, KeyError):
        raise InputError("model", "is not a Keras v3 .keras file (a zip holding config.json)", file=filename) from None
    finally:
        fileobj.seek(0)
    if re.search(r'"class_name"\s*:\s*"(Lambda|TFOpLambda)"', config):
        raise InputError("model", "has a Lambda layer, whose Python code would run when loaded; rebuild it without Lambda layers", file=filename)


def _relative_path(name: str, field: str, *, row: int | None = None, file: str | None = None) -> str:
    """A path that stays inside its folder: relative, no '..', no drive letters."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise InputError(field, f"path {name!r} must be relative and stay inside the archive", row=row, file=file)
    return str(path)


class Archive:
    """A zip or tar(.gz) upload; every entry is checked (relative, inside the archive, a regular
    file) before anything is read or extracted."""

    def __init__(self, fileobj: BinaryIO, field: str, filename: str):
        self.field, self.filename = field, filename
        self.kind = archive_kind(fileobj)
        if self.kind == "zip":
            self._zip, self._tar = zipfile.ZipFile(fileobj), None
            entries = {info.filename: info for info in self._zip.infolist() if not info.is_dir()}
        elif self.kind == "tar":
            self._zip, self._tar = None, tarfile.open(fileobj=fileobj, mode="r:*")
            entries = {}
            for member in self._tar.getmembers():
                if member.issym() or member.islnk() or member.isdev():
                    raise InputError(field, f"entry {member.name!r} is a link or device; only regular files are allowed", file=filename)
                if member.isfile():
                    entries[member.name] = member
        else:
            raise InputError(field, "not a zip or tar archive", file=filename)
        self.entries = {_relative_path(name, field, file=filename): info for name, info in entries.items()}

    def close(self):
        (self._zip or self._tar).close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def open(self, name: str):
        info = self.entries[name]
        return self._zip.open(info) if self._zip else self._tar.extractfile(info)

    def size(self, name: str) -> int:
        info = self.entries[name]
        return info.file_size if self._zip else info.size


def archive_kind(fileobj: BinaryIO) -> str | None:
    """'zip', 'tar' (plain or compressed) or None, judged by content, not by file name."""
    try:
        if zipfile.is_zipfile(fileobj):
            return "zip"
        fileobj.seek(0)
        return "tar" if tarfile.is_tarfile(fileobj) else None
    except (OSError, tarfile.TarError):
        return None
    finally:
        fileobj.seek(0)


PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".joblib", ".npy")


def looks_like_pickle(head: bytes) -> bool:
    """Python pickles (protocol 2+) start with PROTO; torch.save files are zips holding data.pkl."""
    return head[:1] == b"\x80" and 2 <= head[1:2][0] <= 5 if len(head) >= 2 else False


def check_model_upload(fileobj: BinaryIO, filename: str) -> str:
    """The base model upload is data, never code: pickles (which run code when loaded), Python
    files and configs that ask for remote code, and Keras Lambda layers (serialised bytecode) are
    refused; archives are checked like audio archives. Returns 'zip', 'tar' or 'file' (a .keras
    file is kept whole as a file, though it is a zip inside)."""
    if filename.lower().endswith(".keras"):
        _check_keras(fileobj, filename)
        return "file"
    kind = archive_kind(fileobj)
    if kind is None:
        if looks_like_pickle(fileobj.read(2)):
            raise InputError("model", "is a Python pickle, which runs code when loaded; upload safetensors, ONNX or .keras", file=filename)
        fileobj.seek(0)
        return "file"
    if kind == "zip" and any(n.endswith("data.pkl") for n in zipfile.ZipFile(fileobj).namelist()):
        fileobj.seek(0)
        raise InputError("model", "is a torch.save pickle archive, which runs code when loaded; upload safetensors", file=filename)
    fileobj.seek(0)
    archive = Archive(fileobj, "model", filename)
    for name in archive.entries:
        if name.endswith(".py"):
            raise InputError("model", f"entry {name!r} is Python code; model uploads are data only (no trust_remote_code)", file=filename)
        if PurePosixPath(name).name == "config.json":
            with archive.open(name) as member:
                try:
                    config = json.loads(member.read())
                except ValueError:
                    config = {}
            if isinstance(config, dict) and "auto_map" in config:
                raise InputError("model", f"{name!r} asks for custom code (auto_map / trust_remote_code), which is never run here", file=filename)
        if name.endswith(PICKLE_SUFFIXES):
            with archive.open(name) as member:
                if looks_like_pickle(member.read(2)):
                    raise InputError("model", f"entry {name!r} is a Python pickle, which runs code when loaded; use safetensors", file=filename)
    archive.close()
    fileobj.seek(0)
    return kind


def check_audio_files(manifest: Manifest, archive: Archive | None) -> None:
    """Every file the CSV names is in the archive and decodes as audio."""
    for row in manifest.rows:
        name, number = row["audio"], int(row["_row"])
        if archive is None:
            raise InputError("audio", f"the CSV names {name!r} but no audio archive was uploaded", row=number, file="dataset")
        if name not in archive.entries:
            raise InputError("dataset", f"{name!r} is not in the audio archive {archive.filename!r}", row=number, file="dataset")
        _check_decodes(archive, name, number)


def _check_decodes(archive: Archive, name: str, row: int) -> None:
    if archive.size(name) > MAX_DECODE_CHECK_BYTES:
        return  # too big to read through here; the trainer reports it by row if it does not decode
    with archive.open(name) as member:
        data = io.BytesIO(member.read())
    try:
        with soundfile.SoundFile(data) as sound:
            if sound.frames == 0:
                raise InputError("audio", f"{name!r} holds no audio frames", row=row, file=archive.filename)
            sound.read(min(sound.frames, sound.samplerate), dtype="float32")
        return
    except InputError:
        raise
    except Exception as err:  # soundfile raises several types for undecodable input
        problem = str(err)
    # Not something libsndfile reads (video, AAC, ...): the trainers decode it with ffmpeg, so
    # ask ffprobe whether there is an audio stream in it at all.
    if _has_audio_stream(data.getvalue(), PurePosixPath(name).suffix):
        return
    raise InputError("audio", f"{name!r} does not decode as audio ({problem})", row=row, file=archive.filename)


def _has_audio_stream(data: bytes, suffix: str) -> bool:
    if shutil.which("ffprobe") is None:
        return False
    with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:
        tmp.write(data)
        tmp.flush()
        probe = subprocess.run(
            ["ffprobe", "-v", "error", "-select_streams", "a", "-show_entries", "stream=codec_type", "-of", "csv=p=0", tmp.name],
            capture_output=True, text=True, timeout=60,
        )
    return probe.returncode == 0 and "audio" in probe.stdout
