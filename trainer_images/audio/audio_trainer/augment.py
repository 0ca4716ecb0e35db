"""Augmentation: make every epoch sound like new speakers in new rooms.

A keyword set usually has few speakers; the model must not learn *them*. Each training example
is, in order:
1. speed/pitch perturbed: resampled by a random factor (0.7-1.3), which moves pitch and
   formants together, like a different vocal tract (Ko et al., 2015);
2. placed at a random offset in a fixed-length window (time shift and padding), or randomly
   cropped when longer;
3. reverberated, some of the time, by a synthetic room (exponentially decaying noise with a
   random RT60 behind the direct path, as in Ko et al., 2017's simulated rooms);
4. band-limited, some of the time, to a telephone's 300-3400 Hz (random edges);
5. mixed with coloured noise (white, pink or brown) at a random SNR;
6. scaled by a random gain;
and its log-mel then gets a vocal-tract-length warp of the mel axis (VTLP, Jaitly & Hinton,
2013) and SpecAugment time and frequency masks (Park et al., 2019); mixup (Zhang et al., 2018)
blends pairs of examples and their targets (loop.py).

Steps 1-6 run on the waveform batch (here), the rest on the features (trainer_core/augment.py,
shared with the speech recogniser), all as batched tensor ops with an explicit generator so an
epoch's augmentation depends only on (seed, epoch): a resumed run sees the same data as an
uninterrupted one.
"""

from __future__ import annotations

import numpy as np
import torch

from trainer_core.augment import speed

from . import SAMPLE_RATE
from .args import TrainingArguments


def fit_window(audio: np.ndarray, length: int, offset_fraction: float) -> np.ndarray:
    """Crop (when longer) or zero-pad (when shorter) to `length`, at a relative offset in [0, 1]."""
    out = np.zeros(length, dtype=np.float32)
    if len(audio) >= length:
        start = int(round(offset_fraction * (len(audio) - length)))
        out[:] = audio[start : start + length]
    else:
        start = int(round(offset_fraction * (length - len(audio))))
        out[start : start + len(audio)] = audio
    return out


def _coloured_noise(shape: tuple[int, int], exponents: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Noise with power spectrum ~ 1/f^exponent per row (0 white, 1 pink, 2 brown), unit RMS."""
    white = torch.randn(shape, generator=gen)
    spectrum = torch.fft.rfft(white, dim=1)
    f = torch.arange(spectrum.shape[1], dtype=torch.float32).clamp(min=1.0)
    spectrum = spectrum / f[None, :] ** (exponents[:, None] / 2)
    noise = torch.fft.irfft(spectrum, n=shape[1], dim=1)
    return noise / (noise.pow(2).mean(dim=1, keepdim=True).sqrt() + 1e-8)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(dim=1, keepdim=True).sqrt() + 1e-8


def _fft_size(n: int) -> int:
    return 1 << (n - 1).bit_length()


def reverberate(x: torch.Tensor, args: TrainingArguments, gen: torch.Generator) -> torch.Tensor:
    """Convolve some rows with a synthetic room impulse response; the level is kept."""
    n, length = x.shape
    chosen = torch.rand(n, 1, generator=gen) < args.reverb_probability
    rt60 = args.rt60_min + torch.rand(n, 1, generator=gen) * (args.rt60_max - args.rt60_min)
    taps = int(SAMPLE_RATE * args.rt60_max)
    t = torch.arange(taps, dtype=torch.float32)[None, :] / SAMPLE_RATE
    tail = torch.randn(n, taps, generator=gen) * torch.exp(-6.908 * t / rt60)  # -60 dB at t = RT60
    direct = 0.5 + 2.5 * torch.rand(n, 1, generator=gen)  # direct-to-reverberant ratio, random
    tail[:, :1] = 0.0
    rir = tail / (tail.norm(dim=1, keepdim=True) + 1e-8)
    rir[:, 0] = direct[:, 0]
    size = _fft_size(length + taps)
    wet = torch.fft.irfft(torch.fft.rfft(x, size) * torch.fft.rfft(rir, size), size)[:, :length]
    wet = wet * (_rms(x) / _rms(wet))
    return torch.where(chosen, wet, x)


def band_limit(x: torch.Tensor, args: TrainingArguments, gen: torch.Generator) -> torch.Tensor:
    """Some rows through a telephone band: 200-400 Hz to 3000-4000 Hz (random edges)."""
    n, length = x.shape
    chosen = torch.rand(n, 1, generator=gen) < args.telephone_probability
    low = 200 + 200 * torch.rand(n, 1, generator=gen)
    high = 3000 + 1000 * torch.rand(n, 1, generator=gen)
    freqs = torch.fft.rfftfreq(length, 1 / SAMPLE_RATE)[None, :]
    passband = ((freqs >= low) & (freqs <= high)).float()
    narrow = torch.fft.irfft(torch.fft.rfft(x) * passband, length)
    narrow = narrow * (_rms(x) / _rms(narrow))
    return torch.where(chosen, narrow, x)


def augment_waveforms(clips: list[np.ndarray], length: int, args: TrainingArguments, gen: torch.Generator) -> torch.Tensor:
    """A batch of raw clips -> augmented waveforms [B, length]."""
    n = len(clips)
    u = torch.rand(n, 3, generator=gen).numpy()
    factors = args.speed_min + u[:, 0] * (args.speed_max - args.speed_min)
    batch = np.stack([fit_window(speed(a, float(f)), length, float(o)) for a, f, o in zip(clips, factors, u[:, 1])])
    x = torch.from_numpy(batch)
    if args.reverb_probability > 0:
        x = reverberate(x, args, gen)
    if args.telephone_probability > 0:
        x = band_limit(x, args, gen)

    signal_rms = x.pow(2).mean(dim=1, keepdim=True).sqrt() + 1e-8
    snr_db = args.snr_min_db + torch.rand(n, 1, generator=gen) * (args.snr_max_db - args.snr_min_db)
    noisy = torch.rand(n, 1, generator=gen) < args.noise_probability
    exponents = torch.randint(0, 3, (n,), generator=gen).float()
    noise = _coloured_noise((n, length), exponents, gen) * signal_rms * 10 ** (-snr_db / 20)
    x = x + noise * noisy

    gain_db = (torch.rand(n, 1, generator=gen) * 2 - 1) * args.gain_db
    return x * 10 ** (gain_db / 20)


def fixed_windows(clips: list[np.ndarray], length: int) -> torch.Tensor:
    """No augmentation: centre each clip in the window (validation while training)."""
    return torch.from_numpy(np.stack([fit_window(a, length, 0.5) for a in clips]))
