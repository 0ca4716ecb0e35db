"""Audio at the base model's sampling rate, batched by length.

The CSV reading, decoding and splitting are the CNN trainer's (`audio_trainer.data`): the same
manifest rules, the same errors naming the CSV line, the same stratified split with a fixed
seed. Only the sampling rate differs: it is the feature extractor's, because a pretrained
encoder only understands audio at the rate it was trained on.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from scipy.signal import resample_poly

from audio_trainer import SAMPLE_RATE
from audio_trainer.data import Clip, resolve_clip, decode, load_audio
from trainer_core.errors import TrainerError


def _resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return audio
    g = gcd(int(rate), int(target))
    return resample_poly(audio, target // g, int(rate) // g).astype(np.float32)


def _decode_at(path: Path, target: int) -> np.ndarray:
    """Decode at the file's own rate and resample once to `target` (never through 16 kHz, which
    would drop everything above 8 kHz for a 44.1/48 kHz model)."""
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
        audio = _resample(data.mean(axis=1), rate, target)
    except sf.LibsndfileError:
        audio = _resample(decode(path), SAMPLE_RATE, target)  # ffmpeg path: video and compressed formats
    if not np.all(np.isfinite(audio)):
        raise RuntimeError("it contains NaN or infinite samples")
    return np.ascontiguousarray(audio, dtype=np.float32)


def load_audio_at(clips: list[Clip], channels: dict[str, Path], rate: int, workers: int) -> None:
    """Decode every clip once into memory, mono float32 at `rate`."""
    if rate == SAMPLE_RATE:
        load_audio(clips, channels, workers)  # the CNN trainer's loader, unchanged
        return
    paths = [resolve_clip(channels[c.source], c) for c in clips]

    def work(i: int) -> np.ndarray:
        try:
            return _decode_at(paths[i], rate)
        except Exception as e:  # noqa: BLE001 - a user-facing reason naming the file
            clip = clips[i]
            raise TrainerError(
                f"{clip.source}/dataset.csv line {clip.row}: audio file {clip.path!r} could not be decoded ({e})."
            ) from None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for clip, audio in zip(clips, pool.map(work, range(len(clips)))):
            if audio.size < rate // 40:
                raise TrainerError(
                    f"{clip.source}/dataset.csv line {clip.row}: audio file {clip.path!r} is empty or shorter than 25 ms."
                )
            clip.audio = audio


def length_buckets(lengths: list[int], batch_size: int, bucket_batches: int, generator: torch.Generator) -> list[list[int]]:
    """Batches of similar duration, in random order.

    Shuffle, cut into buckets of `bucket_batches` batches, sort each bucket by duration, cut it
    into batches, shuffle the batches. Each batch is then padded only to its own longest clip,
    which is nearly everyone's length, instead of the longest clip of the data set; the
    shuffling keeps batch composition and order random from epoch to epoch.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    bucket = batch_size * bucket_batches
    batches = []
    for start in range(0, len(order), bucket):
        chunk = sorted(order[start : start + bucket], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


class Collator:
    """Waveforms -> the model's inputs, through the base's own feature extractor.

    Extractors that pad to a fixed size themselves (Whisper: 30 s of log-mel; AST: 1024 frames)
    keep their own padding; waveform extractors (wav2vec2 family) pad to the longest clip of the
    batch. The attention mask is passed exactly when the extractor says the model wants one
    (`return_attention_mask`): wav2vec2-base-style models were trained on zero padding without it.
    """

    def __init__(self, feature_extractor, model):
        import inspect

        self.fe = feature_extractor
        self.rate = int(feature_extractor.sampling_rate)
        params = inspect.signature(feature_extractor.__call__).parameters
        default = params["padding"].default if "padding" in params else "max_length"
        self.kwargs: dict = {"padding": "longest"} if default in (False, "do_not_pad", "longest", True) else {}
        if "return_attention_mask" in params:
            self.kwargs["return_attention_mask"] = bool(getattr(feature_extractor, "return_attention_mask", False))
        accepted = set(inspect.signature(model.forward).parameters)
        self.accepted = accepted

    def __call__(self, waves: list[np.ndarray]) -> dict[str, torch.Tensor]:
        features = self.fe(waves, sampling_rate=self.rate, return_tensors="pt", **self.kwargs)
        return {k: v for k, v in features.items() if k in self.accepted}
