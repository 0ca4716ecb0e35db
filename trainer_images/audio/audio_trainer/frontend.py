"""The log-mel front end, written as plain tensor ops so it exports to ONNX inside the model.

torch.stft has no ONNX export that onnxruntime runs everywhere, so the STFT is a strided conv1d
whose kernel is a Hann-windowed DFT basis (cos and sin rows). The mel filterbank is a fixed
matrix (HTK mel scale, triangular filters, as librosa/torchaudio build them). All constants are
non-persistent buffers: they are rebuilt from the config, so the weights file holds only what
was learned.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + f / 700.0)


def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int, f_min: float = 20.0, f_max: float | None = None) -> torch.Tensor:
    """[n_mels, n_fft // 2 + 1] triangular filters, equally spaced on the mel scale."""
    f_max = f_max or sample_rate / 2
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    mels = torch.linspace(hz_to_mel(torch.tensor(f_min)).item(), hz_to_mel(torch.tensor(f_max)).item(), n_mels + 2, dtype=torch.float64)
    edges = mel_to_hz(mels)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None, :] - lower) / (centre - lower)
    down = (upper - freqs[None, :]) / (upper - centre)
    return torch.clamp(torch.minimum(up, down), min=0.0).float()


class LogMel(nn.Module):
    """waveform [B, T] float32 16 kHz -> normalised log-mel [B, 1, n_mels, frames].

    Why the normalisation: clips arrive at any level (a phone at arm's length, a headset). The
    waveform is first scaled to unit peak, so the log floor sits at the same place relative to the
    signal, then the log-mel is standardised per utterance (zero mean, unit variance; with
    norm="channel" every mel band's mean is removed). Together these make the features (nearly)
    independent of recording gain.
    """

    def __init__(self, sample_rate: int = 16_000, n_fft: int = 400, hop_length: int = 160, n_mels: int = 40,
                 norm: str = "utterance"):
        super().__init__()
        self.n_fft, self.hop_length, self.n_mels, self.norm = n_fft, hop_length, n_mels, norm
        n_freq = n_fft // 2 + 1
        t = torch.arange(n_fft, dtype=torch.float64)
        window = 0.5 - 0.5 * torch.cos(2 * math.pi * t / n_fft)  # periodic Hann
        k = torch.arange(n_freq, dtype=torch.float64)[:, None]
        angle = 2 * math.pi * k * t[None, :] / n_fft
        basis = torch.cat([torch.cos(angle) * window, -torch.sin(angle) * window], dim=0)  # [2*n_freq, n_fft]
        self.register_buffer("dft", basis.float().unsqueeze(1), persistent=False)  # conv1d kernel [out, in=1, k]
        self.register_buffer("mel", mel_filterbank(n_mels, n_fft, sample_rate), persistent=False)
        self.n_freq = n_freq

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        x = waveform.float()
        x = x / (x.abs().amax(dim=1, keepdim=True) + 1e-5)
        # centre the frames as torch.stft(center=True) does, so a short clip still gets frames
        x = nn.functional.pad(x.unsqueeze(1), (self.n_fft // 2, self.n_fft // 2))
        spec = nn.functional.conv1d(x, self.dft, stride=self.hop_length)  # [B, 2*n_freq, frames]
        real, imag = spec[:, : self.n_freq], spec[:, self.n_freq :]
        power = real * real + imag * imag
        mel = torch.matmul(self.mel, power)  # [B, n_mels, frames]
        # the floor (1e-3 of a unit-peak signal's power scale) keeps digital silence from dominating
        logmel = torch.log(mel + 1e-3)
        # "channel": each mel band's own mean over time is removed (cepstral mean normalisation),
        # which takes out a fixed spectral tilt (a microphone, a room, a synthesiser's timbre)
        mean = logmel.mean(dim=2 if self.norm == "channel" else (1, 2), keepdim=True)
        # the variance floor keeps near-constant input (digital silence) from amplifying rounding noise
        std = torch.sqrt(((logmel - mean) ** 2).mean(dim=(1, 2), keepdim=True) + 1e-2)
        return ((logmel - mean) / std).unsqueeze(1)
