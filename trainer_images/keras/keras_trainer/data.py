"""CSV `audio,label` -> fixed-length mono waveforms at the job's sample rate."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import numpy as np

from .errors import TrainerError


def find_csv(channel: Path) -> Path:
    preferred = channel / "dataset.csv"
    if preferred.exists():
        return preferred
    found = sorted(channel.glob("*.csv"))
    if not found:
        raise TrainerError(f"no CSV manifest in {channel}")
    return found[0]


def read_rows(csv_path: Path) -> list[tuple[Path, str]]:
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "audio" not in reader.fieldnames or "label" not in reader.fieldnames:
            raise TrainerError(f"{csv_path.name}: the header must have the columns audio,label (got {reader.fieldnames})")
        rows = []
        for i, row in enumerate(reader, start=2):
            audio, label = (row.get("audio") or "").strip(), (row.get("label") or "").strip()
            if not audio or not label:
                raise TrainerError(f"{csv_path.name} row {i}: empty audio or label")
            rows.append((csv_path.parent / audio, label))
    if not rows:
        raise TrainerError(f"{csv_path.name} has no rows")
    return rows


def read_splits(csv_path: Path) -> list[str]:
    """The optional `split` column (train/validation/test), '' where absent, in row order."""
    with csv_path.open(newline="") as f:
        return [(row.get("split") or "").strip() for row in csv.DictReader(f)]


def _resample(x: np.ndarray, sr: int, target: int) -> np.ndarray:
    if sr == target or x.size == 0:
        return x
    n = int(round(x.size * target / sr))
    return np.interp(np.linspace(0, x.size - 1, n), np.arange(x.size), x).astype(np.float32)


def decode(path: Path, sample_rate: int) -> np.ndarray:
    """Mono float32 at `sample_rate`: soundfile for WAV/FLAC/OGG, ffmpeg for everything else
    (MP3, M4A, video containers)."""
    try:
        import soundfile as sf

        x, sr = sf.read(str(path), dtype="float32", always_2d=True)
        return _resample(x.mean(axis=1), sr, sample_rate)
    except Exception:
        pass
    try:
        out = subprocess.run(
            ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-vn", "-ac", "1", "-ar", str(sample_rate),
             "-f", "f32le", "pipe:1"], capture_output=True, check=True, timeout=300)
    except FileNotFoundError as exc:
        raise TrainerError(f"cannot decode {path.name}: soundfile failed and ffmpeg is not installed") from exc
    except subprocess.CalledProcessError as exc:
        raise TrainerError(f"cannot decode {path.name}: {exc.stderr.decode(errors='replace').strip()[:300]}") from exc
    return np.frombuffer(out.stdout, dtype=np.float32).copy()


def fix_length(x: np.ndarray, n: int) -> np.ndarray:
    if x.size >= n:
        start = (x.size - n) // 2
        return x[start:start + n]
    return np.pad(x, (0, n - x.size))


def load_waveforms(rows: list[tuple[Path, str]], sample_rate: int, n_samples: int) -> tuple[np.ndarray, list[str]]:
    xs, labels = [], []
    for path, label in rows:
        if not path.exists():
            raise TrainerError(f"audio file {path.name} named in the CSV is missing")
        xs.append(fix_length(decode(path, sample_rate), n_samples))
        labels.append(label)
    return np.stack(xs).astype(np.float32), labels


def stratified_split(labels: list[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for label in sorted(set(labels)):
        idx = np.array([i for i, lab in enumerate(labels) if lab == label])
        rng.shuffle(idx)
        k = int(round(len(idx) * fraction)) if len(idx) > 1 else 0
        k = min(max(k, 1 if len(idx) >= 3 else 0), len(idx) - 1)
        val_idx.extend(idx[:k])
        train_idx.extend(idx[k:])
    return np.array(sorted(train_idx)), np.array(sorted(val_idx))
