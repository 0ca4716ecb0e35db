"""The feature cache (trainer_core/feature_cache.py) as a retrain sees it: the trainer leaves the
decoded clips in $SM_OUTPUT_DIR/cache, the next job of the model gets them as its `cache`
channel (the worker's part: tests/integration), and decodes only the clips it has not seen."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import soundfile as sf

from tests.trainer.test_audio_trainer import HPS, Workspace, sw

WORDS = ["yes", "no"]
ONE_EPOCH = {**HPS, "epochs": "1"}


MAGIC = b"RTRNAC\x00\x02"


def read_cache(path: Path) -> tuple[dict, np.ndarray]:
    """The format as trainer_core/feature_cache.py documents it: magic, index length, JSON index,
    padding to 64 bytes, float32 samples."""
    raw = path.read_bytes()
    assert raw[:8] == MAGIC
    (length,) = struct.unpack("<Q", raw[8:16])
    index = json.loads(raw[16 : 16 + length])
    offset = -(-(16 + length) // 64) * 64
    samples = np.frombuffer(raw[offset:], dtype="<f4")
    assert len(samples) == index["samples"]
    return index, samples


def write_cache(path: Path, index: dict, samples: bytes) -> None:
    body = json.dumps(index).encode()
    head = MAGIC + struct.pack("<Q", len(body)) + body
    path.write_bytes(head + b"\0" * (-len(head) % 64) + samples)


def _run(ws: Workspace) -> str:
    result = ws.run()
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def test_a_retrain_on_a_grown_data_set_decodes_only_the_new_clips(tmp_path):
    data = tmp_path / "data"
    sw.make_dataset(data, WORDS, sw.TRAIN_VOICES[:4], repeats=2, seed=3)  # 16 clips
    first = Workspace(tmp_path / "first", data, ONE_EPOCH)
    assert "16 decoded, 0 from the feature cache" in _run(first)
    cache = first.root / "output" / "cache"
    assert sorted(p.name for p in cache.iterdir()) == ["audio-16000.cache"]

    # What the cache holds is what decoding gives: the samples of each file, by its content.
    index, samples = read_cache(cache / "audio-16000.cache")
    assert len(index["entries"]) == 16 and sum(n for _, n in index["entries"].values()) == len(samples)
    wav = next((data / "clips").rglob("*.wav"))
    offset, n = index["entries"][hashlib.sha256(wav.read_bytes()).hexdigest()]
    assert np.array_equal(samples[offset : offset + n], sf.read(wav, dtype="float32")[0])

    grown = tmp_path / "grown"
    shutil.copytree(data, grown)
    sw.make_dataset(grown, WORDS, sw.TRAIN_VOICES[4:6], repeats=2, seed=3, append=True)  # 8 new clips
    second = Workspace(tmp_path / "second", grown, ONE_EPOCH)
    shutil.copytree(cache, second.root / "input" / "data" / "cache")
    assert "8 decoded, 16 from the feature cache" in _run(second)
    assert len(read_cache(second.root / "output/cache/audio-16000.cache")[0]["entries"]) == 24

    # A retrain on the same data takes every clip from the cache and leaves it as it was.
    third = Workspace(tmp_path / "third", grown, ONE_EPOCH)
    shutil.copytree(second.root / "output/cache", third.root / "input" / "data" / "cache")
    log = _run(third)
    assert "0 decoded, 24 from the feature cache" in log and "feature cache kept: 24 clips" in log
    assert (third.root / "output/cache/audio-16000.cache").read_bytes() == (second.root / "output/cache/audio-16000.cache").read_bytes()


def test_a_damaged_or_hostile_cache_is_ignored_and_the_job_decodes(tmp_path):
    data = tmp_path / "data"
    sw.make_dataset(data, WORDS, sw.TRAIN_VOICES[:2], repeats=2, seed=4)  # 8 clips
    zeros = b"\0" * 400
    well_formed = {"format": "retrain-audio-cache", "version": 2, "rate": 16000, "samples": 100}
    for name, index in [("outside the data", {**well_formed, "entries": {"a" * 64: [0, 10**9]}}),
                        ("shorter than its index", {**well_formed, "samples": 1000, "entries": {"a" * 64: [0, 10]}}),
                        ("not-json", None)]:
        ws = Workspace(tmp_path / name.replace(" ", "-"), data, ONE_EPOCH)
        cache = ws.root / "input" / "data" / "cache"
        cache.mkdir(parents=True)
        if index is None:
            (cache / "audio-16000.cache").write_bytes(MAGIC + struct.pack("<Q", 9) + b"{not json" + zeros)
        else:
            write_cache(cache / "audio-16000.cache", index, zeros)
        log = _run(ws)
        assert "feature cache ignored" in log and "8 decoded, 0 from the feature cache" in log
