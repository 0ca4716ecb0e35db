"""Preparing a retrain's audio: the feature cache against the seed's way, in one run.

Three ways to get a data set's clips ready for training, each on the same clips:

    seed      librosa.load(path, sr=16000) + librosa.feature.melspectrogram, per clip (what the
              first trainer did before every training run)
    decode    trainer_core.audio.load_job_data with no cache: every clip decoded (a first job)
    cache     the same with the feature cache the first job left (a retrain of the same data):
              each file hashed, its samples read from the cache; and a retrain of a grown data
              set (the first job had 90% of the clips): the new 10% decoded, the cache rewritten

and prints clips per second of each and the ratios. The log-mel itself is computed by our models
on the fly (it is their first layer, on the GPU when there is one), so `decode` and `cache` end
where training starts, as `seed` did.

    .venv-trainer/bin/python bench/feature_cache.py [--clips-per-voice 2] [--format wav|mp3] [--seed-python PYTHON]

`--format mp3` re-encodes every clip as 44.1 kHz mp3 (ffmpeg), as phone recordings arrive: then
each clip is decoded by ffmpeg and resampled, which is what the cache saves a retrain.

`seed` needs librosa, which the trainer image does not: `--seed-python` names an interpreter that
has it (e.g. `python3 -m venv /tmp/lb && /tmp/lb/bin/pip install librosa soundfile`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "trainer_images" / "audio"))

SEED_WAY = textwrap.dedent("""
    import csv, json, sys, time
    from pathlib import Path
    import librosa
    root = Path(sys.argv[1])
    rows = list(csv.DictReader((root / "dataset.csv").open()))
    # The first clip also pays librosa's warm-up (numba compiling the mel code), as each job's
    # fresh trainer process did; it is timed apart.
    started = time.perf_counter()
    y, sr = librosa.load(root / rows[0]["audio"], sr=16000)
    librosa.feature.melspectrogram(y=y, sr=sr, n_fft=400, hop_length=160, n_mels=40)
    warm = time.perf_counter()
    for row in rows:
        y, sr = librosa.load(root / row["audio"], sr=16000)
        librosa.feature.melspectrogram(y=y, sr=sr, n_fft=400, hop_length=160, n_mels=40)
    print(json.dumps({"clips": len(rows), "seconds": time.perf_counter() - warm, "warm_up": warm - started}))
""")


def paths_for(data: Path, out: Path, cache: Path | None):
    from trainer_core.args import Paths

    return Paths(input_config_dir=out / "config", train_dir=data, validation_dir=None, base_model_dir=None,
                 model_dir=out / "model", output_dir=out / "output", output_data_dir=out / "output/data",
                 checkpoint_dir=out / "checkpoints", cache_dir=cache, num_gpus=0, num_cpus=None)


def ours(data: Path, out: Path, cache: Path | None) -> tuple[int, float]:
    from trainer_core.audio import load_job_data

    started = time.perf_counter()
    clips = load_job_data(paths_for(data, out, cache), "label")
    return len(clips), time.perf_counter() - started


def to_mp3(data: Path) -> None:
    import csv
    from concurrent.futures import ThreadPoolExecutor

    rows = list(csv.DictReader((data / "dataset.csv").open()))

    def convert(row: dict) -> None:
        wav = data / row["audio"]
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(wav), "-ar", "44100", "-b:a", "64k",
                        str(wav.with_suffix(".mp3"))], check=True)
        wav.unlink()
        row["audio"] = str(Path(row["audio"]).with_suffix(".mp3"))

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(convert, rows))
    with (data / "dataset.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\\n\\n")[0])
    ap.add_argument("--clips-per-voice", type=int, default=2, help="takes of each word by each training voice (74 voices x 8 words x 2 = 1184 clips)")
    ap.add_argument("--seed-python", default=sys.executable, help="an interpreter with librosa, for the seed's way")
    ap.add_argument("--format", choices=("wav", "mp3"), default="wav", help="the clips as 16 kHz wav, or as 44.1 kHz mp3")
    args = ap.parse_args()

    from bench.common import table
    from demo import spoken_words as sw

    work = Path(tempfile.mkdtemp(prefix="retrain-cache-bench-"))
    try:
        data = work / "data"
        sw.make_dataset(data, sw.DEFAULT_WORDS, sw.TRAIN_VOICES + sw.EXTRA_TRAIN_VOICES, repeats=args.clips_per_voice, seed=0)
        if args.format == "mp3":
            to_mp3(data)
        rows = []
        seed = subprocess.run([args.seed_python, "-c", SEED_WAY, str(data)], capture_output=True, text=True)
        if seed.returncode == 0:
            result = json.loads(seed.stdout.strip().splitlines()[-1])
            seed_rate = result["clips"] / result["seconds"]
            cold = result["seconds"] + result["warm_up"]
            rows.append(["seed, warmed: librosa.load + melspectrogram", result["clips"], round(result["seconds"], 2),
                         round(seed_rate, 1), 1.0])
            rows.append(["seed, in a fresh process (+ its warm-up)", result["clips"], round(cold, 2),
                         round(result["clips"] / cold, 1), round(result["clips"] / cold / seed_rate, 2)])
        else:
            seed_rate = None
            rows.append(["seed, warmed: librosa.load + melspectrogram", "", "not run: " + (seed.stderr.strip().splitlines() or ["?"])[-1], "", ""])
        n, first = ours(data, work / "first", None)
        n2, again = ours(data, work / "again", work / "first" / "output" / "cache")
        # A grown data set: the first job had 90% of the clips, the retrain has them all (10% decoded).
        smaller = work / "smaller"
        shutil.copytree(data, smaller)
        lines = (smaller / "dataset.csv").read_text().splitlines(keepends=True)
        (smaller / "dataset.csv").write_text("".join(lines[: 1 + (len(lines) - 1) * 9 // 10]))
        ours(smaller, work / "first-smaller", None)
        n3, grown = ours(data, work / "grown", work / "first-smaller" / "output" / "cache")
        for name, count, seconds in (("decode (first job, no cache)", n, first), ("cache (retrain, same data)", n2, again),
                                     ("cache (retrain, 10% new clips)", n3, grown)):
            rate = count / seconds
            rows.append([name, count, round(seconds, 2), round(rate, 1), round(rate / seed_rate, 1) if seed_rate else ""])
        print(f"{args.format} clips")
        print(table(["way", "clips", "seconds", "clips/s", "x seed (warmed)"], rows))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
