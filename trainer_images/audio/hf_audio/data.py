"""Audio at the base model's sampling rate, batched by length.

The CSV reading and decoding are every trainer's (trainer_core.manifest, trainer_core.audio), the
split is the CNN trainer's (`audio_trainer.data`): the same manifest rules, the same errors naming
the CSV line, the same stratified split with a fixed seed. Only the sampling rate differs: it is
the feature extractor's, because a pretrained encoder only understands audio at the rate it was
trained on.
"""

from __future__ import annotations

import numpy as np
import torch



class Collator:
    """Waveforms -> the model's inputs, through the base's own feature extractor.

    Extractors that pad to a fixed size themselves (Whisper: 30 s of log-mel; AST: 1024 frames)
    keep their own padding; waveform extractors (wav2vec2 family) pad to the longest clip of the
    batch. The attention mask is passed exactly when the extractor says the model wants one
    (`return_attention_mask`): wav2vec2-base-style models were trained on zero padding without it.
    """

    def __init__(self, feature_extractor, model):
        import inspect

        self.fe = feature_extractor
        self.rate = int(feature_extractor.sampling_rate)
        params = inspect.signature(feature_extractor.__call__).parameters
        default = params["padding"].default if "padding" in params else "max_length"
        self.kwargs: dict = {"padding": "longest"} if default in (False, "do_not_pad", "longest", True) else {}
        if "return_attention_mask" in params:
            self.kwargs["return_attention_mask"] = bool(getattr(feature_extractor, "return_attention_mask", False))
        accepted = set(inspect.signature(model.forward).parameters)
        self.accepted = accepted

    def __call__(self, waves: list[np.ndarray]) -> dict[str, torch.Tensor]:
        features = self.fe(waves, sampling_rate=self.rate, return_tensors="pt", **self.kwargs)
        return {k: v for k, v in features.items() if k in self.accepted}
