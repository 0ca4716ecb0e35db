"""API memory while a client streams a 1 GiB upload, beside the throughput of a direct MinIO
upload of the same bytes (the baseline, same run).

The upload is a real job: a small spoken-word CSV and a zip that holds its clips plus 1 GiB of
padding the CSV does not name. The API's resident memory is sampled from /proc every 10 ms.

    make up && .venv/bin/python bench/upload_memory.py [--mib 1024] [--rounds 3]

Each round uploads directly (the baseline), then through the API in POST /v1/jobs, then as a
direct upload (POST /v1/uploads, the file POSTed to MinIO with the presigned form, POST /v1/jobs
naming it: the API then reads it back once for the checks); each job is cancelled, and the next
step waits until the worker is idle again. The ratios are the medians of the rounds'.
"""

import argparse
import json
import os
import statistics
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


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until_idle(pid: int, busy_below: float = 0.05, timeout_s: float = 120) -> None:
    """Until `pid` used under `busy_below` of a CPU for a second (the worker done with the last
    job's download), so one round's leftovers do not slow the next."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        start = cpu_seconds(pid)
        time.sleep(1)
        if cpu_seconds(pid) - start < busy_below:
            return


def through_api(client: httpx.Client, csv: Path, archive: Path, api_pid: int) -> tuple[float, int]:
    """(seconds, peak RSS) of one POST /v1/jobs carrying `archive`; the job is cancelled after."""
    sampler = PeakRss(api_pid)
    sampler.start()
    spec = {"task": "audio_classification", "model_name": "bench-upload", "hyperparameters": {"epochs": 1}}
    start = time.perf_counter()
    with archive.open("rb") as stream:
        response = client.post("/v1/jobs", data={"spec": json.dumps(spec)},
                               files={"dataset": ("d.csv", csv.read_bytes(), "text/csv"), "audio": ("big.zip", stream, "application/zip")})
    seconds = time.perf_counter() - start
    sampler.running = False
    sampler.join()
    job_id = response.raise_for_status().json()["id"]
    client.post(f"/v1/jobs/{job_id}/cancel")
    return seconds, sampler.peak


def direct_upload(client: httpx.Client, csv: Path, archive: Path, api_pid: int) -> tuple[float, float, int]:
    """(seconds of the upload to MinIO, seconds of the POST /v1/jobs naming it, peak API RSS) of
    a direct upload (POST /v1/uploads, the file POSTed to MinIO with its form); the job is cancelled after."""
    size = archive.stat().st_size
    sampler = PeakRss(api_pid)
    sampler.start()
    start = time.perf_counter()
    slot = client.post("/v1/uploads", json={"filename": "big.zip", "size": size}).raise_for_status().json()
    with archive.open("rb") as stream:
        httpx.post(slot["url"], data=slot["fields"], files={"file": ("big.zip", stream)}, timeout=600).raise_for_status()
    uploaded = time.perf_counter()
    spec = {"task": "audio_classification", "model_name": "bench-upload", "hyperparameters": {"epochs": 1}}
    response = client.post("/v1/jobs", data={"spec": json.dumps(spec), "audio": slot["id"]},
                           files={"dataset": ("d.csv", csv.read_bytes(), "text/csv")})
    submitted = time.perf_counter()
    sampler.running = False
    sampler.join()
    job_id = response.raise_for_status().json()["id"]
    client.post(f"/v1/jobs/{job_id}/cancel")
    return uploaded - start, submitted - uploaded, sampler.peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    stack = Stack.from_env()
    api_pid, worker_pid = stack.pid("api"), stack.pid("worker")
    if api_pid is None:
        sys.exit("the API is not running: make up")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        csv, _ = small_dataset(tmp / "data")
        archive = big_zip(tmp / "big.zip", tmp / "data", csv, args.mib)
        size = archive.stat().st_size
        minio = Minio(S3, access_key=S3_KEYS[0], secret_key=S3_KEYS[1], secure=False)
        if not minio.bucket_exists("bench"):
            minio.make_bucket("bench")
        before = rss_bytes(api_pid)
        rows, ratios, leg_ratios, whole_ratios, peak = [], [], [], [], before
        with httpx.Client(base_url=API, headers=api_headers(), timeout=600) as client:
            for round_ in range(1, args.rounds + 1):
                # Baseline: the same bytes straight into MinIO with the SDK.
                start = time.perf_counter()
                minio.fput_object("bench", "big.zip", str(archive), part_size=16 * MIB)
                direct_s = time.perf_counter() - start
                minio.remove_object("bench", "big.zip")
                # Through the API: client -> multipart -> MinIO (and a spool file) -> checks -> 202.
                api_s, round_peak = through_api(client, csv, archive, api_pid)
                peak = max(peak, round_peak)
                ratios.append(direct_s / api_s)
                if worker_pid is not None:
                    wait_until_idle(worker_pid)
                # Direct: POST /v1/uploads, the file to MinIO with its form, POST /v1/jobs naming it.
                leg_s, submit_s, direct_peak = direct_upload(client, csv, archive, api_pid)
                peak = max(peak, direct_peak)
                leg_ratios.append(direct_s / leg_s)
                whole_ratios.append(direct_s / (leg_s + submit_s))
                rows.append([round_, size / MIB / direct_s, size / MIB / api_s, ratios[-1], leg_ratios[-1], round(submit_s, 2),
                             whole_ratios[-1], f"{before / MIB:.0f} -> {max(round_peak, direct_peak) / MIB:.0f} "
                             f"(+{(max(round_peak, direct_peak) - before) / MIB:.0f})"])
                if worker_pid is not None:
                    wait_until_idle(worker_pid)
    print(f"{size / MIB:.0f} MiB per upload; {API}")
    print(table(["round", "direct MinIO PUT MiB/s", "POST /v1/jobs MiB/s", "ratio", "direct upload: ratio",
                 "then POST /v1/jobs s", "direct upload + submit: ratio", "API RSS MiB (before -> peak)"], rows))
    growth = (peak - before) / MIB * 1024 / (size / MIB)
    print(f"median throughput ratio, the file in POST /v1/jobs {statistics.median(ratios):.2f}; "
          f"a direct upload {statistics.median(leg_ratios):.2f}, with its submission {statistics.median(whole_ratios):.2f} "
          f"(target >= 0.8); API RSS growth {growth:.0f} MiB per GiB uploaded (target <= 100)")


if __name__ == "__main__":
    main()
