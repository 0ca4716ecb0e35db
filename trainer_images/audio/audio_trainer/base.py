"""Base models: continue training from a model this trainer wrote (config.json + model.safetensors).

The model channel holds either the extracted model directory of a stored version, or the user's
upload (a directory, or one .tar.gz/.tgz/.tar/.zip archive of it). Only safetensors weights are
read, never pickles. Anything that is not this trainer's format fails the job with a reason that
says what was found; Hugging Face and Keras bases are handled by other trainers.
"""

from __future__ import annotations

import json
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from safetensors.torch import load_file

from trainer_core.errors import TrainerError
from trainer_core.model_dir import find_config_dir
from trainer_core.progress import log

from . import FORMAT
from .model import KeywordCNN, ModelConfig

_ARCHIVES = (".tar.gz", ".tgz", ".tar", ".zip")


@dataclass
class BaseModel:
    config: ModelConfig
    raw_config: dict
    weights: dict[str, torch.Tensor]
    source: Path


def _safe_extract(archive: Path, dest: Path) -> None:
    """Extract regular files and folders only; refuse absolute paths, '..' and links."""
    def check(name: str) -> None:
        p = PurePosixPath(name)
        if p.is_absolute() or ".." in p.parts:
            raise TrainerError(f"Base model archive {archive.name}: entry {name!r} escapes the archive; refusing it.")

    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                check(name)
            zf.extractall(dest)
        return
    with tarfile.open(archive) as tf:
        members = []
        for m in tf.getmembers():
            check(m.name)
            if m.isfile() or m.isdir():
                members.append(m)
            else:
                log(f"base model archive: skipping {m.name!r} (not a regular file)")
        tf.extractall(dest, members=members, filter="data")


def _config_in(root: Path) -> Path | None:
    found = find_config_dir(root)
    return found / "config.json" if found is not None else None


def load_base(channel: Path) -> BaseModel:
    # An uploaded archive is unpacked into a temporary folder that lives only while the weights
    # are read (not into the checkpoint folder, which is kept between attempts).
    with tempfile.TemporaryDirectory(prefix="retrain-base-") as workdir:
        return _load_base(channel, Path(workdir))


def _load_base(channel: Path, workdir: Path) -> BaseModel:
    files = sorted(p.relative_to(channel).as_posix() for p in channel.rglob("*") if p.is_file())
    if not files:
        raise TrainerError("The model channel is empty: a base model was requested but no files were staged.")
    config_path = _config_in(channel)
    if config_path is None:
        archives = [channel / f for f in files if f.lower().endswith(_ARCHIVES)]
        if len(archives) == 1:
            extract_to = workdir / "extracted"
            extract_to.mkdir()
            try:
                _safe_extract(archives[0], extract_to)
            except (tarfile.TarError, zipfile.BadZipFile, OSError) as e:
                raise TrainerError(f"Base model archive {archives[0].name} could not be extracted: {e}") from None
            config_path = _config_in(extract_to)
    shown = ", ".join(files[:12]) + (" ..." if len(files) > 12 else "")
    if config_path is None:
        raise TrainerError(
            f"The model channel does not hold a model this trainer can continue from (found: {shown}). "
            f"Expected config.json (format {FORMAT!r}) and model.safetensors, as this trainer writes them."
        )
    try:
        raw = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise TrainerError(f"Base model config.json is not valid JSON: {e}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        kind = "a Hugging Face model" if isinstance(raw, dict) and ("architectures" in raw or "model_type" in raw) else "an unknown model"
        raise TrainerError(
            f"The base model is {kind} (config.json has format {raw.get('format') if isinstance(raw, dict) else None!r}, "
            f"files: {shown}); this trainer continues only its own {FORMAT!r} models. Hugging Face and Keras base "
            "models need their own trainers."
        )
    weights_path = config_path.parent / "model.safetensors"
    if not weights_path.is_file():
        raise TrainerError(f"The base model has config.json but no model.safetensors (files: {shown}).")
    try:
        config = ModelConfig.from_json(raw)
        if not config.labels or not all(isinstance(x, str) for x in config.labels):
            raise ValueError("labels must be a non-empty list of strings")
        weights = load_file(str(weights_path))
        # Building the model and loading strictly proves the weights fit the config.
        KeywordCNN(config).load_state_dict(weights, strict=True)
    except TrainerError:
        raise
    except Exception as e:  # noqa: BLE001 - any mismatch is the base model's fault
        raise TrainerError(f"The base model's weights do not match its config.json: {e}") from None
    log(f"base model: {config_path.parent} ({len(config.labels)} labels: {', '.join(config.labels)})")
    return BaseModel(config, raw, weights, config_path.parent)


def initialise_from_base(model: KeywordCNN, base: BaseModel) -> None:
    """Copy every base weight; head rows follow their labels, new labels keep their fresh init.

    The new model's labels may drop some of the base's and add others. A new label's bias is set
    to the mean of the copied biases so it starts neither favoured nor suppressed.
    """
    own = model.state_dict()
    for name, tensor in base.weights.items():
        if not name.startswith("head."):
            own[name] = tensor.clone()
    base_index = {label: i for i, label in enumerate(base.config.labels)}
    weight, bias = own["head.weight"].clone(), own["head.bias"].clone()
    copied = []
    for i, label in enumerate(model.config.labels):
        if label in base_index:
            weight[i] = base.weights["head.weight"][base_index[label]]
            bias[i] = base.weights["head.bias"][base_index[label]]
            copied.append(i)
    new = [i for i in range(len(model.config.labels)) if i not in copied]
    if copied and new:
        bias[new] = bias[copied].mean()
    own["head.weight"], own["head.bias"] = weight, bias
    model.load_state_dict(own)
    added = [model.config.labels[i] for i in new]
    dropped = [lab for lab in base.config.labels if lab not in model.config.labels]
    log(f"initialised from base: {len(copied)} head rows copied" + (f", new labels {added}" if added else "")
        + (f", labels not in this data dropped {dropped}" if dropped else ""))
