#!/usr/bin/env python3
"""A spoken-keyword data set made with espeak-ng and sox, for the demo, the tests and the benchmarks.

Every word is spoken by every voice; each voice is an espeak-ng accent plus a voice variant
(`en-us+m3`) at a speaking rate and pitch. The held-out voices use accents *and* variants that
never appear in the training voices, so accuracy on them measures generalisation to speakers the
model never heard, which is what a user cares about.

Clips are mono 16 kHz 16-bit WAV, trimmed of espeak's silence, padded with a short random
silence and set to a random level, so a model cannot key on clip length or loudness.

    python demo/spoken_words.py OUT_DIR [--words yes no ...] [--repeats 2] [--heldout]

Only the standard library is used (the service environment runs it too); espeak-ng and sox do
the audio work in subprocesses, run in parallel threads.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

SAMPLE_RATE = 16_000

DEFAULT_WORDS: list[str] = ["yes", "no", "up", "down", "left", "right", "stop", "go"]


@dataclass(frozen=True)
class Voice:
    name: str  # espeak-ng voice, with an optional "+variant" (e.g. "en-us+m3"), or "flite:<voice>"
    speed: int = 160  # words per minute
    pitch: int = 50  # 0-99

    @property
    def slug(self) -> str:
        """A file-name-safe identifier: en-us+m3 at 160 wpm, pitch 50 -> en-us_m3_s160_p50."""
        base = re.sub(r"[^A-Za-z0-9-]+", "_", self.name)
        return f"{base}_s{self.speed}_p{self.pitch}"


# Training voices: three accents (American, British, Received Pronunciation) with the variants
# m1..m4, f1, f2 at a spread of rates and pitches.
TRAIN_VOICES: list[Voice] = [
    Voice("en-us+m1", 150, 45),
    Voice("en-us+m3", 170, 55),
    Voice("en-us+f1", 160, 60),
    Voice("en-us+f2", 145, 65),
    Voice("en-gb+m2", 175, 40),
    Voice("en-gb+f1", 155, 50),
    Voice("en-gb-x-rp+m4", 165, 35),
    Voice("en-gb-x-rp+f2", 150, 55),
]

# Held-out voices: accents and variants that no training voice uses.
HELDOUT_VOICES: list[Voice] = [
    Voice("en-gb-scotland+m5", 160, 50),
    Voice("en-029+f3", 150, 60),
    Voice("en-gb-x-gbclan+m6", 170, 45),
    Voice("en-us-nyc+f4", 155, 55),
    Voice("en-gb-x-gbcwmd+m7", 165, 40),
]


# More training speakers of the same engine: espeak-ng's Klatt-synthesiser and named variants, in
# the training accents only (none of the held-out accents or variants). The out-of-domain
# benchmark trains on these as well: more speakers is what makes a keyword model generalise
# (bench/README.md, KWS out of domain: 24 voices gave 0.82-0.88 on another engine's voices, 60
# gave 0.93-0.98, these 74 0.96).
def _variants(accents: list[tuple[str, int, int]], variants: list[str]) -> list[Voice]:
    """Each variant in the next of `accents` (accent, words per minute, pitch), round robin."""
    return [Voice(f"{accent}+{variant}", speed, pitch)
            for (accent, speed, pitch), variant in zip(accents * len(variants), variants)]


EXTRA_TRAIN_VOICES: list[Voice] = _variants(
    [("en-us", 150, 50), ("en-gb", 165, 45), ("en-gb-x-rp", 155, 60), ("en-us", 175, 40)],
    ["klatt", "klatt2", "klatt3", "klatt4", "david", "john", "linda", "paul",
     "robert", "steph", "andy", "annie", "edward", "max", "michael", "belinda"],
) + _variants(
    [("en-us", 160, 50), ("en-gb", 150, 45), ("en-gb-x-rp", 170, 55), ("en-us", 140, 60)],
    ["adam", "Alex", "Alicia", "Andrea", "anika", "antonio", "aunty", "benjamin", "boris", "caleb", "Denis", "ed",
     "edward2", "gustave", "iven", "iven2", "Jacky", "Lee", "marcelo", "Mario", "michel", "miguel", "norbert", "pablo",
     "pedro", "quincy", "rob", "sandro", "shelby", "steph2", "travis", "victor", "zac", "m8", "f5", "grandma"],
) + _variants(
    [("en-gb", 150, 45), ("en-gb-x-rp", 170, 55), ("en-us", 140, 60), ("en-us", 160, 50)],
    ["Diogo", "Gene", "Gene2", "Henrique", "Hugo", "iven3", "iven4", "Marco", "Mike", "Nguyen", "steph3", "klatt5",
     "klatt6", "grandpa"],
)


# Another engine: flite's voices (Debian's `flite`), which espeak-ng's formant synthesis never
# sounds like (rms and awb are recorded speakers, a US and a Scottish man). Test only: a model
# trained on espeak-ng voices that recognises them has learned the words, not the synthesiser.
OTHER_ENGINE_VOICES: list[Voice] = [
    Voice("flite:rms", 160, 50),
    Voice("flite:awb", 160, 50),
]


def _variant(voice_name: str) -> str:
    return voice_name.split("+", 1)[1] if "+" in voice_name else ""


def _accent(voice_name: str) -> str:
    return voice_name.split("+", 1)[0]


assert not {_accent(v.name) for v in TRAIN_VOICES} & {_accent(v.name) for v in HELDOUT_VOICES}
assert not {_variant(v.name) for v in TRAIN_VOICES + EXTRA_TRAIN_VOICES} & {_variant(v.name) for v in HELDOUT_VOICES}
assert not {_accent(v.name) for v in EXTRA_TRAIN_VOICES} & {_accent(v.name) for v in HELDOUT_VOICES}


def check_tools(voices: Sequence[Voice] = ()) -> None:
    tools = ["espeak-ng", "sox"] + (["flite"] if any(v.name.startswith("flite:") for v in voices) else [])
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"{' and '.join(missing)} not found on PATH: install them (apt-get install {' '.join(missing)})")


def _synthesise(word: str, voice: Voice, speed: int, pitch: int) -> bytes:
    """The word as WAV bytes from the voice's engine, at `speed` words per minute and `pitch` (0-99)."""
    if voice.name.startswith("flite:"):
        # flite has no rate in words per minute: its duration stretch is relative to the voice's own
        # pace (160 wpm taken as 1.0); its pitch is a mean F0 in Hz around the voice's own (~110 Hz).
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "word.wav"
            subprocess.run(["flite", "-voice", voice.name.split(":", 1)[1], "-t", word, "-o", str(out),
                            "--setf", f"duration_stretch={160 / speed:.3f}",
                            "--setf", f"int_f0_target_mean={80 + 0.8 * pitch:.0f}"], check=True, capture_output=True)
            return out.read_bytes()
    return subprocess.run(["espeak-ng", "-v", voice.name, "-s", str(speed), "-p", str(pitch), "--stdout", word],
                          check=True, capture_output=True).stdout


def _speak(word: str, voice: Voice, speed: int, pitch: int, lead: float, tail: float, gain_db: float, dest: Path) -> None:
    """The engine -> sox: resample to 16 kHz mono 16-bit, trim the silence, pad, set the level (-R: a
    repeatable dither, so the same seed makes the same bytes)."""
    wav = _synthesise(word, voice, speed, pitch)
    dest.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["sox", "-R", "-q", "-t", "wav", "-", "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", "-e", "signed-integer", str(dest),
         # trim leading and (via reverse) trailing silence below -50 dB
         "silence", "1", "0.01", "-50d", "reverse", "silence", "1", "0.01", "-50d", "reverse",
         "pad", f"{lead:.3f}", f"{tail:.3f}",
         "gain", "-n", f"{gain_db:.1f}"],
        input=wav,
        check=True,
        capture_output=True,
    )


def _read_rows(csv_path: Path) -> list[dict[str, str]]:
    with csv_path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def make_dataset(
    out_dir: Path,
    words: Sequence[str] = DEFAULT_WORDS,
    voices: Sequence[Voice] = TRAIN_VOICES,
    repeats: int = 1,
    seed: int = 0,
    split: str | None = None,
    append: bool = False,
    workers: int | None = None,
) -> Path:
    """Speak every word in every voice `repeats` times and write `out_dir/dataset.csv`.

    Each repeat jitters the rate (±8%) and pitch (±6) a little, as the same speaker never says a
    word twice the same way. The CSV has `audio,label` (paths relative to `out_dir`) and a
    `split` column when any row has one. With `append=True` the rows are added to an existing
    dataset.csv (rows that had no split get an empty one), so a caller can put training voices
    and held-out voices with split labels in one file. Returns the CSV's path.
    """
    check_tools(voices)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "dataset.csv"
    rows: list[dict[str, str]] = _read_rows(csv_path) if append and csv_path.exists() else []

    tasks = []
    for word in words:
        word_slug = re.sub(r"[^A-Za-z0-9-]+", "_", word).strip("_") or "word"
        for voice in voices:
            for r in range(repeats):
                # A string seed is hashed deterministically by `random`, unlike hash().
                rng = random.Random(f"{seed}:{word}:{voice.name}:{voice.speed}:{voice.pitch}:{r}")
                speed = round(voice.speed * rng.uniform(0.92, 1.08))
                pitch = min(99, max(0, voice.pitch + rng.randint(-6, 6)))
                lead, tail = rng.uniform(0.03, 0.2), rng.uniform(0.03, 0.2)
                gain_db = rng.uniform(-20.0, -1.0)
                rel = Path("clips") / (split or "all") / word_slug / f"{voice.slug}_r{r}_seed{seed}.wav"
                tasks.append((word, voice, speed, pitch, lead, tail, gain_db, rel))

    def run(task):
        word, voice, speed, pitch, lead, tail, gain_db, rel = task
        _speak(word, voice, speed, pitch, lead, tail, gain_db, out_dir / rel)

    # espeak-ng and sox are separate processes: threads are enough to keep every core busy.
    with ThreadPoolExecutor(max_workers=workers or max(2, 2 * (os.cpu_count() or 1))) as pool:
        list(pool.map(run, tasks))

    for word, *_, rel in tasks:
        row = {"audio": rel.as_posix(), "label": word}
        if split is not None:
            row["split"] = split
        rows.append(row)

    fields = ["audio", "label"] + (["split"] if any(row.get("split") for row in rows) else [])
    tmp = csv_path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore", restval="")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(csv_path)
    return csv_path


def zip_clips(out_dir: Path, csv: Path, zip_path: Path) -> Path:
    """A zip of the clips `csv` names, stored under the same relative paths the CSV uses."""
    out_dir, zip_path = Path(out_dir), Path(zip_path)
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for row in _read_rows(Path(csv)):
            rel = row["audio"]
            if rel not in seen:
                seen.add(rel)
                zf.write(out_dir / rel, arcname=rel)
    return zip_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--words", nargs="+", default=DEFAULT_WORDS)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--heldout",
        action="store_true",
        help="also speak the words in the held-out voices, as split=test; training-voice rows get an "
        "empty split so the trainer divides them into train and validation",
    )
    parser.add_argument("--zip", type=Path, default=None, help="also write a zip of the clips here")
    args = parser.parse_args(argv)

    csv_path = make_dataset(args.out_dir, args.words, TRAIN_VOICES, repeats=args.repeats, seed=args.seed)
    if args.heldout:
        csv_path = make_dataset(
            args.out_dir, args.words, HELDOUT_VOICES, repeats=1, seed=args.seed, split="test", append=True
        )
    n = len(_read_rows(csv_path))
    print(f"{n} clips, {len(args.words)} words -> {csv_path}")
    if args.zip:
        print(f"zip -> {zip_clips(args.out_dir, csv_path, args.zip)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
