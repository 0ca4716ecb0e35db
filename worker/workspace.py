"""A job's workspace on the worker host, laid out as the container contract (trainer_images/CONTRACT.md).

The process runner points the trainer at these paths through SM_* variables; the docker runner
mounts them at /opt/ml/... inside the container.
"""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

CONTAINER_ROOT = Path("/opt/ml")


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def input_config(self) -> Path:
        return self.root / "input" / "config"

    def channel(self, name: str) -> Path:
        return self.root / "input" / "data" / name

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def output_data(self) -> Path:
        return self.root / "output" / "data"

    @property
    def failure_file(self) -> Path:
        return self.root / "output" / "failure"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def channels(self) -> list[str]:
        data = self.root / "input" / "data"
        return sorted(p.name for p in data.iterdir() if p.is_dir()) if data.is_dir() else []

    def prepare(self, hyperparameters: dict, job: dict) -> None:
        """Create the layout and write the config files. Outputs of an earlier attempt are cleared;
        checkpoints are kept so the trainer can resume."""
        for path in (self.model_dir, self.root / "output"):
            _remove(path)
        if self.checkpoints.is_symlink() or (self.checkpoints.exists() and not self.checkpoints.is_dir()):
            self.checkpoints.unlink()  # a trainer's link in place of the folder: never mount or follow it
        for path in (self.input_config, self.model_dir, self.output_data, self.checkpoints):
            path.mkdir(parents=True, exist_ok=True)
        # SageMaker passes every hyperparameter as a string; trainers parse them back.
        as_strings = {k: v if isinstance(v, str) else json.dumps(v) for k, v in hyperparameters.items()}
        (self.input_config / "hyperparameters.json").write_text(json.dumps(as_strings, indent=2))
        (self.input_config / "job.json").write_text(json.dumps(job, indent=2, default=str))
        (self.input_config / "resourceconfig.json").write_text(
            json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]})
        )

    def sm_env(self, root: Path, num_gpus: int = 0, num_cpus: int | None = None) -> dict[str, str]:
        """The SM_* variables with paths under `root`: the workspace itself (process runner)
        or /opt/ml (inside a container)."""
        hps = json.loads((self.input_config / "hyperparameters.json").read_text())
        channels = self.channels()
        env = {
            "SM_MODEL_DIR": str(root / "model"),
            "SM_INPUT_DIR": str(root / "input"),
            "SM_INPUT_CONFIG_DIR": str(root / "input" / "config"),
            "SM_OUTPUT_DIR": str(root / "output"),
            "SM_OUTPUT_DATA_DIR": str(root / "output" / "data"),
            "SM_CHECKPOINT_DIR": str(root / "checkpoints"),
            "SM_CHANNELS": json.dumps(channels),
            "SM_HPS": json.dumps(hps),
            "SM_NUM_GPUS": str(num_gpus),
            "SM_NUM_CPUS": str(num_cpus or os.cpu_count() or 1),
            "SM_CURRENT_HOST": "algo-1",
            "SM_HOSTS": json.dumps(["algo-1"]),
        }
        for name in channels:
            env[f"SM_CHANNEL_{name.upper()}"] = str(root / "input" / "data" / name)
        for key, value in hps.items():
            env[f"SM_HP_{key.upper()}"] = value
        return env


def _remove(path: Path) -> None:
    """Remove what is at `path`, never following a link (a link itself is unlinked)."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)  # fd-based on Linux: links inside are removed, not followed
