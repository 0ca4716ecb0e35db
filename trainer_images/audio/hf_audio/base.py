"""The base model: a Hugging Face model directory in the model channel, loaded as data only
(trainer_core/model_dir.py checks it first); transformers is then called with SAFE_LOAD and
`use_safetensors=True`, so it can neither import code nor reach a hub.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer_core.errors import TrainerError
from trainer_core.model_dir import SAFE_LOAD, check_model_dir, find_model_dir
from trainer_core.progress import log

@dataclass
class BaseModel:
    directory: Path
    raw_config: dict  # config.json as uploaded
    labels: list[str]  # the base's own labels when it already is a classifier, else []


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
    if directory is None:
        raise TrainerError("Hugging Face fine-tuning needs a base model in the model channel, and it is empty.")
    config = check_model_dir(directory, required=("preprocessor_config.json",))
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
