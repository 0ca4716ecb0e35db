"""Decoding, one way for every trainer: any audio or video file to mono float32 at the rate the
model wants.

libsndfile reads wav/flac/ogg in-process at the file's own rate, which is resampled once to the
target (never through 16 kHz, which would drop everything above 8 kHz for a 44.1/48 kHz model);
what it cannot read (mp3, m4a, mp4, mkv, webm...) goes through ffmpeg, which drops the video
stream, mixes down, resamples and pipes raw float32.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from math import gcd
from pathlib import Path

import numpy as np

from .args import Paths
from .errors import TrainerError
from .feature_cache import AudioCache, file_digest
from .manifest import Clip, read_manifest, resolve
from .progress import log

SAMPLE_RATE = 16_000
FFMPEG_TIMEOUT_S = 3600


class DecodeError(RuntimeError):
    pass


def _resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return audio
    from scipy.signal import resample_poly

    g = gcd(int(rate), int(target))
    return resample_poly(audio, target // g, int(rate) // g).astype(np.float32)


def ffmpeg_decode(path: Path, rate: int = SAMPLE_RATE) -> np.ndarray:
    """The first audio stream of `path`, as mono float32 at `rate`."""
    if shutil.which("ffmpeg") is None:
        raise DecodeError("libsndfile cannot read it and ffmpeg is not installed")
    cmd = ["ffmpeg", "-nostdin", "-v", "error", "-i", str(path), "-vn", "-map", "0:a:0",
           "-ac", "1", "-ar", str(rate), "-f", "f32le", "-acodec", "pcm_f32le", "-"]
    proc = subprocess.run(cmd, capture_output=True, timeout=FFMPEG_TIMEOUT_S)
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        raise DecodeError(f"ffmpeg could not read it: {lines[-1] if lines else 'exit code ' + str(proc.returncode)}")
    return np.frombuffer(proc.stdout, dtype=np.float32).copy()


def decode(path: Path | str, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Any audio or video file -> contiguous float32 mono at `rate`, every sample finite."""
    import soundfile as sf

    try:
        data, file_rate = sf.read(str(path), dtype="float32", always_2d=True)
        audio = _resample(data.mean(axis=1), file_rate, rate)  # mix down: a word is a word on either channel
    except Exception:  # noqa: BLE001 - not libsndfile's format (or an odd codec): ffmpeg reads more
        audio = ffmpeg_decode(Path(path), rate)
    if not np.all(np.isfinite(audio)):
        raise DecodeError("it contains NaN or infinite samples")
    return np.ascontiguousarray(audio, dtype=np.float32)


def load_audio(clips: list[Clip], channels: dict[str, Path], workers: int, rate: int = SAMPLE_RATE,
               cache: AudioCache | None = None) -> int:
    """Decode every clip once into memory; a clip whose file the cache holds (same bytes, same
    rate) is taken from it instead. Hashing and cache reads run in this thread (they are fast:
    a thread hop would cost more); the rest is decoded in parallel threads (libsndfile, scipy and
    ffmpeg do the heavy parts outside the GIL). A clip shorter than one 25 ms analysis window is
    refused. Returns how many clips came from the cache."""
    paths = [resolve(channels[c.source], c) for c in clips]
    cache = cache or AudioCache({}, None, rate)
    audio: list[np.ndarray | None] = []
    for clip, path in zip(clips, paths):
        clip.digest = file_digest(path)
        audio.append(cache.get(clip.digest))
    misses = [i for i, a in enumerate(audio) if a is None]

    def work(i: int) -> np.ndarray:
        try:
            return decode(paths[i], rate)
        except Exception as e:  # noqa: BLE001 - becomes the job's reason, naming the row
            raise TrainerError(f"{clips[i].where}: the audio file could not be decoded ({e}).") from None

    if misses:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for i, decoded in zip(misses, pool.map(work, misses)):
                audio[i] = decoded
    for clip, samples in zip(clips, audio):
        if samples.size < rate // 40:
            raise TrainerError(f"{clip.where}: the audio file is empty or shorter than 25 ms.")
        clip.audio, clip.rate = samples, rate
    return len(clips) - len(misses)


def load_job_data(paths: Paths, target: str | None, rate: int = SAMPLE_RATE) -> list[Clip]:
    """The job's clips, decoded once: the train channel's dataset.csv and the validation channel's
    (its rows are validation, whatever their split column says); clips the feature cache holds are
    taken from it, and this job's decoded clips are left as the cache for the next job."""
    started = time.monotonic()
    clips = read_manifest(paths.train_dir, "train", target)
    channels = {"train": paths.train_dir}
    if paths.validation_dir is not None:
        validation = read_manifest(paths.validation_dir, "validation", target)
        for c in validation:
            c.split = "validation"
        clips += validation
        channels["validation"] = paths.validation_dir
    cache = AudioCache.open(paths.cache_dir, rate)
    hits = load_audio(clips, channels, workers=max(2, os.cpu_count() or 1), rate=rate, cache=cache)
    log(f"{len(clips)} clips ({sum(c.seconds for c in clips):.1f} s of audio at {rate} Hz): {len(clips) - hits} decoded, "
        f"{hits} from the feature cache, in {time.monotonic() - started:.1f}s")
    cache.save(paths.cache_output_dir, clips)
    return clips
