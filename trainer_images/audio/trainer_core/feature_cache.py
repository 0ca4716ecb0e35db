"""Decoded audio across retrains, by content: a retrain of the same model on the same or a grown
data set decodes only the clips it has not seen.

The worker stages the model's cache from the store as the `cache` channel and, after a job that
succeeded, stores what the trainer wrote to `$SM_OUTPUT_DIR/cache/` as the model's new cache
(trainer_images/CONTRACT.md). A cache is one file per sampling rate, so the store replaces it
whole (a reader never sees one job's index with another job's samples):

    audio-<rate>.cache
        8 bytes    MAGIC (the format and its version)
        8 bytes    the index's length in bytes, unsigned little-endian
        the index  JSON: {"format": "retrain-audio-cache", "version": 2, "rate": R, "samples": N,
                          "entries": {"<sha256 of the file's bytes>": [offset, samples], ...}}
        padding    zeros up to a multiple of 64 bytes
        samples    N float32 little-endian: the decoded clips, one after another (the file ends here)

Only numbers are read (JSON, and raw samples through a read-only memmap): nothing in a cache is
executed or unpickled. A cache is outside input like any other: its index is bounded and checked
(every entry inside the samples, the file exactly as long as its index says), a clip it returns
is checked finite, and anything malformed makes the whole cache ignored, never the job failed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from pathlib import Path

import numpy as np

from .manifest import Clip
from .progress import log

FORMAT = "retrain-audio-cache"
VERSION = 2
MAGIC = b"RTRNAC\x00\x02"
ALIGN = 64
MAX_INDEX_BYTES = 64 * 1024 * 1024
MAX_ENTRIES = 1_000_000
MAX_CACHE_BYTES = 4 * 1024**3  # a job with more decoded audio than this writes no cache
DIGEST = re.compile(r"[0-9a-f]{64}")


def file_digest(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:  # a clip is usually one read
        while chunk := f.read(1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def cache_name(rate: int) -> str:
    return f"audio-{rate}.cache"


def _data_offset(index_bytes: int) -> int:
    return -(-(16 + index_bytes) // ALIGN) * ALIGN


class AudioCache:
    """The staged cache of one sampling rate (empty when there is none, or it is not usable)."""

    def __init__(self, entries: dict[str, tuple[int, int]], data: np.ndarray | None, rate: int, path: Path | None = None):
        self.entries, self.data, self.rate, self.path = entries, data, rate, path
        self.taken: set[str] = set()  # the digests this job took from it

    @classmethod
    def open(cls, channel: Path | None, rate: int) -> AudioCache:
        empty = cls({}, None, rate)
        path = channel / cache_name(rate) if channel is not None else None
        if path is None or not path.is_file():
            return empty
        try:
            with path.open("rb") as f:
                head = f.read(16)
                if len(head) != 16 or head[:8] != MAGIC:
                    raise ValueError("not a retrain audio cache of this version")
                (length,) = struct.unpack("<Q", head[8:])
                if length > MAX_INDEX_BYTES:
                    raise ValueError(f"the index is over {MAX_INDEX_BYTES} bytes")
                raw_index = f.read(length)
            index = json.loads(raw_index)
            if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("rate") != rate:
                raise ValueError("not a retrain audio cache of this sampling rate")
            total, raw = index.get("samples"), index.get("entries")
            if type(total) is not int or total < 0 or not isinstance(raw, dict) or len(raw) > MAX_ENTRIES:
                raise ValueError("the index has no sample count or no mapping of at most MAX_ENTRIES entries")
            offset = _data_offset(length)
            if path.stat().st_size != offset + 4 * total:
                raise ValueError("the file is not as long as its index says")
            entries = {}
            for digest, span in raw.items():
                if not (isinstance(digest, str) and DIGEST.fullmatch(digest) and isinstance(span, list) and len(span) == 2
                        and all(type(v) is int for v in span) and span[0] >= 0 and span[1] > 0 and sum(span) <= total):
                    raise ValueError(f"entry {str(digest)[:70]!r} is malformed or outside the samples")
                entries[digest] = (span[0], span[1])
            data = np.memmap(path, dtype="<f4", mode="r", offset=offset, shape=(total,)) if total else None
        except (OSError, ValueError, UnicodeDecodeError, struct.error) as e:
            log(f"feature cache ignored: {e}")
            return empty
        log(f"feature cache: {len(entries)} decoded clips at {rate} Hz from earlier jobs")
        return cls(entries, data, rate, path)

    def get(self, digest: str) -> np.ndarray | None:
        span = self.entries.get(digest)
        if span is None or self.data is None:
            return None
        audio = np.array(self.data[span[0] : span[0] + span[1]], dtype=np.float32)
        if not np.all(np.isfinite(audio)):
            return None
        self.taken.add(digest)
        return audio

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
        target = dest / cache_name(self.rate)
        if self.path is not None and unique.keys() == self.taken == self.entries.keys():
            _link_or_copy(self.path, target)  # nothing new, nothing dropped: the staged cache as it is
            log(f"feature cache kept: {len(unique)} clips, all from the staged cache")
            return
        entries, offset = {}, 0
        for digest in sorted(unique):
            entries[digest] = [offset, len(unique[digest])]
            offset += len(unique[digest])
        index = json.dumps({"format": FORMAT, "version": VERSION, "rate": self.rate, "samples": offset, "entries": entries},
                           separators=(",", ":")).encode()
        tmp = dest / f".{cache_name(self.rate)}.tmp"
        with tmp.open("wb") as f:
            f.write(MAGIC + struct.pack("<Q", len(index)) + index)
            f.write(b"\0" * (_data_offset(len(index)) - 16 - len(index)))
            for digest in sorted(unique):
                f.write(np.ascontiguousarray(unique[digest], dtype="<f4").data)
        os.replace(tmp, target)
        log(f"feature cache written: {len(entries)} clips, {size / 1e6:.1f} MB")


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another filesystem (the cache channel mounted apart)
        shutil.copyfile(src, dst)
