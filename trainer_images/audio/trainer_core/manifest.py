"""The data channel's manifest, read the same by every trainer: `<channel>/dataset.csv` with an
`audio` column (a path inside the channel), the target column of the task (`label` for
classification, `text` for speech recognition, none for transcription) and an optional `split`.
Every refusal names the CSV and its line."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import TrainerError

SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "validation": "validation", "valid": "validation", "val": "validation", "dev": "validation",
    "test": "test", "testing": "test", "eval": "test",
    "": "",  # unassigned: the trainer decides
}
TARGET_HINTS = {"text": "; every clip needs its transcript"}


@dataclass
class Clip:
    path: str  # as written in the CSV, relative to its channel
    split: str  # "train" | "validation" | "test" | "" (unassigned)
    row: int  # 1-based line number in its CSV (the header is line 1)
    source: str  # the channel: "train" or "validation"
    label: str = ""  # classification target
    text: str = ""  # transcript (speech recognition)
    audio: np.ndarray | None = None  # float32 mono, decoded by trainer_core.audio.load_audio
    rate: int = 16_000  # of `audio`
    digest: str = ""  # sha256 of the file's bytes (trainer_core.feature_cache)

    @property
    def where(self) -> str:
        return f"{self.source}/dataset.csv line {self.row} ({self.path})"

    @property
    def seconds(self) -> float:
        return 0.0 if self.audio is None else len(self.audio) / self.rate


def read_manifest(channel: Path, source: str, target: str | None) -> list[Clip]:
    """`<channel>/dataset.csv`: audio, the `target` column (label | text | None) and optionally split."""
    csv_path = channel / "dataset.csv"
    required = ("audio", target) if target else ("audio",)
    if not csv_path.is_file():
        others = sorted(p.name for p in channel.glob("*.csv"))
        hint = f" (found {', '.join(others)})" if others else ""
        raise TrainerError(f"The {source} channel has no dataset.csv{hint}; it must hold dataset.csv with columns "
                           f"{','.join(required)}.")
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [(h or "").strip().lower() for h in (reader.fieldnames or [])]
            missing = [c for c in required if c not in header]
            if missing:
                raise TrainerError(f"{source}/dataset.csv: header {reader.fieldnames!r} lacks the column(s) "
                                   f"{', '.join(missing)}; expected {','.join(required)}[,split].")
            reader.fieldnames = header
            clips = []
            for row in reader:
                line = reader.line_num
                audio = (row.get("audio") or "").strip()
                value = (row.get(target) or "").strip() if target else ""
                split = (row.get("split") or "").strip().lower()
                if not audio and not value:
                    continue  # blank line
                if not audio:
                    raise TrainerError(f"{source}/dataset.csv line {line}: the audio column is empty.")
                if target and not value:
                    raise TrainerError(f"{source}/dataset.csv line {line} ({audio}): the {target} column is "
                                       f"empty{TARGET_HINTS.get(target, '')}.")
                if split not in SPLIT_ALIASES:
                    raise TrainerError(f"{source}/dataset.csv line {line} ({audio}): split {split!r} is not one of "
                                       "train, validation, test.")
                clips.append(Clip(audio, SPLIT_ALIASES[split], line, source, **({target: value} if target else {})))
    except UnicodeDecodeError as e:
        raise TrainerError(f"{source}/dataset.csv is not UTF-8 text ({e}).") from None
    except csv.Error as e:
        raise TrainerError(f"{source}/dataset.csv could not be parsed as CSV: {e}") from None
    if not clips:
        raise TrainerError(f"{source}/dataset.csv has no rows.")
    return clips


def resolve(channel: Path, clip: Clip) -> str:
    """The clip's file, which must lie inside its channel folder (no absolute paths, no '..')."""
    rel = clip.path  # checked as text (os.path, not pathlib: this runs once per clip of every job)
    if os.path.isabs(rel) or ".." in rel.split("/"):
        raise TrainerError(f"{clip.where}: the audio path must be relative to the channel folder, without '..'.")
    path = os.path.join(channel, rel)
    if not os.path.isfile(path):
        raise TrainerError(f"{clip.where}: the audio file does not exist in the {clip.source} channel.")
    return path
