#!/usr/bin/env python3
"""A spoken digit-string data set for speech recognition, made with espeak-ng and sox.

Each utterance is a random string of 2-4 digit words ("three one four") spoken by one voice of
demo/spoken_words.py; the CSV has `audio,text` (paths relative to the output folder) and a `split`
column when one was asked for. The held-out voices (accents and voice variants never used by a
training voice) make an honest test split: WER on them measures speakers the model never heard.

    python demo/spoken_digits.py OUT_DIR [--n-per-voice 12] [--heldout] [--zip OUT.zip]

Only the standard library is used (the service environment runs it too); espeak-ng and sox do
the audio work in subprocesses, run in parallel threads.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

try:  # imported as demo.spoken_digits (tests, bench)
    from demo.spoken_words import HELDOUT_VOICES, TRAIN_VOICES, Voice, _read_rows, _speak, check_tools, zip_clips
except ModuleNotFoundError:  # run as a script: demo/ itself is on sys.path
    from spoken_words import HELDOUT_VOICES, TRAIN_VOICES, Voice, _read_rows, _speak, check_tools, zip_clips

DIGITS: list[str] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

__all__ = ["DIGITS", "HELDOUT_VOICES", "TRAIN_VOICES", "Voice", "digit_string", "make_digit_dataset", "zip_clips"]


def digit_string(rng: random.Random, length: tuple[int, int] = (2, 4)) -> str:
    """A random string of digit words, its length drawn uniformly from `length` (inclusive)."""
    n = rng.randint(length[0], length[1])
    return " ".join(rng.choice(DIGITS) for _ in range(n))


def make_digit_dataset(
    out_dir: Path,
    voices: Sequence[Voice] = TRAIN_VOICES,
    n_per_voice: int = 12,
    seed: int = 0,
    length: tuple[int, int] = (2, 4),
    split: str | None = None,
    append: bool = False,
    workers: int | None = None,
) -> Path:
    """Speak `n_per_voice` random digit strings in every voice and write `out_dir/dataset.csv`.

    The strings depend only on (seed, voice, index), so a data set is reproducible. Every utterance
    jitters the voice's rate (±8%) and pitch (±6) and gets a random silence before/after and a
    random level, as in spoken_words.py. With `append=True` the rows are added to an existing
    dataset.csv (rows without a split keep an empty one), so training voices and held-out voices
    with `split=test` can live in one file. Returns the CSV's path.
    """
    check_tools()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "dataset.csv"
    rows: list[dict[str, str]] = _read_rows(csv_path) if append and csv_path.exists() else []

    tasks = []
    for voice in voices:
        for i in range(n_per_voice):
            # A string seed is hashed deterministically by `random`, unlike hash().
            rng = random.Random(f"digits:{seed}:{voice.name}:{voice.speed}:{voice.pitch}:{i}")
            text = digit_string(rng, length)
            speed = round(voice.speed * rng.uniform(0.92, 1.08))
            pitch = min(99, max(0, voice.pitch + rng.randint(-6, 6)))
            lead, tail = rng.uniform(0.05, 0.25), rng.uniform(0.05, 0.25)
            gain_db = rng.uniform(-20.0, -1.0)
            rel = Path("clips") / (split or "all") / f"{voice.slug}_{i:03d}_seed{seed}.wav"
            tasks.append((text, voice, speed, pitch, lead, tail, gain_db, rel))

    def run(task):
        text, voice, speed, pitch, lead, tail, gain_db, rel = task
        _speak(text, voice, speed, pitch, lead, tail, gain_db, out_dir / rel)

    with ThreadPoolExecutor(max_workers=workers or max(2, 2 * (os.cpu_count() or 1))) as pool:
        list(pool.map(run, tasks))

    for text, *_, rel in tasks:
        row = {"audio": rel.as_posix(), "text": text}
        if split is not None:
            row["split"] = split
        rows.append(row)

    fields = ["audio", "text"] + (["split"] if any(row.get("split") for row in rows) else [])
    tmp = csv_path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore", restval="")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(csv_path)
    return csv_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--n-per-voice", type=int, default=12, help="utterances per training voice")
    parser.add_argument("--heldout-per-voice", type=int, default=6, help="utterances per held-out voice (with --heldout)")
    parser.add_argument("--min-length", type=int, default=2, help="fewest digits per utterance")
    parser.add_argument("--max-length", type=int, default=4, help="most digits per utterance")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--heldout",
        action="store_true",
        help="also speak digit strings in the held-out voices, as split=test; training-voice rows get an "
        "empty split so the trainer divides them into train and validation",
    )
    parser.add_argument("--zip", type=Path, default=None, help="also write a zip of the clips here")
    args = parser.parse_args(argv)
    if not 1 <= args.min_length <= args.max_length:
        parser.error("need 1 <= --min-length <= --max-length")

    length = (args.min_length, args.max_length)
    csv_path = make_digit_dataset(args.out_dir, TRAIN_VOICES, args.n_per_voice, args.seed, length)
    if args.heldout:
        csv_path = make_digit_dataset(args.out_dir, HELDOUT_VOICES, args.heldout_per_voice, args.seed, length,
                                      split="test", append=True)
    n = len(_read_rows(csv_path))
    print(f"{n} utterances -> {csv_path}")
    if args.zip:
        print(f"zip -> {zip_clips(args.out_dir, csv_path, args.zip)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
