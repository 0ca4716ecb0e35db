"""A base model directory from a user or the store, loaded as data only.

What a model directory may contain is checked before transformers sees it, because loading is
where code would run: no `auto_map` (custom modelling code fetched or imported by
trust_remote_code), no Python files, and weights only as safetensors (a `pytorch_model.bin` is a
pickle, and unpickling runs code). transformers is then called with SAFE_LOAD, so it can neither
import code nor reach a hub.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import TrainerError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SAFE_LOAD = {"trust_remote_code": False, "local_files_only": True}


def find_config_dir(channel: Path | None) -> Path | None:
    """The folder holding config.json: the channel itself, or its one subfolder that has one (an
    archive of a folder). None when there is no such single folder."""
    if channel is None or not channel.is_dir():
        return None
    if (channel / "config.json").is_file():
        return channel
    found = sorted(p.parent for p in channel.glob("*/config.json"))
    return found[0] if len(found) == 1 else None


def find_model_dir(channel: Path | None) -> Path | None:
    """The Hugging Face model directory in the model channel; None when there is no model (no
    channel, or an empty one); else a reason naming what is there."""
    found = find_config_dir(channel)
    if found is not None:
        return found
    if channel is None or not channel.is_dir() or not any(channel.iterdir()):
        return None
    files = sorted(p.relative_to(channel).as_posix() for p in channel.rglob("*") if p.is_file())[:12]
    raise TrainerError(
        f"The model channel does not hold one Hugging Face model directory (found: {', '.join(files) or 'nothing'}); "
        "expected config.json and model.safetensors (and the processor files), saved with save_pretrained, at the "
        "top or in one folder."
    )


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise TrainerError(f"Base model {path.name} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise TrainerError(f"Base model {path.name} is not a JSON object.")
    return value


def check_model_dir(directory: Path, required: tuple[str, ...] = ()) -> dict:
    """Refuse anything that would make loading run code, and a directory without the `required`
    files (with what each is for). Returns config.json."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    names = [p.relative_to(directory).as_posix() for p in files]
    python = [n for n in names if n.endswith(".py")]
    if python:
        raise TrainerError(
            f"The base model directory contains Python code ({', '.join(python[:5])}). Model uploads are data "
            "only: custom modelling code is never run here (no trust_remote_code). Upload a model whose "
            "architecture transformers provides, saved with save_pretrained."
        )
    config = _read_json(directory / "config.json")
    for path in files:
        # Any JSON a transformers loader reads (config, preprocessor, tokenizer...) may carry an
        # auto_map; other JSON (labels.json, a list) is only data.
        if path.suffix == ".json" and path.stat().st_size < 10_000_000:
            try:
                doc = json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError):
                continue  # not JSON transformers could read either
            if isinstance(doc, dict) and "auto_map" in doc:
                raise TrainerError(
                    f"The base model's {path.relative_to(directory)} has an `auto_map`: it asks for custom code "
                    f"({', '.join(sorted(map(str, doc['auto_map'])))}) loaded with trust_remote_code, which is never "
                    "run here. Upload a model whose architecture transformers provides."
                )
    if not any(n.endswith(".safetensors") for n in names):
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise TrainerError(
                f"The base model's weights are only a pickle ({', '.join(pickles[:3])}); unpickling can run "
                "arbitrary code, so it is never loaded. Re-save the model with "
                "model.save_pretrained(dir, safe_serialization=True) to get model.safetensors."
            )
        raise TrainerError(f"The base model directory has no model.safetensors (files: {', '.join(names[:12])}).")
    if "model_type" not in config:
        raise TrainerError("The base model's config.json has no `model_type`, so transformers cannot tell its architecture.")
    for name in required:
        if not (directory / name).is_file():
            raise TrainerError(f"The base model directory has no {name}: {REQUIRED_WHY.get(name, 'it is needed')}.")
    return config


REQUIRED_WHY = {
    "preprocessor_config.json": "the feature extractor (sampling rate, normalisation) must come with the model; "
                                "save it with feature_extractor.save_pretrained(dir)",
}
