"""Checks a submission's files before anything is stored: a bad input is refused with a message
that names the file, the row and the problem, and leaves nothing behind.

Archives (the audio upload, a model upload, a .keras file) are read only through jobs.archive,
which parses them in a bounded child process; nothing here opens a zip or tar itself. Each
member the CSV names is extracted once, to a temporary folder, and decoded once. The API runs
the dataset checks (read_manifest, check_audio_files) through api/checker.py, in a bounded child
of its own, so a large CSV costs a CPU, not the API's responsiveness."""

import csv
import io
import json
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import soundfile

from jobs.archive import (
    ArchiveError, ArchiveLimits, Entry, Extracted, archive_kind, extract_archive, list_archive, normalize_name, scan_archive,
)
from jobs.settings import Settings
from jobs.spec import Task

__all__ = [
    "Archive", "InputError", "Manifest", "UploadLimits", "archive_kind", "check_audio_files",
    "check_model_upload", "read_manifest",
]

# Columns each task's CSV must have; `split` (train/validation/test) is optional everywhere.
REQUIRED_COLUMNS = {
    Task.audio_classification: ("audio", "label"),
    Task.asr: ("audio", "text"),
    Task.transcribe: ("audio",),
}
SPLITS = {"train", "validation", "test"}
# The worker writes the validated CSV under this name next to the audio: no audio may take it.
RESERVED_NAMES = {"dataset.csv"}


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


@dataclass(frozen=True)
class UploadLimits:
    """The bounds on what clients upload (jobs/settings.py, "Bounds on what clients upload")."""

    csv_max_bytes: int
    csv_max_rows: int
    csv_max_field_chars: int
    csv_max_labels: int
    csv_max_label_chars: int
    model_config_max_bytes: int
    archive: ArchiveLimits = dataclass_field(default_factory=ArchiveLimits)

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> "UploadLimits":
        """The given settings, or the documented defaults (no environment read) when None."""
        s = settings if settings is not None else Settings.model_construct()
        return cls(
            csv_max_bytes=s.csv_max_bytes, csv_max_rows=s.csv_max_rows, csv_max_field_chars=s.csv_max_field_chars,
            csv_max_labels=s.csv_max_labels, csv_max_label_chars=s.csv_max_label_chars,
            model_config_max_bytes=s.model_config_max_bytes, archive=ArchiveLimits.from_settings(s),
        )


@dataclass
class Manifest:
    rows: list[dict[str, str]]
    label_counts: Counter
    filename: str = "dataset"  # the CSV's upload name, for refusals that name a row

    @property
    def audio_paths(self) -> list[str]:
        return [row["audio"] for row in self.rows]


def read_manifest(data: bytes, task: Task, filename: str = "dataset", limits: UploadLimits | None = None) -> Manifest:
    """Parse and check the CSV. Rows are numbered as a spreadsheet shows them (header = row 1).
    Bounded: the file's bytes, the rows, each field, the labels and their length."""
    limits = limits or UploadLimits.from_settings()
    if len(data) > limits.csv_max_bytes:
        raise InputError("dataset", f"is {len(data)} bytes; the limit is {limits.csv_max_bytes}", file=filename, status=413)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise InputError("dataset", f"not UTF-8 text (byte {err.start} is invalid)", row=line, file=filename) from None
    if not text.strip():
        raise InputError("dataset", "the CSV is empty", file=filename)
    max_field = limits.csv_max_field_chars
    if csv.field_size_limit() <= max_field:  # the csv module's own cap (131,072) would raise first
        csv.field_size_limit(max_field + 1)
    reader = csv.reader(io.StringIO(text))
    try:
        raw_header = next(reader, [])
        header = [h.strip() for h in raw_header]
        for column in header:
            if len(column) > max_field:
                raise _field_too_long(column, max_field, 1, filename)
        missing = [c for c in REQUIRED_COLUMNS[task] if c not in header]
        if missing:
            raise InputError(
                "dataset", f"missing column(s) {', '.join(missing)}; header is {','.join(header) or '(empty)'}; "
                f"a {task.value} CSV needs {','.join(REQUIRED_COLUMNS[task])}", row=1, file=filename)
        rows, counts = [], Counter()
        counting = "label" in REQUIRED_COLUMNS[task]
        for number, values in enumerate(reader, start=2):
            if number - 1 > limits.csv_max_rows:
                raise InputError("dataset", f"has more than {limits.csv_max_rows} rows; the limit is {limits.csv_max_rows}",
                                 row=number, file=filename, status=413)
            for value in values:
                if len(value) > max_field:
                    raise _field_too_long(value, max_field, number, filename)
            row = {k: v.strip() for k, v in zip(header, values)}
            for column in REQUIRED_COLUMNS[task]:
                if not row.get(column):
                    raise InputError("dataset", f"empty '{column}'", row=number, file=filename)
            if "split" in row and row["split"] and row["split"] not in SPLITS:
                raise InputError("dataset", f"split must be one of {sorted(SPLITS)}, got {row['split']!r}", row=number, file=filename)
            row["audio"] = _relative_path(row["audio"], "dataset", row=number, file=filename)
            if row["audio"] in RESERVED_NAMES:
                raise InputError("dataset", f"audio may not be named {row['audio']!r}: that name is kept for the CSV itself", row=number, file=filename)
            if counting:
                label = row["label"]
                if len(label) > limits.csv_max_label_chars:
                    raise InputError("dataset", f"label is {len(label)} characters; the limit is {limits.csv_max_label_chars}",
                                     row=number, file=filename, status=413)
                if label not in counts and len(counts) >= limits.csv_max_labels:
                    raise InputError("dataset", f"more than {limits.csv_max_labels} distinct labels; the limit is {limits.csv_max_labels}",
                                     row=number, file=filename, status=413)
                counts[label] += 1
            row["_row"] = str(number)
            rows.append(row)
    except csv.Error as err:
        if "field larger than field limit" in str(err):  # longer than any field we would take
            raise InputError("dataset", f"a field is over {max_field} characters; the limit is {max_field}",
                             row=reader.line_num or 1, file=filename, status=413) from None
        raise InputError("dataset", f"is not a well-formed CSV ({err})", row=reader.line_num or 1, file=filename) from None
    if not rows:
        raise InputError("dataset", "the CSV has a header but no rows", file=filename)
    if task == Task.audio_classification and len(counts) < 2:
        raise InputError("dataset", f"at least two classes are needed, found only {sorted(counts)}", file=filename)
    return Manifest(rows, counts, filename)


def _field_too_long(value: str, limit: int, row: int, filename: str) -> InputError:
    return InputError("dataset", f"a field is {len(value)} characters; the limit is {limit}", row=row, file=filename, status=413)


def _relative_path(name: str, field: str, *, row: int | None = None, file: str | None = None) -> str:
    """A path that stays inside its folder, spelled as the archive reader spells member names."""
    try:
        path = normalize_name(name)
    except ValueError as err:
        raise InputError(field, f"path {name!r} {err}", row=row, file=file) from None
    if not path:
        raise InputError(field, f"path {name!r} names no file", row=row, file=file)
    return path


class Archive:
    """A zip or tar(.gz) upload, read only through jobs.archive (a bounded child process that
    checks every entry before anything is read or extracted). Refusals become InputErrors
    naming the field, the file and the entry: 413 for a size bound, 422 otherwise."""

    def __init__(self, fileobj: BinaryIO, field: str, filename: str, limits: ArchiveLimits | None = None):
        self.fileobj, self.field, self.filename = fileobj, field, filename
        self.limits = limits or ArchiveLimits()
        self.kind = archive_kind(fileobj)
        if self.kind is None:
            raise InputError(field, "not a zip or tar archive", file=filename)
        self._entries: dict[str, Entry] | None = None

    @property
    def entries(self) -> dict[str, Entry]:
        """The files in the archive, by name (all entries checked)."""
        if self._entries is None:
            self._entries = self._call(list_archive, self.fileobj, self.limits).files
        return self._entries

    def extract(self, dest: Path, names=None) -> Extracted:
        extracted = self._call(extract_archive, self.fileobj, dest, self.limits, names)
        self._entries = extracted.listing.files
        return extracted

    def scan(self, heads) -> dict[str, bytes]:
        listing, found = self._call(scan_archive, self.fileobj, self.limits, heads)
        self._entries = listing.files
        return found

    def _call(self, function, *args):
        try:
            return function(*args)
        except ArchiveError as err:
            raise refusal(err, self.field, self.filename) from None
        finally:
            self.fileobj.seek(0)


def refusal(err: ArchiveError, field: str, filename: str) -> InputError:
    if err.entry is not None:
        message = f"entry {err.entry!r} {err.message}" if err.message.startswith(("is ", "has ", "appears ", "uses ", "path ", "would ", "cannot ", "holds ", "overlaps ", "unpacks ", "its ")) else f"entry {err.entry!r}: {err.message}"
    else:
        message = f"the archive {err.message}" if err.message.startswith(("is ", "has ", "unpacks ", "its ", "holds ", "took ", "could ", "lists ", "needs ")) else err.message
    return InputError(field, message, file=filename, status=413 if err.too_large else 422)


PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".joblib", ".npy")


def looks_like_pickle(head: bytes) -> bool:
    """Python pickles (protocol 2+) start with PROTO; torch.save files are zips holding data.pkl."""
    return head[:1] == b"\x80" and 2 <= head[1:2][0] <= 5 if len(head) >= 2 else False


def _is_config(name: str) -> bool:
    base = PurePosixPath(name).name
    return base == "config.json" or base.endswith("_config.json")


def _read_config(found: dict[str, bytes], name: str, filename: str, limit: int, field: str = "model") -> str:
    """A config file's text, refused (413) over the bound before it is parsed."""
    data = found[name]
    if len(data) > limit:
        raise InputError(field, f"entry {name!r} is over {limit} bytes; the limit for a config file is {limit}", file=filename, status=413)
    return data.decode("utf-8", "replace")


def _check_keras(fileobj: BinaryIO, filename: str, limits: UploadLimits | None = None) -> None:
    """A .keras file is a zip with config.json; a Lambda layer in it is Python bytecode."""
    limits = limits or UploadLimits.from_settings()
    not_keras = InputError("model", "is not a Keras v3 .keras file (a zip holding config.json)", file=filename)
    if archive_kind(fileobj) != "zip":
        raise not_keras
    found = Archive(fileobj, "model", filename, limits.archive).scan([("config.json", limits.model_config_max_bytes + 1)])
    if "config.json" not in found:
        raise not_keras
    config = _read_config(found, "config.json", filename, limits.model_config_max_bytes)
    if re.search(r'"class_name"\s*:\s*"(Lambda|TFOpLambda)"', config):
        raise InputError("model", "has a Lambda layer, whose Python code would run when loaded; rebuild it without Lambda layers", file=filename)


def check_model_upload(fileobj: BinaryIO, filename: str, limits: UploadLimits | None = None) -> str:
    """The base model upload is data, never code: pickles (which run code when loaded), Python
    files and configs that ask for remote code, and Keras Lambda layers (serialised bytecode) are
    refused; archives are checked like audio archives, and every member is read through once
    (CRC and size verified) in the bounded reader. Returns 'zip', 'tar' or 'file' (a .keras file
    is kept whole as a file, though it is a zip inside)."""
    limits = limits or UploadLimits.from_settings()
    if filename.lower().endswith(".keras"):
        _check_keras(fileobj, filename, limits)
        return "file"
    kind = archive_kind(fileobj)
    if kind is None:
        if looks_like_pickle(fileobj.read(2)):
            fileobj.seek(0)
            raise InputError("model", "is a Python pickle, which runs code when loaded; upload safetensors, ONNX or .keras", file=filename)
        fileobj.seek(0)
        return "file"
    archive = Archive(fileobj, "model", filename, limits.archive)
    found = archive.scan([("config.json", limits.model_config_max_bytes + 1), *((suffix, 2) for suffix in PICKLE_SUFFIXES)])
    names = list(archive.entries)
    if kind == "zip" and any(n.endswith("data.pkl") for n in names):
        raise InputError("model", "is a torch.save pickle archive, which runs code when loaded; upload safetensors", file=filename)
    for name in names:
        if name.endswith(".py"):
            raise InputError("model", f"entry {name!r} is Python code; model uploads are data only (no trust_remote_code)", file=filename)
        if _is_config(name) and name in found:
            text = _read_config(found, name, filename, limits.model_config_max_bytes)
            try:
                config = json.loads(text)
            except (ValueError, RecursionError):
                raise InputError("model", f"entry {name!r} is not valid JSON", file=filename) from None
            if isinstance(config, dict) and ("auto_map" in config or config.get("trust_remote_code")):
                raise InputError("model", f"{name!r} asks for custom code (auto_map / trust_remote_code), which is never run here", file=filename)
        if name.endswith(PICKLE_SUFFIXES) and looks_like_pickle(found.get(name, b"")):
            raise InputError("model", f"entry {name!r} is a Python pickle, which runs code when loaded; use safetensors", file=filename)
    fileobj.seek(0)
    return kind


def check_audio_files(manifest: Manifest, archive: Archive | None) -> None:
    """Every file the CSV names is in the archive and decodes as audio. The named members are
    extracted once, to a temporary folder, and each is decoded once however many rows name it."""
    if archive is None:
        first = manifest.rows[0]
        raise InputError("audio", f"the CSV names {first['audio']!r} but no audio archive was uploaded", row=int(first["_row"]), file=manifest.filename)
    first_row: dict[str, int] = {}
    for row in manifest.rows:
        first_row.setdefault(row["audio"], int(row["_row"]))
    with tempfile.TemporaryDirectory(prefix="retrain-check-") as tmp:
        extracted = archive.extract(Path(tmp), first_row)
        present = set(extracted.names)
        for name, number in first_row.items():
            if name not in present:
                raise InputError("dataset", f"{name!r} is not in the audio archive {archive.filename!r}", row=number, file=manifest.filename)
        for name, number in first_row.items():
            _check_decodes(Path(tmp) / name, name, number, archive.filename)


def _check_decodes(path: Path, name: str, row: int, filename: str) -> None:
    try:
        with soundfile.SoundFile(path) as sound:
            if sound.frames == 0:
                raise InputError("audio", f"{name!r} holds no audio frames", row=row, file=filename)
            sound.read(min(sound.frames, sound.samplerate), dtype="float32")
        return
    except InputError:
        raise
    except Exception as err:  # soundfile raises several types for undecodable input
        problem = str(err).replace(f"'{path}'", repr(name)).replace(str(path), name)  # not our temporary folder
    # Not something libsndfile reads (video, AAC, ...): the trainers decode it with ffmpeg, so
    # ask ffprobe whether there is an audio stream in it at all.
    if _has_audio_stream(path):
        return
    raise InputError("audio", f"{name!r} does not decode as audio ({problem})", row=row, file=filename)


def _has_audio_stream(path: Path) -> bool:
    if shutil.which("ffprobe") is None:
        return False
    try:
        probe = subprocess.run(
            # Local files only: a playlist among the uploads must not make the API fetch URLs.
            ["ffprobe", "-v", "error", "-protocol_whitelist", "file", "-select_streams", "a",
             "-show_entries", "stream=codec_type", "-of", "csv=p=0", str(path)],
            capture_output=True, text=True, timeout=60,
        )
    except subprocess.TimeoutExpired:
        return False
    return probe.returncode == 0 and "audio" in probe.stdout
