"""The container contract's inputs, read in one place for every trainer of the audio image: where
things are (`Paths`, from the SM_* variables) and the hyperparameters (`read_arguments`), with
the fields every trainer shares (`FitArguments`).

SageMaker passes every hyperparameter as a string (`"30"`, `"0.001"`, `"true"`), so each value is
parsed back to the type its dataclass field declares. Unknown hyperparameters are logged and
ignored: the service may pass keys meant for another trainer.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from .errors import TrainerError
from .progress import log

ML_ROOT = Path("/opt/ml")


def _env_path(var: str, fallback: Path) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else fallback


@dataclass
class Paths:
    """Every path comes from its SM_* variable; /opt/ml/... only when the variable is unset (local mode
    sets them all)."""

    input_config_dir: Path
    train_dir: Path
    validation_dir: Path | None
    base_model_dir: Path | None
    model_dir: Path
    output_dir: Path
    output_data_dir: Path
    checkpoint_dir: Path
    cache_dir: Path | None  # the `cache` channel: decoded audio of earlier jobs (feature_cache.py)
    num_gpus: int | None
    num_cpus: int | None

    @classmethod
    def from_env(cls) -> Paths:
        input_dir = _env_path("SM_INPUT_DIR", ML_ROOT / "input")
        output_dir = _env_path("SM_OUTPUT_DIR", ML_ROOT / "output")

        def channel(name: str) -> Path | None:
            # A channel exists when SageMaker names it (SM_CHANNEL_X) or, without the variable,
            # when its folder is there.
            path = _env_path(f"SM_CHANNEL_{name.upper()}", input_dir / "data" / name)
            return path if path.is_dir() else None

        def as_int(var: str) -> int | None:
            try:
                return int(os.environ[var])
            except (KeyError, ValueError):
                return None

        train = channel("train")
        if train is None:
            raise TrainerError(
                "The train channel is missing: expected SM_CHANNEL_TRAIN or /opt/ml/input/data/train/ "
                "holding dataset.csv and the audio it names."
            )
        return cls(
            input_config_dir=_env_path("SM_INPUT_CONFIG_DIR", input_dir / "config"),
            train_dir=train,
            validation_dir=channel("validation"),
            base_model_dir=channel("model"),
            model_dir=_env_path("SM_MODEL_DIR", ML_ROOT / "model"),
            output_dir=output_dir,
            output_data_dir=_env_path("SM_OUTPUT_DATA_DIR", output_dir / "data"),
            checkpoint_dir=_env_path("SM_CHECKPOINT_DIR", ML_ROOT / "checkpoints"),
            cache_dir=channel("cache"),
            num_gpus=as_int("SM_NUM_GPUS"),
            num_cpus=as_int("SM_NUM_CPUS"),
        )

    @property
    def failure_file(self) -> Path:
        return self.output_dir / "failure"

    @property
    def cache_output_dir(self) -> Path:
        """Where the trainer leaves its decoded audio for the next job of the model."""
        return self.output_dir / "cache"

    def job(self) -> dict:
        """job.json (task, model_name, base, job_id): only used for the model card and lineage."""
        try:
            return json.loads((self.input_config_dir / "job.json").read_text())
        except (OSError, ValueError):
            return {}


@dataclass
class FitArguments:
    """The hyperparameters of the fit driver (fit.py), shared by every trainer; a trainer's own
    dataclass extends this one and may give a field another default."""

    epochs: int = field(default=30, metadata={"help": "passes over the training split (may grow to make min_steps)"})
    batch_size: int = 32
    learning_rate: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate"})
    weight_decay: float = 0.01
    max_grad_norm: float = 5.0
    seed: int = 0
    patience: int = field(default=8, metadata={"help": "epochs without validation improvement before stopping"})
    min_delta: float = 1e-4
    min_steps: int = field(default=400, metadata={"help": "optimizer steps before early stopping may end the run"})
    keep: str = field(default="best", metadata={
        "help": "best: the best validation epoch's weights, with early stopping | last: every epoch, then the final weights"})
    mixed_precision: str = field(default="auto", metadata={"help": "auto | bf16 | fp16 | no (GPU only)"})

    # Splits, used when the CSV has no `split` column (or leaves rows unassigned)
    validation_fraction: float = 0.15
    test_fraction: float = 0.15

    # Learning curve (learning_curve.py): also train on subsets of the training split, fit, extrapolate
    learning_curve: bool = field(default=False, metadata={"help": "also train on 25% and 50% of the training split and fit a curve"})
    learning_curve_metric: str = field(default="macro_f1", metadata={"help": "the score the curve fits (see the trainer)"})
    learning_curve_fractions: str = field(default="0.25,0.5", metadata={"help": "subset fractions, comma separated"})
    target_metric: float = field(default=0.0, metadata={"help": "score to reach; the curve predicts the data size (0 = none)"})

    LEARNING_CURVE_METRICS: ClassVar[tuple[str, ...]] = ("macro_f1", "accuracy")
    given: ClassVar[frozenset[str]] = frozenset()  # the names the job set (read_arguments), not a field

    def fit_checks(self) -> list[tuple[bool, str]]:
        return [
            (self.epochs >= 1, "epochs must be at least 1"),
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (self.learning_rate > 0, "learning_rate must be positive"),
            (self.max_grad_norm > 0, "max_grad_norm must be positive"),
            (self.patience >= 1, "patience must be at least 1"),
            (self.keep in ("best", "last"), "keep must be best or last"),
            (self.min_steps >= 0, "min_steps must be 0 or more"),
            (0 < self.validation_fraction < 0.5, "validation_fraction must be between 0 and 0.5"),
            (0 <= self.test_fraction < 0.5, "test_fraction must be between 0 and 0.5"),
            (self.mixed_precision in ("auto", "bf16", "fp16", "no"), "mixed_precision must be auto, bf16, fp16 or no"),
            (self.learning_curve_metric in self.LEARNING_CURVE_METRICS,
             f"learning_curve_metric must be one of {', '.join(self.LEARNING_CURVE_METRICS)}"),
            (0 <= self.target_metric <= 1, "target_metric must be between 0 and 1 (0 = none)"),
        ]

    def checks(self) -> list[tuple[bool, str]]:
        """The trainer's own checks, added to fit_checks."""
        return []

    def validate(self) -> None:
        for ok, message in self.fit_checks() + self.checks():
            if not ok:
                raise TrainerError(f"Invalid hyperparameter: {message}.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _parse(name: str, raw, kind: type):
    text = raw if isinstance(raw, str) else json.dumps(raw)
    text = text.strip()
    try:
        if kind is bool:
            lowered = text.lower().strip('"')
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            as_float = float(text)
            if as_float != int(as_float):
                raise ValueError
            return int(as_float)
        if kind is float:
            return float(text)
        # strings may arrive JSON-quoted when a client passed a JSON string
        if len(text) >= 2 and text[0] == text[-1] == '"':
            return json.loads(text)
        return text
    except ValueError:
        raise TrainerError(f"Hyperparameter {name}={raw!r} is not a valid {kind.__name__}.") from None


def read_arguments(cls, paths: Paths, quiet: frozenset[str] = frozenset()):
    """hyperparameters.json (the contract's file; SM_HPS when it is absent) into the dataclass
    `cls`. SageMaker passes strings, so each value is parsed back to its field's type; names the
    dataclass does not have are logged (unless in `quiet`) and ignored. Every trainer in this
    image reads its arguments through here."""
    source = paths.input_config_dir / "hyperparameters.json"
    raw: dict = {}
    if source.exists():
        try:
            raw = json.loads(source.read_text())
        except ValueError as e:
            raise TrainerError(f"{source} is not valid JSON: {e}") from None
    elif os.environ.get("SM_HPS"):
        try:
            raw = json.loads(os.environ["SM_HPS"])
        except ValueError as e:
            raise TrainerError(f"SM_HPS is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise TrainerError("hyperparameters must be a JSON object of name -> string value")

    kinds = {"int": int, "float": float, "bool": bool, "str": str}
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    values = {}
    for name, value in raw.items():
        if name not in types:
            if name not in quiet:
                log(f"ignoring hyperparameter {name}={value!r}: this trainer does not use it")
            continue
        values[name] = _parse(name, value, kinds[types[name]])
    args = cls(**values)
    args.given = frozenset(values)
    if hasattr(args, "validate"):
        args.validate()
    return args
