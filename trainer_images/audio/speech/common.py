"""What both speech jobs share: arguments from strings, the CSV manifest, decoding in parallel,
the safety checks on a model directory, and the failure handling of the contract.

Paths, the progress line format and the user-facing error type come from `audio_trainer`, so the
three methods of the audio image read the contract identically.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainer_core.args import Paths, read_arguments
from trainer_core.errors import TrainerError
from trainer_core.progress import emit_progress

from . import SAMPLE_RATE
from .audio_io import decode

__all__ = ["Paths", "TrainerError", "emit_progress", "log", "parse_arguments", "Utterance", "read_manifest",
           "load_audio", "find_model_dir", "check_model_dir_is_safe"]

_START = time.monotonic()


def log(message: str) -> None:
    print(f"[speech {time.monotonic() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Arguments

def parse_arguments(cls, paths: Paths, quiet: set[str] = frozenset()):
    """The job's hyperparameters into `cls` (audio_trainer.args.read_arguments: strings parsed
    back to their types, unknown names logged and ignored)."""
    return read_arguments(cls, paths, frozenset(quiet))


# --------------------------------------------------------------------------------------------
# Data

SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "validation": "validation", "valid": "validation", "val": "validation", "dev": "validation",
    "test": "test", "testing": "test", "eval": "test",
    "": "",
}


@dataclass
class Utterance:
    path: str  # as written in the CSV, relative to its channel
    text: str  # the transcript as given ("" for transcription jobs)
    split: str  # train | validation | test | "" (unassigned)
    row: int  # line in its CSV (the header is line 1)
    source: str  # channel name
    audio: np.ndarray | None = None

    @property
    def where(self) -> str:
        return f"{self.source}/dataset.csv line {self.row} ({self.path})"

    @property
    def seconds(self) -> float:
        return 0.0 if self.audio is None else len(self.audio) / SAMPLE_RATE


def read_manifest(channel: Path, source: str, need_text: bool) -> list[Utterance]:
    """`<channel>/dataset.csv`: column audio, and text when `need_text` (split optional)."""
    csv_path = channel / "dataset.csv"
    if not csv_path.is_file():
        raise TrainerError(f"The {source} channel has no dataset.csv; it must hold dataset.csv naming the audio files.")
    required = ("audio", "text") if need_text else ("audio",)
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [(h or "").strip().lower() for h in (reader.fieldnames or [])]
            missing = [c for c in required if c not in header]
            if missing:
                raise TrainerError(f"{source}/dataset.csv: header {reader.fieldnames!r} lacks the column(s) "
                                   f"{', '.join(missing)}; expected {','.join(required)}[,split].")
            reader.fieldnames = header
            rows = []
            for row in reader:
                audio = (row.get("audio") or "").strip()
                text = (row.get("text") or "").strip()
                split = (row.get("split") or "").strip().lower()
                if not audio and not text:
                    continue
                where = f"{source}/dataset.csv line {reader.line_num}"
                if not audio:
                    raise TrainerError(f"{where}: the audio column is empty.")
                if need_text and not text:
                    raise TrainerError(f"{where} ({audio}): the text column is empty; every clip needs its transcript.")
                if split not in SPLIT_ALIASES:
                    raise TrainerError(f"{where} ({audio}): split {split!r} is not one of train, validation, test.")
                rows.append(Utterance(audio, text, SPLIT_ALIASES[split], reader.line_num, source))
    except UnicodeDecodeError as e:
        raise TrainerError(f"{source}/dataset.csv is not UTF-8 text ({e}).") from None
    except csv.Error as e:
        raise TrainerError(f"{source}/dataset.csv could not be parsed as CSV: {e}") from None
    if not rows:
        raise TrainerError(f"{source}/dataset.csv has no rows.")
    return rows


def resolve(channel: Path, utt: Utterance) -> Path:
    """The file must lie inside its channel folder: no absolute paths, no '..'."""
    rel = Path(utt.path)
    if rel.is_absolute() or ".." in rel.parts:
        raise TrainerError(f"{utt.where}: the audio path must be relative to the channel folder, without '..'.")
    path = channel / rel
    if not path.is_file():
        raise TrainerError(f"{utt.where}: the audio file does not exist in the {utt.source} channel.")
    return path


def load_audio(utts: list[Utterance], channels: dict[str, Path], workers: int, min_samples: int = 400) -> None:
    """Decode every file once, in parallel threads (ffmpeg and libsndfile do the work outside the GIL)."""
    paths = [resolve(channels[u.source], u) for u in utts]

    def work(i: int) -> np.ndarray:
        try:
            return decode(paths[i])
        except Exception as e:  # noqa: BLE001 - becomes the job's reason, naming the row
            raise TrainerError(f"{utts[i].where}: the file could not be decoded ({e}).") from None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for utt, audio in zip(utts, pool.map(work, range(len(utts)))):
            if audio.size < min_samples:
                raise TrainerError(f"{utt.where}: the audio is shorter than {1000 * min_samples / SAMPLE_RATE:.0f} ms.")
            utt.audio = audio


# --------------------------------------------------------------------------------------------
# Model directories from users or the store: only data is loaded, never code.

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def find_model_dir(channel: Path | None) -> Path | None:
    """The Hugging Face directory in the model channel: config.json at the top or one level down
    (an archive that wraps its folder)."""
    if channel is None or not channel.is_dir():
        return None
    if (channel / "config.json").is_file():
        return channel
    nested = sorted(p.parent for p in channel.glob("*/config.json"))
    if len(nested) == 1:
        return nested[0]
    if not any(channel.iterdir()):
        return None
    names = sorted(p.name for p in channel.iterdir())[:10]
    raise TrainerError(f"The base model is not a Hugging Face model directory (no config.json; found {names}). "
                       "Upload a zip or tar.gz of a directory saved with save_pretrained (config.json, "
                       "model.safetensors, preprocessor_config.json, vocab.json).")


def check_model_dir_is_safe(model_dir: Path) -> dict:
    """Refuse anything that would run code on load; return the parsed config.json.

    - `auto_map` in a config asks transformers to import the model's own Python files
      (trust_remote_code): refused, and so is any .py file shipped with the model;
    - weights must be safetensors: pickle (pytorch_model.bin, .pt, .ckpt) can execute code when read.
    """
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise TrainerError(f"The base model's config.json cannot be read ({e}).") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise TrainerError("The base model's config.json has no model_type: it is not a Hugging Face model directory.")
    for name in ("config.json", "preprocessor_config.json", "tokenizer_config.json", "processor_config.json"):
        path = model_dir / name
        if path.is_file():
            try:
                text = path.read_text()
            except OSError:
                continue
            if '"auto_map"' in text:
                raise TrainerError(f"The base model's {name} has an auto_map: it asks to run its own code "
                                   "(trust_remote_code), which this service never does. Use a model whose "
                                   "architecture is built into transformers.")
    code = sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*.py"))
    if code:
        raise TrainerError(f"The base model ships Python code ({', '.join(code[:5])}); model directories must hold "
                           "data only (config, safetensors weights, processor files).")
    if not list(model_dir.glob("*.safetensors")):
        pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise TrainerError(f"The base model's weights are pickle files ({', '.join(pickles)}), which can execute "
                               "code when loaded; only safetensors weights are accepted. Convert them with "
                               "model.save_pretrained(dir, safe_serialization=True).")
        raise TrainerError("The base model directory has no *.safetensors weights.")
    return config
