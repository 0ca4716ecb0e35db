"""The feature cache's trips through the store (the trainer's side: trainer_images/audio/trainer_core/
feature_cache.py). Before a job of a built-in audio trainer, the model's cache (the decoded audio
of its last job) is staged as the `cache` channel; after the job succeeded, what the trainer left
in output/cache becomes the model's cache. Only the cache files' own names are moved, within
RETRAIN_FEATURE_CACHE_MAX_BYTES, and a cache that cannot be staged or stored costs decoding
time, never the job: the trainer checks every byte of it as outside input.

A bring-your-own image never gets nor writes a cache: the cache is read by the built-in trainers
of the same tenant's later jobs, so only what they wrote goes in.
"""

import logging
import re
import shutil
from pathlib import Path

from jobs.spec import JobMessage, Task
from models_store import ModelStore
from worker.outputs import copy_tree

log = logging.getLogger(__name__)

CACHE_FILE = re.compile(r"audio-[0-9]{4,6}\.cache")
TASKS = (Task.audio_classification, Task.asr)


def uses_feature_cache(message: JobMessage) -> bool:
    return message.spec.image is None and message.trainer == "audio" and message.spec.task in TASKS


def stage_feature_cache(store: ModelStore, message: JobMessage, channel: Path, max_bytes: int) -> None:
    prefix = store.feature_cache_prefix(message.spec.model_name)
    keys = [k for k in store.list_keys(prefix) if CACHE_FILE.fullmatch(k[len(prefix):])]
    if not keys:
        return
    if sum(store.size(k) for k in keys) > max_bytes:
        log.warning("job %s: the feature cache of %s is over %d bytes; not staged", message.job_id,
                    message.spec.model_name, max_bytes)
        return
    channel.mkdir(parents=True, exist_ok=True)
    for key in keys:
        store.download(key, channel / key[len(prefix):])


def collect_feature_cache(workspace_root: Path, dest: Path, max_bytes: int) -> None:
    """The trainer's output/cache, copied link-free and bounded (an over-large one is dropped)."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        copy_tree(workspace_root, "output/cache", dest, max_files=8, max_bytes=max_bytes)
    except Exception as err:  # noqa: BLE001 - a cache too large or odd is simply not kept
        log.warning("feature cache not taken: %s", err)
        shutil.rmtree(dest, ignore_errors=True)


def publish_feature_cache(store: ModelStore, model_name: str, collected: Path) -> None:
    if not collected.is_dir():
        return
    files = sorted(p for p in collected.iterdir() if p.is_file() and CACHE_FILE.fullmatch(p.name))
    if not files:
        return
    prefix = store.feature_cache_prefix(model_name)
    for path in files:  # one object per rate: replaced whole, never read half old, half new
        store.put_file(prefix + path.name, path)
    kept = {prefix + p.name for p in files}
    for key in set(store.list_keys(prefix)) - kept:  # other rates' caches, or an older format's files
        store.delete(key)
