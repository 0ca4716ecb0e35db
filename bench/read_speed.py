"""Requests per second of `GET /v1/jobs/{id}` (a key checked, a row read, a job rendered) beside
`GET /healthz` (the server's floor: no key, no database) on the same server, in the same run.

Issue 8's target: the job read at >= 0.5x the requests/s of /healthz. Each phase runs
`--connections` keep-alive clients (one process each, so the load is not one interpreter's) for
`--seconds`; /healthz is measured before and after the job reads and the baseline is their mean.

    make up && .venv/bin/python bench/read_speed.py [--connections 8] [--seconds 10]
"""

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import API, api_headers, small_dataset, table  # noqa: E402
from bench.dispatch_latency import dispatch  # noqa: E402


def _client(url: str, path: str, headers: dict, seconds: float, start_at: float, out) -> None:
    done, failed = 0, 0
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        while time.time() < start_at:
            time.sleep(0.01)
        deadline = start_at + seconds
        while time.time() < deadline:
            if client.get(path).status_code == 200:
                done += 1
            else:
                failed += 1
    out.put((done, failed))


def rate(url: str, path: str, connections: int, seconds: float) -> tuple[float, int]:
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    start_at = time.time() + 3  # every client connected and waiting
    procs = [context.Process(target=_client, args=(url, path, api_headers(), seconds, start_at, out)) for _ in range(connections)]
    for proc in procs:
        proc.start()
    results = [out.get(timeout=seconds + 120) for _ in procs]
    for proc in procs:
        proc.join()
    return sum(d for d, _ in results) / seconds, sum(f for _, f in results)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, httpx.Client(base_url=API, headers=api_headers(), timeout=60) as client:
        csv, clips = small_dataset(Path(tmp))
        dispatch(client, csv, clips, 1, trace := [])  # one real job (cancelled once running) to read
        job_path = f"/v1/jobs/{trace[0][0]}"
    before, _ = rate(API, "/healthz", args.connections, args.seconds)
    job, failed = rate(API, job_path, args.connections, args.seconds)
    after, _ = rate(API, "/healthz", args.connections, args.seconds)
    baseline = (before + after) / 2
    print(f"{args.connections} connections, {args.seconds:g} s per phase; {API}")
    print(table(["request", "req/s", "ratio to /healthz", "target", "result"], [
        ["GET /healthz (baseline: before / after)", f"{before:.0f} / {after:.0f}", "1.00", "", ""],
        [f"GET /v1/jobs/{{id}}{f' ({failed} not 200)' if failed else ''}", f"{job:.0f}", f"{job / baseline:.2f}", ">= 0.5",
         "pass" if job / baseline >= 0.5 and not failed else "FAIL"],
    ]))


if __name__ == "__main__":
    main()
