"""Augmentations that more than one trainer uses: speed perturbation of a waveform, and on log-mel
features a vocal-tract-length warp and SpecAugment masks. Features are [batch, 1, mels, frames];
every random draw comes from an explicit generator, so an epoch's augmentation depends only on
(seed, epoch) and a resumed run sees the same data as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np
import torch


def speed(audio: np.ndarray, factor: float) -> np.ndarray:
    """Speed perturbation (Ko et al., 2015): resampled by `factor` (> 1 faster and higher), which
    moves tempo, pitch and formants together, like another speaker; linear interpolation."""
    if factor == 1.0:
        return audio
    n_out = max(1, int(round(len(audio) / factor)))
    positions = np.arange(n_out, dtype=np.float64) * factor
    return np.interp(positions, np.arange(len(audio)), audio).astype(np.float32)


def warp_mel_axis(logmel: torch.Tensor, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    """VTLP (Jaitly & Hinton, 2013): stretch or squeeze each example's mel axis by a random factor
    in [low, high] (a longer or shorter vocal tract moves every formant by the same ratio), by
    linear interpolation between bins."""
    if low == 1.0 and high == 1.0:
        return logmel
    b, _, n_mels, frames = logmel.shape
    alpha = low + torch.rand(b, 1, generator=gen) * (high - low)
    source = (torch.arange(n_mels, dtype=torch.float32)[None, :] * alpha).clamp(0, n_mels - 1)
    lower = source.floor().long()
    upper = (lower + 1).clamp(max=n_mels - 1)
    w = (source - lower).to(logmel.device)[:, None, :, None]

    def take(index: torch.Tensor) -> torch.Tensor:
        return logmel.gather(2, index.to(logmel.device)[:, None, :, None].expand(-1, 1, -1, frames))

    return (1 - w) * take(lower) + w * take(upper)


def spec_augment(logmel: torch.Tensor, freq_masks: int, freq_mask_bins: int, time_masks: int,
                 time_mask_fraction: float, gen: torch.Generator, fill: float = 0.0) -> torch.Tensor:
    """SpecAugment (Park et al., 2019): per example, `freq_masks` bands of up to `freq_mask_bins`
    mel bins and `time_masks` runs of up to `time_mask_fraction` of the frames take `fill` (the
    utterance mean, 0 after a per-utterance normalisation)."""
    b, _, n_mels, n_frames = logmel.shape
    mask = torch.zeros(b, 1, n_mels, n_frames, dtype=torch.bool)
    bins = torch.arange(n_mels)[None, :]
    frames = torch.arange(n_frames)[None, :]
    for _ in range(freq_masks):
        width = torch.randint(0, freq_mask_bins + 1, (b, 1), generator=gen)
        start = (torch.rand(b, 1, generator=gen) * (n_mels - width + 1)).long()
        mask |= ((bins >= start) & (bins < start + width))[:, None, :, None]
    max_t = max(1, int(time_mask_fraction * n_frames))
    for _ in range(time_masks):
        width = torch.randint(0, max_t + 1, (b, 1), generator=gen)
        start = (torch.rand(b, 1, generator=gen) * (n_frames - width + 1)).long()
        mask |= ((frames >= start) & (frames < start + width))[:, None, None, :]
    return logmel.masked_fill(mask.to(logmel.device), fill)
