"""Decoding: any audio or video file to 16 kHz mono float32, the input every wav2vec2-style model expects.

wav/flac/ogg go through libsndfile (fast, in-process); everything else (mp3, m4a, mp4, mkv, webm...)
through ffmpeg, which drops the video stream (`-vn`), mixes down, resamples and pipes raw float32.
"""

from __future__ import annotations

import shutil
import subprocess
from math import gcd
from pathlib import Path

import numpy as np

from . import SAMPLE_RATE

SOUNDFILE_SUFFIXES = {".wav", ".flac", ".ogg", ".oga"}


class DecodeError(RuntimeError):
    pass


def ffmpeg_decode(path: Path, sample_rate: int = SAMPLE_RATE, timeout: float = 3600) -> np.ndarray:
    """The first audio stream of `path`, as mono float32 at `sample_rate`."""
    if shutil.which("ffmpeg") is None:
        raise DecodeError("ffmpeg is not installed, and it is needed to decode this format")
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-vn", "-map", "0:a:0",
           "-ac", "1", "-ar", str(sample_rate), "-f", "f32le", "-acodec", "pcm_f32le", "-"]
    proc = subprocess.run(cmd, capture_output=True, timeout=timeout)
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        raise DecodeError(f"ffmpeg could not read it: {lines[-1] if lines else 'exit code ' + str(proc.returncode)}")
    return np.frombuffer(proc.stdout, dtype=np.float32).copy()


def _soundfile_decode(path: Path, sample_rate: int) -> np.ndarray:
    import soundfile as sf
    from scipy.signal import resample_poly

    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    audio = data.mean(axis=1)
    if rate != sample_rate:
        g = gcd(int(rate), sample_rate)
        audio = resample_poly(audio, sample_rate // g, int(rate) // g).astype(np.float32)
    return audio


def decode(path: Path | str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Any audio or video file -> contiguous float32 mono at `sample_rate` (16 kHz)."""
    path = Path(path)
    audio = None
    if path.suffix.lower() in SOUNDFILE_SUFFIXES:
        try:
            audio = _soundfile_decode(path, sample_rate)
        except Exception:  # noqa: BLE001 - e.g. an odd wav codec: ffmpeg reads more than libsndfile
            audio = None
    if audio is None:
        audio = ffmpeg_decode(path, sample_rate)
    if audio.size == 0:
        raise DecodeError("it holds no audio samples")
    if not np.all(np.isfinite(audio)):
        raise DecodeError("it contains NaN or infinite samples")
    return np.ascontiguousarray(audio, dtype=np.float32)
