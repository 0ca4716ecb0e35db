"""The demo client: builds a spoken-keyword data set with espeak-ng, submits it to the running
service, follows the job to the end, downloads the model and tries it, with onnxruntime alone,
on voices and accents the training never heard.

    make demo        (or: .venv/bin/python demo/run_demo.py --api http://127.0.0.1:8000)
"""

import argparse
import csv
import io
import json
import sys
import tarfile
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import soundfile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from demo.spoken_words import DEFAULT_WORDS, HELDOUT_VOICES, TRAIN_VOICES, make_dataset, zip_clips  # noqa: E402
from retrain.client import Config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--api", default="http://127.0.0.1:8000")
    parser.add_argument("--out", type=Path, default=Path(".run/demo"))
    parser.add_argument("--model-name", default="keywords")
    parser.add_argument("--epochs", type=int, default=None, help="default: the trainer's own recipe")
    parser.add_argument("--repeats", type=int, default=3, help="takes of each word per training voice")
    args = parser.parse_args()

    out = args.out.resolve()
    print(f"1. Speaking {len(DEFAULT_WORDS)} keywords in {len(TRAIN_VOICES)} training voices (espeak-ng) ...")
    train_csv = make_dataset(out / "train", DEFAULT_WORDS, TRAIN_VOICES, repeats=args.repeats, seed=0)
    train_zip = zip_clips(out / "train", train_csv, out / "train.zip")
    heldout_csv = make_dataset(out / "heldout", DEFAULT_WORDS, HELDOUT_VOICES, repeats=1, seed=1)
    n_train = sum(1 for _ in csv.DictReader(train_csv.open()))
    print(f"   {n_train} training clips -> {train_zip}")

    key = Config.load(url=args.api).key  # RETRAIN_API_KEY, or the local stack's .run/admin.key
    client = httpx.Client(base_url=args.api, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=120)
    spec = {"task": "audio_classification", "model_name": args.model_name,
            "hyperparameters": {"batch_size": 32, "seed": 0, **({"epochs": args.epochs} if args.epochs else {})}}
    response = client.post("/v1/jobs", data={"spec": json.dumps(spec)}, files={
        "dataset": ("dataset.csv", train_csv.read_bytes(), "text/csv"),
        "audio": ("train.zip", train_zip.read_bytes(), "application/zip"),
    })
    if response.status_code != 202:
        print(f"submission refused: {response.status_code} {response.text}")
        return 1
    job_id = response.json()["id"]
    print(f"2. Submitted job {job_id} ({response.json()['status_url']})")

    last = None
    while True:
        job = client.get(f"/v1/jobs/{job_id}").raise_for_status().json()
        progress = job["progress"]
        line = f"   {job['state']}"
        if progress["epoch"] and job["state"] == "running":
            m = job["metrics"]
            line += f"  epoch {progress['epoch']}/{progress['epochs']}  val_accuracy {m.get('val_accuracy', float('nan')):.3f}  train_loss {m.get('train_loss', float('nan')):.3f}"
        if line != last:
            print(line, flush=True)
            last = line
        if job["state"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(1)
    if job["state"] != "succeeded":
        print(f"job {job['state']}: {job['error']}")
        return 1

    artifact = client.get(f"/v1/jobs/{job_id}/artifact").raise_for_status().content
    model_dir = out / "model"
    (out / f"{args.model_name}-v{job['model_version']}.tar.gz").write_bytes(artifact)
    with tarfile.open(fileobj=io.BytesIO(artifact), mode="r:gz") as tar:
        tar.extractall(model_dir, filter="data")
    m = job["metrics"]
    print(f"3. Succeeded: model {args.model_name} version {job['model_version']}, stored in MinIO at "
          f"models/{args.model_name}/versions/{job['model_version']}/model.tar.gz, downloaded to {model_dir}")
    print(f"   test split ({m.get('test_size')} clips, training voices): accuracy {m['accuracy']:.3f}, "
          f"macro F1 {m['macro_f1']:.3f}, macro precision {m['macro_precision']:.3f}, macro recall {m['macro_recall']:.3f}")

    labels = json.loads((model_dir / "labels.json").read_text())
    session = ort.InferenceSession(str(model_dir / "model.onnx"))
    rows = list(csv.DictReader(heldout_csv.open()))
    correct = 0
    for row in rows:
        audio, _ = soundfile.read(heldout_csv.parent / row["audio"], dtype="float32")
        logits = session.run(["logits"], {"waveform": audio[None, :]})[0]
        correct += labels[int(np.argmax(logits))] == row["label"]
    voices = ", ".join(v.name for v in HELDOUT_VOICES)
    print(f"4. Voices never heard in training ({voices}): {correct}/{len(rows)} correct = {correct / len(rows):.3f} "
          f"(chance {1 / len(labels):.3f}), with onnxruntime alone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
