"""Decoded audio across retrains, by content: a retrain of the same model on the same or a grown
data set decodes only the clips it has not seen.

The worker stages the model's cache from the store as the `cache` channel and, after a job that
succeeded, stores what the trainer wrote to `$SM_OUTPUT_DIR/cache/` as the model's new cache
(trainer_images/CONTRACT.md). A cache is a pair of files per sampling rate:

    audio-<rate>.json   {"format": "retrain-audio-cache", "version": 1, "rate": R, "data_sha256": ...,
                         "entries": {"<sha256 of the file's bytes>": [offset, samples], ...}}
    audio-<rate>.f32    the decoded clips, float32 little-endian, one after another

Only numbers are read (JSON, and raw samples through a read-only memmap): nothing in a cache is
executed or unpickled. A cache is outside input like any other: its index is bounded and checked
(every entry inside the data file, the data file the one the index was written with: the
store's pair may be half replaced by a concurrent job), a clip it returns is checked finite, and
anything malformed makes the whole cache ignored, never the job failed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from .manifest import Clip
from .progress import log

FORMAT = "retrain-audio-cache"
MAX_INDEX_BYTES = 64 * 1024 * 1024
MAX_ENTRIES = 1_000_000
MAX_CACHE_BYTES = 4 * 1024**3  # a job with more decoded audio than this writes no cache
DIGEST = re.compile(r"[0-9a-f]{64}")


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1024 * 1024), b""):
            h.update(chunk)
    return h.hexdigest()


class AudioCache:
    """The staged cache of one sampling rate (empty when there is none, or it is not usable)."""

    def __init__(self, entries: dict[str, tuple[int, int]], data: np.ndarray | None, rate: int):
        self.entries, self.data, self.rate = entries, data, rate

    @classmethod
    def open(cls, channel: Path | None, rate: int) -> AudioCache:
        empty = cls({}, None, rate)
        if channel is None:
            return empty
        index_path, data_path = channel / f"audio-{rate}.json", channel / f"audio-{rate}.f32"
        if not index_path.is_file() or not data_path.is_file():
            return empty
        try:
            if index_path.stat().st_size > MAX_INDEX_BYTES:
                raise ValueError(f"the index is over {MAX_INDEX_BYTES} bytes")
            index = json.loads(index_path.read_text())
            if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("rate") != rate:
                raise ValueError("not a retrain audio cache of this sampling rate")
            raw = index.get("entries")
            if not isinstance(raw, dict) or len(raw) > MAX_ENTRIES:
                raise ValueError("the entries are not a mapping of at most MAX_ENTRIES")
            total = data_path.stat().st_size // 4
            if index.get("data_sha256") != file_digest(data_path):
                raise ValueError("its samples are not the ones its index was written with")
            entries = {}
            for digest, span in raw.items():
                if not (isinstance(digest, str) and DIGEST.fullmatch(digest) and isinstance(span, list) and len(span) == 2
                        and all(type(v) is int for v in span) and span[0] >= 0 and span[1] > 0 and sum(span) <= total):
                    raise ValueError(f"entry {str(digest)[:70]!r} is malformed or outside the data")
                entries[digest] = (span[0], span[1])
            data = np.memmap(data_path, dtype="<f4", mode="r") if total else None
        except (OSError, ValueError, UnicodeDecodeError) as e:
            log(f"feature cache ignored: {e}")
            return empty
        log(f"feature cache: {len(entries)} decoded clips at {rate} Hz from earlier jobs")
        return cls(entries, data, rate)

    def get(self, digest: str) -> np.ndarray | None:
        span = self.entries.get(digest)
        if span is None or self.data is None:
            return None
        audio = np.array(self.data[span[0] : span[0] + span[1]], dtype=np.float32)
        return audio if np.all(np.isfinite(audio)) else None

    def save(self, dest: Path, clips: list[Clip]) -> None:
        """This job's decoded clips (each distinct file once) as the cache for the next job."""
        unique: dict[str, np.ndarray] = {}
        for c in clips:
            if c.digest and c.audio is not None and c.rate == self.rate:
                unique.setdefault(c.digest, c.audio)
        size = 4 * sum(len(a) for a in unique.values())
        if not unique or size > MAX_CACHE_BYTES:
            log(f"feature cache not written: {size} bytes of decoded audio" if unique else "feature cache: nothing to write")
            return
        dest.mkdir(parents=True, exist_ok=True)
        entries, offset = {}, 0
        tmp = dest / f".audio-{self.rate}.f32.tmp"
        with tmp.open("wb") as f:
            for digest in sorted(unique):
                audio = np.ascontiguousarray(unique[digest], dtype="<f4")
                f.write(audio.tobytes())
                entries[digest] = [offset, len(audio)]
                offset += len(audio)
        os.replace(tmp, dest / f"audio-{self.rate}.f32")
        index = {"format": FORMAT, "version": 1, "rate": self.rate,
                 "data_sha256": file_digest(dest / f"audio-{self.rate}.f32"), "entries": entries}
        (dest / f"audio-{self.rate}.json").write_text(json.dumps(index, separators=(",", ":")))
        log(f"feature cache written: {len(entries)} clips, {size / 1e6:.1f} MB")
