"""Contract paths: SM_* variables first, /opt/ml fallbacks (trainer_images/CONTRACT.md)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    input_config: Path
    model_dir: Path
    output_dir: Path
    output_data: Path
    checkpoints: Path
    channels: dict[str, Path]

    @property
    def failure_file(self) -> Path:
        return self.output_dir / "failure"

    @classmethod
    def from_env(cls, env=os.environ) -> "Paths":
        root = Path("/opt/ml")
        input_dir = Path(env.get("SM_INPUT_DIR", root / "input"))
        output_dir = Path(env.get("SM_OUTPUT_DIR", root / "output"))
        data = input_dir / "data"
        names = json.loads(env["SM_CHANNELS"]) if "SM_CHANNELS" in env else (
            sorted(p.name for p in data.iterdir() if p.is_dir()) if data.is_dir() else [])
        channels = {n: Path(env.get(f"SM_CHANNEL_{n.upper()}", data / n)) for n in names}
        return cls(
            input_config=Path(env.get("SM_INPUT_CONFIG_DIR", input_dir / "config")),
            model_dir=Path(env.get("SM_MODEL_DIR", root / "model")),
            output_dir=output_dir,
            output_data=Path(env.get("SM_OUTPUT_DATA_DIR", output_dir / "data")),
            checkpoints=Path(env.get("SM_CHECKPOINT_DIR", root / "checkpoints")),
            channels=channels,
        )


def _as_bool(v: str) -> bool:
    return str(v).strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class HParams:
    epochs: int = 15
    batch_size: int = 16
    learning_rate: float = 1e-3
    sample_rate: int = 16000
    clip_seconds: float = 1.0
    validation_fraction: float = 0.2
    test_fraction: float = 0.15
    patience: int = 5
    seed: int = 0
    freeze_base: bool = False
    n_mels: int = 40

    @classmethod
    def load(cls, config_dir: Path) -> "HParams":
        path = config_dir / "hyperparameters.json"
        raw = json.loads(path.read_text()) if path.exists() else {}
        kwargs = {}
        for name, field in cls.__dataclass_fields__.items():
            if name not in raw:
                continue
            value = raw[name]
            if isinstance(value, str) and field.type in ("int", "float"):
                value = json.loads(value)
            kwargs[name] = {"int": int, "float": float, "bool": _as_bool}[field.type](value) if field.type in ("int", "float", "bool") else value
        return cls(**kwargs)
