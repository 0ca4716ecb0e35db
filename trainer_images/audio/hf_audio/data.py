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



def length_buckets(lengths: list[int], batch_size: int, bucket_batches: int, generator: torch.Generator) -> list[list[int]]:
    """Batches of similar duration, in random order.

    Shuffle, cut into buckets of `bucket_batches` batches, sort each bucket by duration, cut it
    into batches, shuffle the batches. Each batch is then padded only to its own longest clip,
    which is nearly everyone's length, instead of the longest clip of the data set; the
    shuffling keeps batch composition and order random from epoch to epoch.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    bucket = batch_size * bucket_batches
    batches = []
    for start in range(0, len(order), bucket):
        chunk = sorted(order[start : start + bucket], key=lambda i: lengths[i], reverse=True)
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


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
