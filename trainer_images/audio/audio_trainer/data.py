"""Data: read the CSV manifest, decode every clip once into memory, assign train/validation/test.

Data sets for this trainer are small enough (minutes to a few hours of audio) that decoding once
and keeping float32 waveforms in RAM is both simpler and much faster than decoding per epoch.
"""

from __future__ import annotations

import csv
import random
import shutil
import subprocess
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
import math
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from . import SAMPLE_RATE
from trainer_core.errors import TrainerError

SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "validation": "validation", "valid": "validation", "val": "validation", "dev": "validation",
    "test": "test", "testing": "test", "eval": "test",
    "": "",  # unassigned: the trainer decides
}


@dataclass
class Clip:
    path: str  # as written in the CSV
    label: str
    split: str  # "train" | "validation" | "test" | "" (unassigned)
    row: int  # 1-based line number in its CSV (the header is line 1)
    source: str  # "train" or "validation" channel
    audio: np.ndarray | None = None  # float32 mono 16 kHz


@dataclass
class Splits:
    train: list[Clip]
    validation: list[Clip]
    test: list[Clip]
    labels: list[str]
    eval_split: str  # the split the reported metrics come from
    notes: list[str] = field(default_factory=list)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


def read_manifest(channel: Path, source: str) -> list[Clip]:
    """Read `<channel>/dataset.csv`: columns audio,label and optionally split."""
    csv_path = channel / "dataset.csv"
    if not csv_path.is_file():
        others = sorted(p.name for p in channel.glob("*.csv"))
        hint = f" (found {', '.join(others)})" if others else ""
        raise TrainerError(f"The {source} channel has no dataset.csv{hint}; it must hold dataset.csv with columns audio,label.")
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip().lower() for h in (reader.fieldnames or [])]
            missing = [c for c in ("audio", "label") if c not in header]
            if missing:
                raise TrainerError(
                    f"{source}/dataset.csv: header {reader.fieldnames!r} lacks the column(s) {', '.join(missing)}; "
                    "expected audio,label[,split]."
                )
            reader.fieldnames = header
            clips = []
            for row in reader:
                line = reader.line_num
                audio = (row.get("audio") or "").strip()
                label = (row.get("label") or "").strip()
                split_raw = (row.get("split") or "").strip().lower()
                if not audio and not label:
                    continue  # blank line
                if not audio:
                    raise TrainerError(f"{source}/dataset.csv line {line}: the audio column is empty.")
                if not label:
                    raise TrainerError(f"{source}/dataset.csv line {line} ({audio}): the label column is empty.")
                if split_raw not in _SPLIT_ALIASES:
                    raise TrainerError(
                        f"{source}/dataset.csv line {line} ({audio}): split {split_raw!r} is not one of train, validation, test."
                    )
                clips.append(Clip(audio, label, _SPLIT_ALIASES[split_raw], line, source))
    except UnicodeDecodeError as e:
        raise TrainerError(f"{source}/dataset.csv is not UTF-8 text ({e}).") from None
    except csv.Error as e:
        raise TrainerError(f"{source}/dataset.csv could not be parsed as CSV: {e}") from None
    if not clips:
        raise TrainerError(f"{source}/dataset.csv has no rows.")
    return clips


def resolve_clip(channel: Path, clip: Clip) -> Path:
    """The clip's file, which must lie inside its channel folder (no absolute paths, no '..')."""
    rel = Path(clip.path)
    where = f"{clip.source}/dataset.csv line {clip.row}"
    if rel.is_absolute() or ".." in rel.parts:
        raise TrainerError(f"{where}: audio path {clip.path!r} must be relative to the channel folder, without '..'.")
    path = channel / rel
    if not path.is_file():
        raise TrainerError(f"{where}: audio file {clip.path!r} does not exist in the {clip.source} channel.")
    return path


def _ffmpeg_decode(path: Path) -> np.ndarray:
    """Formats libsndfile cannot read (mp4, mkv, webm, m4a...): ffmpeg extracts the audio track as
    16 kHz mono float32."""
    if shutil.which("ffmpeg") is None:
        raise RuntimeError("libsndfile cannot read it and ffmpeg is not installed")
    proc = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-vn", "-ac", "1", "-ar", str(SAMPLE_RATE), "-f", "f32le", "-"],
        capture_output=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or "ffmpeg failed")
    return np.frombuffer(proc.stdout, dtype=np.float32).copy()


def decode(path: Path) -> np.ndarray:
    """Any audio file -> float32 mono 16 kHz in [-1, 1]."""
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
        audio = data.mean(axis=1)  # mix down: a keyword is a keyword on either channel
        if rate != SAMPLE_RATE:
            g = gcd(int(rate), SAMPLE_RATE)
            audio = resample_poly(audio, SAMPLE_RATE // g, int(rate) // g).astype(np.float32)
    except sf.LibsndfileError:
        audio = _ffmpeg_decode(path)
    if not np.all(np.isfinite(audio)):
        raise RuntimeError("it contains NaN or infinite samples")
    return np.ascontiguousarray(audio, dtype=np.float32)


def load_audio(clips: list[Clip], channels: dict[str, Path], workers: int) -> None:
    """Decode every clip once, in parallel (libsndfile and scipy release the GIL for the heavy parts)."""
    paths = [resolve_clip(channels[c.source], c) for c in clips]

    def work(i: int):
        try:
            return decode(paths[i])
        except Exception as e:  # noqa: BLE001 - becomes a user-facing reason naming the file
            clip = clips[i]
            raise TrainerError(
                f"{clip.source}/dataset.csv line {clip.row}: audio file {clip.path!r} could not be decoded ({e})."
            ) from None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for clip, audio in zip(clips, pool.map(work, range(len(clips)))):
            if audio.size < 400:  # shorter than one 25 ms analysis window
                raise TrainerError(
                    f"{clip.source}/dataset.csv line {clip.row}: audio file {clip.path!r} is empty or shorter than 25 ms."
                )
            clip.audio = audio


def _stratified_take(clips: list[Clip], fraction: float, rng: random.Random, purpose: str, keep_min: int) -> tuple[list[Clip], list[Clip]]:
    """Move round(fraction * n) (at least 1) clips of every label out; at least `keep_min` stay."""
    by_label: dict[str, list[Clip]] = defaultdict(list)
    for c in clips:
        by_label[c.label].append(c)
    kept, taken = [], []
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        n_take = max(1, round(fraction * len(group)))
        if len(group) - n_take < keep_min:
            rows = ", ".join(str(c.row) for c in sorted(group, key=lambda c: c.row)[:10])
            raise TrainerError(
                f"Label {label!r} has only {len(group)} example(s) left to split (CSV lines {rows}); at least "
                f"{n_take + keep_min} are needed to hold out a {purpose} split. Add recordings of {label!r}, "
                "or give a split column."
            )
        taken += group[:n_take]
        kept += group[n_take:]
    return kept, taken


# Below this many clips, the split the metrics are reported on is too small to trust (the 95%
# interval of an accuracy near 0.5 is wider than ±0.1); the model card and metrics.json say so.
SMALL_EVALUATION_SPLIT = 100


def make_splits(clips: list[Clip], validation_fraction: float, test_fraction: float, seed: int,
                base_labels: list[str] | None = None) -> Splits:
    """Honour given splits; divide the unassigned rows, stratified by label with a fixed seed.

    - rows of the validation channel are validation;
    - rows whose `split` column says train/validation/test stay there;
    - unassigned rows fill whatever is missing: a validation split when none is given, and a test
      split when none is given and the train CSV's split column assigns nothing (a user who assigns only
      train/validation has chosen to have no test split: metrics are then reported on validation,
      and metrics.json says so).
    """
    rng = random.Random(seed)
    notes: list[str] = []
    train = [c for c in clips if c.split == "train"]
    validation = [c for c in clips if c.split == "validation"]
    test = [c for c in clips if c.split == "test"]
    unassigned = [c for c in clips if c.split == ""]
    # Did the train CSV's own split column assign anything? (A validation channel alone does not
    # mean the user gave up on a test split.)
    train_csv_assigns = any(c.split for c in clips if c.source == "train")

    pool = unassigned
    if not test and not train_csv_assigns and test_fraction > 0:
        pool, test = _stratified_take(pool, test_fraction, rng, "test", keep_min=2)
        notes.append(f"test split: stratified {test_fraction:.0%} of the data (seed {seed})")
    if not validation:
        if pool:
            pool, validation = _stratified_take(pool, validation_fraction, rng, "validation", keep_min=1)
            notes.append(f"validation split: stratified {validation_fraction:.0%} of the unassigned rows (seed {seed})")
        else:
            train, validation = _stratified_take(train, validation_fraction, rng, "validation", keep_min=1)
            notes.append(f"no validation rows given: stratified {validation_fraction:.0%} of the train rows (seed {seed})")
    train = train + pool

    eval_split = "test"
    if not test:
        eval_split = "validation"
        notes.append("no test split: the reported metrics are on the validation split, which also chose the best epoch")
    evaluated = len(test or validation)
    if evaluated < SMALL_EVALUATION_SPLIT:
        notes.append(f"the {eval_split} split has only {evaluated} clip(s): an accuracy measured on it is uncertain by up to "
                     f"±{0.98 / math.sqrt(evaluated):.2f} (95% interval); do not trust it, or small differences between models")

    train_labels = Counter(c.label for c in train)
    if len(train_labels) < 2:
        raise TrainerError(f"The training split has {len(train_labels)} label(s) {sorted(train_labels)}; at least two are needed.")
    for name, part in (("validation", validation), ("test", test)):
        unknown = sorted({c.label for c in part} - set(train_labels))
        if unknown:
            example = next(c for c in part if c.label in unknown)
            raise TrainerError(
                f"Label(s) {unknown} occur in the {name} split but never in the training split "
                f"(e.g. {example.source}/dataset.csv line {example.row}); the model cannot learn them."
            )

    # Logit order: a base model's labels keep their positions, new labels follow in sorted order.
    base_labels = [lab for lab in (base_labels or []) if lab in train_labels]
    labels = base_labels + sorted(set(train_labels) - set(base_labels))
    return Splits(train, validation, test, labels, eval_split, notes)
