"""API memory while a client streams a 1 GiB upload, beside the throughput of a direct MinIO
upload of the same bytes (the baseline, same run).

The upload is a real job: a small spoken-word CSV and a zip that holds its clips plus 1 GiB of
padding the CSV does not name. The API's resident memory is sampled from /proc every 10 ms.

    make up && .venv/bin/python bench/upload_memory.py [--mib 1024]
"""

import argparse
import json
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import httpx
from minio import Minio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import API, S3, S3_KEYS, api_headers, small_dataset, table  # noqa: E402
from deploy.local.stack import Stack  # noqa: E402

MIB = 1024 * 1024


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class PeakRss(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.running = pid, rss_bytes(pid), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(0.01)


def big_zip(path: Path, clips_dir: Path, csv: Path, mib: int) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for line in csv.read_text().splitlines()[1:]:
            name = line.split(",")[0]
            zf.write(clips_dir / name, name)
        with zf.open("padding.bin", "w", force_zip64=True) as padding:
            block = bytes(range(256)) * (4 * MIB // 256)
            for _ in range(mib // 4):
                padding.write(block)
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=1024)
    args = parser.parse_args()
    api_pid = Stack.from_env().pid("api")
    if api_pid is None:
        sys.exit("the API is not running: make up")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        csv, _ = small_dataset(tmp / "data")
        archive = big_zip(tmp / "big.zip", tmp / "data", csv, args.mib)
        size = archive.stat().st_size

        # Baseline: the same bytes straight into MinIO with the SDK.
        minio = Minio(S3, access_key=S3_KEYS[0], secret_key=S3_KEYS[1], secure=False)
        if not minio.bucket_exists("bench"):
            minio.make_bucket("bench")
        start = time.perf_counter()
        minio.fput_object("bench", "big.zip", str(archive), part_size=16 * MIB)
        direct_s = time.perf_counter() - start
        minio.remove_object("bench", "big.zip")

        # Through the API: client -> multipart -> validation -> MinIO.
        before = rss_bytes(api_pid)
        sampler = PeakRss(api_pid)
        sampler.start()
        spec = {"task": "audio_classification", "model_name": "bench-upload", "hyperparameters": {"epochs": 1}}
        start = time.perf_counter()
        with httpx.Client(base_url=API, headers=api_headers(), timeout=600) as client, archive.open("rb") as stream:
            response = client.post("/v1/jobs", data={"spec": json.dumps(spec)},
                                   files={"dataset": ("d.csv", csv.read_bytes(), "text/csv"), "audio": ("big.zip", stream, "application/zip")})
            api_s = time.perf_counter() - start
            sampler.running = False
            sampler.join()
            job_id = response.raise_for_status().json()["id"]
            client.post(f"/v1/jobs/{job_id}/cancel")

    rows = [
        ["direct MinIO upload (baseline)", size / MIB, direct_s, size / MIB / direct_s, "", 1.0],
        ["POST /v1/jobs through the API", size / MIB, api_s, size / MIB / api_s,
         f"{before / MIB:.0f} -> {sampler.peak / MIB:.0f} (+{(sampler.peak - before) / MIB:.0f})", direct_s / api_s],
    ]
    print(table(["path", "MiB", "seconds", "MiB/s", "API RSS MiB (before -> peak)", "throughput / baseline"], rows))


if __name__ == "__main__":
    main()
