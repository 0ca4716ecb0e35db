"""The model: log-mel front end + a small CNN with global pooling, so any clip length works.

Layout: a stride-2 conv stem, then conv-BN-ReLU x2 blocks with 2x2 max-pooling between them,
global mean+max pooling, dropout, one linear layer.

Everything needed to rebuild it is in `ModelConfig` (written to config.json), so a later job can
continue from the weights without this job's hyperparameters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from . import FORMAT, FORMAT_VERSION, SAMPLE_RATE
from .frontend import LogMel


@dataclass
class ModelConfig:
    labels: list[str]
    n_mels: int = 40
    n_fft: int = 400
    hop_length: int = 160
    channels: list[int] = field(default_factory=lambda: [32, 32, 64, 128])
    dropout: float = 0.3
    sample_rate: int = SAMPLE_RATE
    feature_norm: str = "utterance"  # what a config written before this field had
    architecture: str = "cnn"  # likewise

    def to_json(self, **extra) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self), **extra}

    @classmethod
    def from_json(cls, data: dict) -> ModelConfig:
        keys = {"labels", "n_mels", "n_fft", "hop_length", "channels", "dropout", "sample_rate", "feature_norm",
                "architecture"}
        values = {k: data[k] for k in keys if k in data}
        if values.get("architecture") == "logmel-cnn":  # the name configs of format version 1 wrote
            values["architecture"] = "cnn"
        return cls(**values)


class ConvBlock(nn.Sequential):
    """conv3x3 - BatchNorm - ReLU, twice, then 2x2 max-pool: the classic small-footprint KWS block."""

    def __init__(self, c_in: int, c_out: int, pool: bool):
        layers = [
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        ]
        if pool:
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        super().__init__(*layers)


class BroadcastBlock(nn.Module):
    """One BC-ResNet block: frequency-depthwise conv, then a temporal path on its frequency mean,
    broadcast back and added (with the input, when the shape is kept)."""

    def __init__(self, c_in: int, c_out: int, freq_stride: int, dilation: int, dropout: float = 0.1):
        super().__init__()
        self.transition = c_in != c_out or freq_stride != 1
        self.pre = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))
                    if c_in != c_out else nn.Identity())
        self.frequency = nn.Sequential(
            nn.Conv2d(c_out, c_out, (3, 1), stride=(freq_stride, 1), padding=(1, 0), groups=c_out, bias=False),
            nn.BatchNorm2d(c_out))
        self.temporal = nn.Sequential(
            nn.Conv2d(c_out, c_out, (1, 3), padding=(0, dilation), dilation=(1, dilation), groups=c_out, bias=False),
            nn.BatchNorm2d(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 1, bias=False), nn.Dropout2d(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        f = self.frequency(x)
        out = f + self.temporal(f.mean(dim=2, keepdim=True))
        if not self.transition:
            out = out + x
        return torch.relu(out)


def bcresnet_body(widths: list[int]) -> nn.Sequential:
    """widths = [stem, stage 1..4]: stem 5x5 conv (stride 2: 20 ms frames), stages of 2, 2, 4, 4 blocks
    (frequency stride 2 entering stages 2 and 3, time dilation 1, 1, 2, 4), then a 1x1 conv."""
    stem, *stages = widths
    layers: list[nn.Module] = [nn.Conv2d(1, stem, 5, stride=2, padding=2, bias=False), nn.BatchNorm2d(stem),
                               nn.ReLU(inplace=True)]
    c_in = stem
    for i, (c_out, blocks, stride, dilation) in enumerate(zip(stages, (2, 2, 4, 4), (1, 2, 2, 1), (1, 1, 2, 4))):
        for b in range(blocks):
            layers.append(BroadcastBlock(c_in, c_out, stride if b == 0 else 1, dilation))
            c_in = c_out
    layers += [nn.Conv2d(c_in, 2 * c_in, 1, bias=False), nn.BatchNorm2d(2 * c_in), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class KeywordCNN(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.frontend = LogMel(config.sample_rate, config.n_fft, config.hop_length, config.n_mels, config.feature_norm)
        # A strided stem halves time and frequency before anything else: full-resolution layers
        # cost most of the compute (and, on CPU, most of the time) for little accuracy.
        if config.architecture == "bcresnet":
            self.features = bcresnet_body(config.channels)
            c_in = 2 * config.channels[-1]
        else:
            c_in = config.channels[0]
            blocks = [nn.Conv2d(1, c_in, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_in), nn.ReLU(inplace=True)]
            rest = config.channels[1:]
            for i, c_out in enumerate(rest):
                blocks.append(ConvBlock(c_in, c_out, pool=i < len(rest) - 1))
                c_in = c_out
            self.features = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(config.dropout)
        # mean and max over frequency and time: mean for the whole word, max for its sharpest cue
        self.head = nn.Linear(2 * c_in, len(config.labels))

    def classify(self, logmel: torch.Tensor) -> torch.Tensor:
        """[B, 1, n_mels, frames] -> logits [B, n_labels]."""
        h = self.features(logmel)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return self.head(self.dropout(pooled))

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """waveform [B, samples] float32 mono 16 kHz -> logits [B, n_labels]; what ONNX exports."""
        return self.classify(self.frontend(waveform))
