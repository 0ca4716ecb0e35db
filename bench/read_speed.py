"""Requests per second of `GET /v1/jobs/{id}` (a key checked, a row read, a job rendered) beside
`GET /healthz` (the server's floor: no key, no database) on the same server, in the same run.

Issue 8's target: the job read at >= 0.5x the requests/s of /healthz. The load is wrk (Debian's,
installed by `make install`), the issue's own tool: one thread, `--connections` keep-alive
connections, `--seconds` per phase. A C client costs the two cores little, so the figure is the
server's. Each round measures /healthz, the job, /healthz again; the ratio is the job's against
the mean of the two around it, and the result is the median over `--rounds` (this machine's
speed drifts by a third within a minute, so one phase alone says little).

    make up && .venv/bin/python bench/read_speed.py [--rounds 5] [--connections 8] [--seconds 5]
"""

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import API, api_headers, small_dataset, table  # noqa: E402
from bench.dispatch_latency import dispatch  # noqa: E402


def rate(path: str, connections: int, seconds: float) -> tuple[float, int]:
    """(requests/s, answers that were not 2xx/3xx) of wrk against API + path."""
    header = f"Authorization: {api_headers()['Authorization']}"
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "-H", header, API + path],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+([0-9]+)", out)
    return rps, int(bad.group(1)) if bad else 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: make install")
    with tempfile.TemporaryDirectory() as tmp, httpx.Client(base_url=API, headers=api_headers(), timeout=60) as client:
        csv, clips = small_dataset(Path(tmp))
        dispatch(client, csv, clips, 1, trace := [])  # one real job (cancelled once running) to read
        job_path = f"/v1/jobs/{trace[0][0]}"
    rows, ratios, failed = [], [], 0
    for round_ in range(1, args.rounds + 1):
        before, _ = rate("/healthz", args.connections, args.seconds)
        job, bad = rate(job_path, args.connections, args.seconds)
        after, _ = rate("/healthz", args.connections, args.seconds)
        failed += bad
        ratios.append(job / ((before + after) / 2))
        rows.append([round_, f"{before:.0f} / {after:.0f}", f"{job:.0f}{f' ({bad} not 2xx)' if bad else ''}", f"{ratios[-1]:.2f}"])
    median = statistics.median(ratios)
    print(f"wrk, 1 thread, {args.connections} connections, {args.seconds:g} s per phase; {API}")
    print(table(["round", "GET /healthz req/s (before / after)", "GET /v1/jobs/{id} req/s", "ratio"], rows))
    print(f"median ratio {median:.2f} (target >= 0.5): {'pass' if median >= 0.5 and not failed else 'FAIL'}")


if __name__ == "__main__":
    main()
