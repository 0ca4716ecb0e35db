"""The base model: a Hugging Face model directory in the model channel, loaded as data only.

What a model directory may contain is checked before transformers sees it, because loading is
where code would run: no `auto_map` (custom modelling code fetched or imported by
trust_remote_code), no Python files, and weights only as safetensors (a `pytorch_model.bin` is a
pickle, and unpickling runs code). transformers is then called with `trust_remote_code=False`,
`local_files_only=True` and `use_safetensors=True`, so it can neither import code nor reach a hub.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trainer_core.errors import TrainerError
from trainer_core.progress import log

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SAFE_LOAD = {"trust_remote_code": False, "local_files_only": True}


@dataclass
class BaseModel:
    directory: Path
    raw_config: dict  # config.json as uploaded
    labels: list[str]  # the base's own labels when it already is a classifier, else []


def find_model_dir(channel: Path) -> Path:
    """config.json at the top of the channel, or in exactly one folder one level down (an archive
    of a folder): the same rule as the `train` dispatcher."""
    if (channel / "config.json").is_file():
        return channel
    found = sorted(p.parent for p in channel.glob("*/config.json"))
    if len(found) == 1:
        return found[0]
    files = sorted(p.relative_to(channel).as_posix() for p in channel.rglob("*") if p.is_file())[:12]
    raise TrainerError(
        f"The model channel does not hold one Hugging Face model directory (found: {', '.join(files) or 'nothing'}); "
        "expected config.json, model.safetensors and preprocessor_config.json, at the top or in one folder."
    )


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise TrainerError(f"Base model {path.name} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise TrainerError(f"Base model {path.name} is not a JSON object.")
    return value


def check_model_dir(directory: Path) -> dict:
    """Refuse anything that would make loading run code. Returns config.json."""
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
                    f"({', '.join(sorted(doc['auto_map']))}) loaded with trust_remote_code, which is never run here. "
                    "Upload a model whose architecture transformers provides."
                )
    safetensors = [n for n in names if n.endswith(".safetensors")]
    if not safetensors:
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
    if not (directory / "preprocessor_config.json").is_file():
        raise TrainerError(
            "The base model directory has no preprocessor_config.json: the feature extractor (sampling rate, "
            "normalisation) must come with the model. Save it with feature_extractor.save_pretrained(dir)."
        )
    return config


def _base_labels(config: dict) -> list[str]:
    """A base that already classifies (e.g. an earlier version of this model) keeps its label order;
    generic names (LABEL_0, ...) of a pretrained encoder are not labels."""
    id2label = config.get("id2label") or {}
    try:
        labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
    except (ValueError, TypeError):
        return []
    if not labels or all(lab == f"LABEL_{i}" for i, lab in enumerate(labels)):
        return []
    return labels


def inspect_base(channel: Path) -> BaseModel:
    directory = find_model_dir(channel)
    config = check_model_dir(directory)
    labels = _base_labels(config)
    log(f"base model: {directory} (model_type {config['model_type']}, architectures {config.get('architectures')})"
        + (f", labels {labels}" if labels else ""))
    return BaseModel(directory, config, labels)


def load_feature_extractor(base: BaseModel):
    from transformers import AutoFeatureExtractor

    try:
        return AutoFeatureExtractor.from_pretrained(str(base.directory), **SAFE_LOAD)
    except Exception as e:  # noqa: BLE001 - a broken upload is the user's to fix
        raise TrainerError(f"The base model's feature extractor (preprocessor_config.json) could not be loaded: {e}") from None


def load_model(base: BaseModel, labels: list[str]):
    """The base with a classification head for `labels`.

    The head is new when the label count differs (`ignore_mismatched_sizes`); rows of labels the
    base already had are then copied over, so retraining a stored version on more labels keeps
    what it knew.
    """
    from transformers import AutoConfig, AutoModelForAudioClassification

    id2label = dict(enumerate(labels))
    try:
        config = AutoConfig.from_pretrained(
            str(base.directory), num_labels=len(labels), id2label=id2label,
            label2id={label: i for i, label in id2label.items()}, finetuning_task="audio-classification", **SAFE_LOAD,
        )
    except Exception as e:  # noqa: BLE001
        raise TrainerError(f"The base model's config.json could not be read by transformers: {e}") from None
    try:
        model = AutoModelForAudioClassification.from_pretrained(
            str(base.directory), config=config, ignore_mismatched_sizes=True, use_safetensors=True, **SAFE_LOAD,
        )
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise TrainerError(
                f"model_type {base.raw_config.get('model_type')!r} has no audio-classification head in transformers "
                "(AutoModelForAudioClassification); use e.g. wav2vec2, hubert, wavlm, data2vec-audio, audio-spectrogram-"
                "transformer or whisper."
            ) from None
        raise TrainerError(f"The base model's weights could not be loaded: {e}") from None
    except Exception as e:  # noqa: BLE001
        raise TrainerError(f"The base model's weights could not be loaded: {e}") from None
    if base.labels and base.labels != labels:
        _copy_head_rows(model, base, labels)
    return model


def _copy_head_rows(model, base: BaseModel, labels: list[str]) -> None:
    """Head tensors whose first dimension is the label count: copy the rows of shared labels."""
    from safetensors import safe_open

    own = model.state_dict()
    old_index = {label: i for i, label in enumerate(base.labels)}
    shared = [(i, old_index[label]) for i, label in enumerate(labels) if label in old_index]
    copied = []
    for path in sorted(base.directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                target = key if key in own else None
                if target is None or own[target].shape[0] != len(labels):
                    continue
                old = f.get_tensor(key)
                if old.shape[0] != len(base.labels) or old.shape[1:] != own[target].shape[1:]:
                    continue
                for new_row, old_row in shared:
                    own[target][new_row] = old[old_row]
                copied.append(key)
    if copied:
        model.load_state_dict(own)
        log(f"head: rows of {len(shared)} labels the base knew copied into {', '.join(copied)}")
