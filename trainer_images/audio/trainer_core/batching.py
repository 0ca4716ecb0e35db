"""Batches of clips of similar length, the same way for every trainer (a batch is padded to its
longest clip, so mixing a 1 s word with a 20 s sentence wastes most of the compute)."""

from __future__ import annotations

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


def sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Evaluation: every index once, shortest first, in batches of neighbours in length."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
