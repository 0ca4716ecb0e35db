"""The service under hostile uploads: /healthz latency and a normal job's dispatch latency while
5 hostile `POST /v1/jobs` are kept in flight, beside the same measurements with none (the
baseline, same run, same stack).

Issue 7's targets: with 5 hostile uploads in flight, `/healthz` p99 under 100 ms and a normal
job's dispatch p95 (202 -> the job record says `running`, as a polling client sees it) under 1 s.

Phases, each measuring the same things:

1. baseline: a client sends sequential GET /healthz (one every `--health-interval` s, at least
   `--health-requests` of them) while `--jobs` normal small jobs are dispatched one after another
   with bench/dispatch_latency.py's `dispatch` (each cancelled once running);
2. under attack: the same, while `--attackers` processes each keep one hostile upload in flight
   (the next is sent as soon as one is answered), cycling through the kinds below. Every hostile
   upload must be answered with a 4xx; a 2xx (accepted: the attacker cancels it at once), a 5xx,
   a dropped connection or no answer within `--hostile-timeout` s is a finding, listed at the end.

Also sampled every 50 ms in each phase: the API process's resident memory and that of its whole
process tree (the archive reader runs in child processes), and its CPU time (own, and that of
its descendants': the archive readers and dataset checks) from /proc/<pid>/status and /proc/<pid>/stat.

By default a private stack (Kafka, MinIO, API, one worker) is started on free ports in a
temporary folder through deploy/local/stack.py and stopped at the end; `--running` uses the
stack `make up` started (RETRAIN_* settings), `--api URL --api-pid PID` any other.

    .venv/bin/python bench/hostile_door.py [--jobs 20] [--attackers 5] [--kinds zip_bomb,...] [--logs DIR]
"""

import argparse
import gzip
import json
import multiprocessing
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import uuid
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import api_headers, percentile, small_dataset, table  # noqa: E402
from bench.dispatch_latency import dispatch  # noqa: E402
from deploy.local.stack import Stack, free_port  # noqa: E402

MIB = 1024 * 1024
GIB = 1024 * MIB
HOSTILE_SPEC = {"task": "audio_classification", "model_name": "bench-hostile", "hyperparameters": {"epochs": 1}}
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- hostile payloads ------------------------------------------------------------------------
# Each kind is a complete multipart body on disk (spec, dataset CSV, audio archive), sent as is.

def _zip_raw(path: Path, members: list[tuple[str, list[bytes], int, int, int, int]]) -> None:
    """A zip written by hand: (name, data parts, method, crc, compressed size, declared size) per
    member, so a member's declared size may lie. No zip64: sizes under 4 GiB."""
    central, offset = [], 0
    with open(path, "wb") as out:
        for name, parts, method, crc, csize, usize in members:
            raw = name.encode()
            header = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, method, 0, 0x21, crc, csize, usize, len(raw), 0)
            out.write(header + raw)
            for part in parts:
                out.write(part)
            central.append(struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", (3 << 8) | 20, 20, 0, method, 0, 0x21,
                                       crc, csize, usize, len(raw), 0, 0, 0, 0, 0o100644 << 16, offset) + raw)
            offset += len(header) + len(raw) + csize
        directory = b"".join(central)
        out.write(directory)
        out.write(struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(central), len(central), len(directory), offset, 0))


def _deflated_zeros(size: int, chunk: int = 4 * MIB) -> tuple[list[bytes], int, int]:
    """Raw deflate of `size` zero bytes, built from one chunk: after a full flush the compressor
    starts afresh, so the chunk's output repeated is a valid stream. (parts, crc, compressed size)."""
    assert size % chunk == 0
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(chunk)) + compressor.flush(zlib.Z_FULL_FLUSH)
    tail = compressor.flush(zlib.Z_FINISH)
    crc, zeros = 0, bytes(chunk)
    for _ in range(size // chunk):
        crc = zlib.crc32(zeros, crc)
    parts = [block] * (size // chunk) + [tail]
    return parts, crc, sum(map(len, parts))


def _csv(rows: list[tuple[str, str]]) -> bytes:
    return ("audio,label\n" + "".join(f"{a},{b}\n" for a, b in rows)).encode()


def _multipart(path: Path, fields: list[tuple[str, str | None, bytes | Path]]) -> str:
    """Writes a multipart/form-data body of (name, filename or None, content) parts; returns the boundary."""
    boundary = uuid.uuid4().hex
    with open(path, "wb") as out:
        for name, filename, content in fields:
            disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
            out.write(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode())
            out.write(b"Content-Type: application/octet-stream\r\n\r\n" if filename else b"\r\n")
            if isinstance(content, Path):
                with open(content, "rb") as src:
                    while block := src.read(4 * MIB):
                        out.write(block)
            else:
                out.write(content)
            out.write(b"\r\n")
        out.write(f"--{boundary}--\r\n".encode())
    return boundary


def _tar_header(name: str, size_field: bytes | None = None, kind: bytes = tarfile.REGTYPE, size: int = 0) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mode = size, kind, 0o644
    block = bytearray(info.tobuf(format=tarfile.GNU_FORMAT)[:512])
    if size_field is not None:
        block[124:136] = size_field
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def build_payloads(folder: Path, csv: Path, clips: Path, trickle_mib: int, noise_mib: int) -> dict[str, dict]:
    """kind -> {"body": path, "boundary": str, "what": description, "trickle": bool}."""
    folder.mkdir(parents=True, exist_ok=True)
    clip_dir = csv.parent
    clip = clip_dir / csv.read_text().splitlines()[1].split(",")[0]
    rng = os.urandom
    payloads = {}

    def add(kind: str, what: str, dataset: bytes, archive: Path, filename: str, trickle: bool = False):
        body = folder / f"{kind}.body"
        boundary = _multipart(body, [("spec", None, json.dumps(HOSTILE_SPEC).encode()),
                                     ("dataset", "dataset.csv", dataset), ("audio", filename, archive)])
        payloads[kind] = {"body": body, "boundary": boundary, "what": what, "trickle": trickle}

    # 1. zip bomb: 3 members of 3 GiB of zeros each (9 GiB, over the 8 GiB total and the 50x ratio).
    parts, crc, csize = _deflated_zeros(3 * GIB)
    bomb = folder / "bomb.zip"
    _zip_raw(bomb, [(f"z{i}.wav", parts, 8, crc, csize, 3 * GIB) for i in range(3)])
    add("zip_bomb", f"zip, 3 x 3 GiB of zeros in {bomb.stat().st_size / MIB:.1f} MiB", _csv([("z0.wav", "yes"), ("z1.wav", "no")]), bomb, "bomb.zip")

    # 2. zip bomb whose headers lie: 1 GiB of zeros declared as 20 MiB (ratio looks like ~20x).
    parts, crc, csize = _deflated_zeros(1 * GIB)
    liar = folder / "liar.zip"
    _zip_raw(liar, [("liar.wav", parts, 8, crc, csize, 20 * MIB)])
    add("zip_bomb_lying_sizes", f"zip, 1 GiB of zeros declared as 20 MiB, {liar.stat().st_size / MIB:.1f} MiB",
        _csv([("liar.wav", "yes"), ("liar.wav", "no")]), liar, "liar.zip")

    # 3. tar with a negative member size (base-256 0xff...): tarfile 3.11.7 loops forever on it.
    negative = folder / "negative.tar"
    negative.write_bytes((_tar_header("neg.wav", size_field=b"\xff" * 12) + bytes(2048)).ljust(2560, b"\0"))
    add("tar_negative_size", "2.5 KB tar, member size -1 (base-256)", _csv([("neg.wav", "yes"), ("neg.wav", "no")]), negative, "neg.tar")

    # 4. tar.gz whose pax header is 1,000,000 digits (tarfile 3.11.7 parses these quadratically).
    digits = b"1" * 1_000_000
    raw = _tar_header("././@PaxHeader", kind=tarfile.XHDTYPE, size=len(digits)) + digits.ljust(-(-len(digits) // 512) * 512, b"\0")
    raw += _tar_header("pax.wav") + bytes(1024)
    pax = folder / "pax.tar.gz"
    with open(pax, "wb") as out:
        out.write(zlib.compress(raw, 9, wbits=31))
    add("tar_pax_digits", f"tar.gz of {pax.stat().st_size} bytes: a pax header of 10^6 digits", _csv([("pax.wav", "yes"), ("pax.wav", "no")]), pax, "pax.tar.gz")

    # 5. 100,000 CSV rows all naming one (valid) clip, the last naming a member that is noise.
    rows_zip = folder / "rows.zip"
    with zipfile.ZipFile(rows_zip, "w") as zf:
        zf.write(clip, "clip.wav")
        zf.writestr("junk.wav", rng(4096))
    add("csv_100k_rows_one_member", "CSV: 99,999 rows name one clip, the last a member of noise",
        _csv([("clip.wav", "yes")] * 99_999 + [("junk.wav", "no")]), rows_zip, "rows.zip")

    # 6. a CSV with one 10 MiB field (the csv module's own cap is 131,072 characters).
    add("csv_huge_field", "CSV with one field of 10 MiB", _csv([("a" * (10 * MIB), "yes"), ("b.wav", "no")]), clips, "clips.zip")

    # 7. a slow client: a zip of noise whose CSV names a member it lacks, trickled at --trickle-rate.
    slow = folder / "slow.zip"
    with zipfile.ZipFile(slow, "w") as zf:
        zf.writestr("noise.bin", rng(trickle_mib * MIB))
    add("slow_client", f"{trickle_mib} MiB zip trickled in 64 KiB writes", _csv([("missing.wav", "yes"), ("missing2.wav", "no")]),
        slow, "slow.zip", trickle=True)

    # 8. a large valid archive of noise: every byte is read (extracted, then decoded as audio).
    noise = folder / "noise.zip"
    with zipfile.ZipFile(noise, "w") as zf:
        with zf.open("noise.wav", "w") as member:
            for _ in range(noise_mib):
                member.write(rng(MIB))
    add("noise_archive", f"zip of {noise_mib} MiB of random bytes named noise.wav", _csv([("noise.wav", "yes"), ("noise.wav", "no")]), noise, "noise.zip")

    # 9. tar.gz just under the ratio bound (~45x): the CSV names its one big member, so it is
    #    decompressed for the listing and again for the extraction, and written to disk.
    near = folder / "near_ratio.tar.gz"
    pattern = rng(1400) + bytes(64 * 1024 - 1400)
    size = 8 * 1024 * len(pattern)  # 512 MiB unpacked
    with gzip.open(near, "wb", compresslevel=1) as out:
        out.write(_tar_header("big.wav", size=size))
        for _ in range(size // len(pattern)):
            out.write(pattern)
        out.write(bytes(1024))  # the end-of-archive blocks (the size is a multiple of 512)
    add("tar_gz_near_ratio", f"tar.gz of {near.stat().st_size / MIB:.1f} MiB unpacking to {size // MIB} MiB "
        f"({size / near.stat().st_size:.0f}x), named by the CSV", _csv([("big.wav", "yes"), ("big.wav", "no")]), near, "near.tar.gz")
    for f in (bomb, liar, negative, pax, rows_zip, slow, noise, near):
        f.unlink()
    return payloads


# ---- attackers ---------------------------------------------------------------------------------

def _send(client: httpx.Client, payload: dict, trickle_rate: float) -> httpx.Response:
    body: Path = payload["body"]

    def chunks():
        with open(body, "rb") as fp:
            if payload["trickle"]:
                step = 64 * 1024
                pause = step / trickle_rate
                while block := fp.read(step):
                    yield block
                    time.sleep(pause)
            else:
                while block := fp.read(MIB):
                    yield block

    headers = {"content-type": f"multipart/form-data; boundary={payload['boundary']}", "content-length": str(body.stat().st_size)}
    return client.post("/v1/jobs", content=chunks(), headers=headers)


def _rotated(kinds: list[str], by: int) -> list[str]:
    return kinds[by:] + kinds[:by]


def attacker(index: int, api: str, kinds: list[str], payloads: dict, stop, results, started, timeout: float, trickle_rate: float) -> None:
    """One hostile upload in flight at a time, the next as soon as one is answered, until `stop`."""
    n = 0
    with httpx.Client(base_url=api, headers=api_headers(), timeout=httpx.Timeout(timeout)) as client:
        started.put(index)
        while not stop.is_set():
            kind = kinds[n % len(kinds)]
            n += 1
            begin = time.perf_counter()
            status, error, detail = None, None, ""
            try:
                response = _send(client, payloads[kind], trickle_rate)
                status, detail = response.status_code, response.text[:300]
                if response.status_code == 202:  # accepted: a finding; do not let it train
                    client.post(f"/v1/jobs/{response.json()['id']}/cancel")
            except httpx.TimeoutException as err:
                error = f"no answer within {timeout:g} s ({type(err).__name__})"
            except httpx.HTTPError as err:
                error = f"{type(err).__name__}: {err}"
            results.put((kind, status, time.perf_counter() - begin, error, detail, time.time()))


# ---- measurement ------------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        return found
    return found + [g for c in found for g in _children(c)]


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cpu(pid: int) -> tuple[float, float]:
    """(own utime+stime, reaped children's cutime+cstime) in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3): utime, stime, cutime, cstime are fields 14-17.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK, (int(fields[13]) + int(fields[14])) / CLK_TCK


def _tree_cpu(pid: int) -> tuple[float, float]:
    """(the API's own CPU seconds, those of its descendants: the ones it reaped, and each live
    descendant's own and reaped, e.g. the forkserver whose children check the datasets)."""
    own, reaped = _cpu(pid)
    for child in _children(pid):
        try:
            reaped += sum(_cpu(child))
        except (FileNotFoundError, ProcessLookupError):
            pass  # it ended meanwhile; its parent reaps its time
    return own, reaped


class Sampler(threading.Thread):
    """Peak RSS of the API and of its process tree, and its CPU time over the phase."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.running = pid, True
        self.peak = self.tree_peak = 0
        self.max_children = 0

    def run(self):
        self.start_time, self.start_cpu = time.monotonic(), _tree_cpu(self.pid)
        while self.running:
            children = _children(self.pid)
            rss = _rss(self.pid)
            self.peak = max(self.peak, rss)
            self.tree_peak = max(self.tree_peak, rss + sum(_rss(c) for c in children))
            self.max_children = max(self.max_children, len(children))
            time.sleep(0.05)
        self.wall = time.monotonic() - self.start_time
        end = _tree_cpu(self.pid)
        self.own_cpu, self.child_cpu = end[0] - self.start_cpu[0], end[1] - self.start_cpu[1]

    def stop(self):
        self.running = False
        self.join()


class Health(threading.Thread):
    """Sequential GET /healthz until stopped and at least `minimum` answers."""

    def __init__(self, api: str, minimum: int, interval: float, timeout: float):
        super().__init__(daemon=True)
        self.api, self.minimum, self.interval, self.timeout = api, minimum, interval, timeout
        self.times: list[float] = []
        self.failures: Counter = Counter()
        self.stopping = threading.Event()

    def run(self):
        with httpx.Client(base_url=self.api, headers=api_headers(), timeout=self.timeout) as client:
            while not (self.stopping.is_set() and len(self.times) >= self.minimum):
                begin = time.perf_counter()
                try:
                    status = client.get("/healthz").status_code
                except httpx.HTTPError as err:
                    status = type(err).__name__
                elapsed = time.perf_counter() - begin
                if status == 200:
                    self.times.append(elapsed)
                else:
                    self.failures[status] += 1
                    self.times.append(elapsed)  # a failure counts with the time it took
                time.sleep(self.interval)


def measure(api: str, api_pid: int, csv: Path, clips: Path, args) -> dict:
    sampler = Sampler(api_pid)
    health = Health(api, args.health_requests, args.health_interval, args.hostile_timeout)
    posts: list[float] = []
    begun: dict[int, float] = {}
    trace: list = []

    def on_request(request: httpx.Request):
        if request.method == "POST" and request.url.path == "/v1/jobs":
            begun[id(request)] = time.perf_counter()

    def on_response(response: httpx.Response):
        if id(response.request) in begun:
            posts.append(time.perf_counter() - begun.pop(id(response.request)))

    sampler.start()
    health.start()
    start = time.monotonic()
    with httpx.Client(base_url=api, headers=api_headers(), timeout=args.hostile_timeout, event_hooks={"request": [on_request], "response": [on_response]}) as client:
        server, seen = dispatch(client, csv, clips, args.jobs, trace)
    health.stopping.set()
    health.join()
    wall = time.monotonic() - start
    sampler.stop()
    return {"server": server, "seen": seen, "posts": posts, "health": health.times, "health_failures": health.failures,
            "sampler": sampler, "wall": wall, "trace": trace}


# ---- report -------------------------------------------------------------------------------------

def _ms(values: list[float], q: float) -> float:
    return percentile(values, q) * 1000


def report(base: dict, attack: dict, hostile: list, args, attack_window: tuple[float, float], notes: list[str], stuck: list[int]) -> bool:
    rows, passed = [], not stuck

    def row(metric, b, a, target=None, lower_is_better=True):
        nonlocal passed
        ratio = a / b if b else float("inf")
        verdict = ""
        if target is not None:
            ok = a < target if lower_is_better else a > target
            verdict = "pass" if ok else "FAIL"
            passed &= ok
        rows.append([metric, b, a, f"{ratio:.2f}", f"< {target:g}" if target is not None else "", verdict])

    for q in (50, 95, 99):
        row(f"/healthz p{q} ms", _ms(base["health"], q), _ms(attack["health"], q), 100.0 if q == 99 else None)
    row("/healthz max ms", max(base["health"]) * 1000, max(attack["health"]) * 1000)
    for q in (50, 95):
        row(f"dispatch p{q} ms, client sees running", _ms(base["seen"], q), _ms(attack["seen"], q), 1000.0 if q == 95 else None)
    for q in (50, 95):
        row(f"dispatch p{q} ms, server clocks", _ms(base["server"], q), _ms(attack["server"], q))
    for q in (50, 95):
        row(f"normal POST /v1/jobs p{q} ms", _ms(base["posts"], q), _ms(attack["posts"], q))
    for key, label in (("peak", "API peak RSS MiB"), ("tree_peak", "API + children peak RSS MiB")):
        row(label, getattr(base["sampler"], key) / MIB, getattr(attack["sampler"], key) / MIB)
    for key, label in (("own_cpu", "API CPU % of one core"), ("child_cpu", "child processes CPU % of one core")):
        row(label, 100 * getattr(base["sampler"], key) / base["sampler"].wall, 100 * getattr(attack["sampler"], key) / attack["sampler"].wall)
    row("phase wall s", base["wall"], attack["wall"])

    print(f"\nhealthz: {len(base['health'])} / {len(attack['health'])} sequential requests; dispatch: {args.jobs} jobs per phase; "
          f"{args.attackers} hostile uploads in flight in the attack phase")
    print(table(["metric", "baseline", "under attack", "attack / baseline", "target", "result"], rows))
    for name, phase in (("baseline", base), ("attack", attack)):
        if phase["health_failures"]:
            print(f"  /healthz failures in the {name} phase: {dict(phase['health_failures'])}")

    by_kind: dict[str, list] = {}
    for kind, status, seconds, error, detail, finished in hostile:
        by_kind.setdefault(kind, []).append((status, seconds, error, detail, finished))
    lo, hi = attack_window
    kind_rows, findings = [], []
    for kind, results in by_kind.items():
        statuses = Counter(str(s) if s is not None else "no answer" for s, *_ in results)
        seconds = [s for _, s, *_ in results]
        during = sum(1 for *_, finished in results if lo <= finished <= hi)
        kind_rows.append([kind, len(results), during, ", ".join(f"{k} x{v}" for k, v in sorted(statuses.items())),
                          percentile(seconds, 50), max(seconds)])
        for status, secs, error, detail, _ in results:
            if status is None or not 400 <= status < 500:
                findings.append((kind, status, secs, error or detail))
            elif secs > args.slow_s:
                findings.append((kind, status, secs, f"slow: answered after {secs:.1f} s: {detail[:160]}"))
    print("\nhostile uploads (all phases' answers; 'during' = finished inside the measured attack window)")
    print(table(["kind", "sent", "during", "status codes", "p50 s", "max s"], kind_rows))
    details = {}
    for kind, results in by_kind.items():
        for status, _, _, detail, _ in results:
            if status is not None:
                details.setdefault(kind, detail[:200])
    print("\nfirst answer of each kind:")
    for kind, detail in details.items():
        print(f"  {kind}: {detail}")
    if findings:
        print(f"\nFINDINGS ({len(findings)}): hostile uploads not answered with a 4xx, or slower than {args.slow_s:g} s")
        seen = Counter()
        for kind, status, secs, what in findings:
            seen[(kind, status)] += 1
            if seen[(kind, status)] <= 3:
                print(f"  {kind}: {status or 'no answer'} after {secs:.1f} s: {what[:300]}")
        passed = False
    else:
        print(f"\nevery hostile upload was answered with a 4xx within {args.slow_s:g} s")
    for note in notes:
        print(note)
    print("\nresult:", "PASS" if passed else "FAIL")
    return passed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20, help="normal jobs dispatched per phase")
    parser.add_argument("--attackers", type=int, default=5, help="hostile uploads kept in flight")
    parser.add_argument("--kinds", default="", help="comma-separated subset of the hostile kinds (default: all)")
    parser.add_argument("--health-requests", type=int, default=500, help="at least this many GET /healthz per phase")
    parser.add_argument("--health-interval", type=float, default=0.01, help="pause between two GET /healthz, s")
    parser.add_argument("--hostile-timeout", type=float, default=120.0, help="no answer after this long is a hang, s")
    parser.add_argument("--slow-s", type=float, default=30.0, help="a 4xx later than this is reported as slow, s")
    parser.add_argument("--trickle-rate", type=float, default=2 * MIB, help="the slow client's bytes per second")
    parser.add_argument("--trickle-mib", type=int, default=16, help="the slow client's archive, MiB")
    parser.add_argument("--noise-mib", type=int, default=50, help="the noise archive, MiB")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of attack before the measurement starts")
    parser.add_argument("--py-spy", help="a py-spy binary: profile the API during the attack phase (not a project dependency)")
    parser.add_argument("--profile-out", default="hostile_door.pyspy.txt", help="where --py-spy writes its collapsed stacks")
    parser.add_argument("--logs", help="copy the private stack's logs here, with each phase's jobs (id, s until seen running)")
    parser.add_argument("--running", action="store_true", help="use the stack `make up` started (RETRAIN_* settings)")
    parser.add_argument("--api", help="use the API at this URL (with --api-pid)")
    parser.add_argument("--api-pid", type=int, help="the pid of that API's process (for its memory and CPU)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        tmp = Path(tmp)
        print("building the data set and the hostile payloads ...", flush=True)
        csv, clips = small_dataset(tmp / "data")
        payloads = build_payloads(tmp / "payloads", csv, clips, args.trickle_mib, args.noise_mib)
        kinds = [k for k in (args.kinds.split(",") if args.kinds else payloads)]
        unknown = set(kinds) - set(payloads)
        if unknown:
            sys.exit(f"unknown kinds {sorted(unknown)}; known: {', '.join(payloads)}")
        for kind in kinds:
            print(f"  {kind}: {payloads[kind]['what']} (body {payloads[kind]['body'].stat().st_size / MIB:.2f} MiB)")

        stack = None
        if args.api:
            api, api_pid = args.api.rstrip("/"), args.api_pid
            if api_pid is None:
                sys.exit("--api needs --api-pid")
        elif args.running:
            running = Stack.from_env()
            api, api_pid = running.api_url, running.pid("api")
            if api_pid is None:
                sys.exit("the API is not running: make up")
        else:
            stack = Stack(run_dir=tmp / "stack", api_port=free_port(), kafka_port=free_port(), kafka_controller_port=free_port(),
                          minio_port=free_port(), minio_console_port=free_port(), ready_timeout=180)
            print("starting a private stack ...", flush=True)
            stack.up()
            api, api_pid = stack.api_url, stack.pid("api")
            os.environ["RETRAIN_API_KEY"] = stack.admin_key()  # every client below, the attackers' too
        try:
            with httpx.Client(base_url=api, headers=api_headers(), timeout=60) as client:
                deadline = time.monotonic() + 180
                while client.get("/readyz").status_code != 200:
                    if time.monotonic() > deadline:
                        sys.exit(f"the API at {api} is not ready: {client.get('/readyz').text}")
                    time.sleep(0.5)
            load_before = os.getloadavg()
            print(f"API {api}, pid {api_pid}; load average {load_before[0]:.2f} on {os.cpu_count()} CPUs", flush=True)

            print(f"baseline: {args.jobs} jobs, >= {args.health_requests} /healthz ...", flush=True)
            base = measure(api, api_pid, csv, clips, args)

            print(f"attack: {args.attackers} hostile uploads in flight ...", flush=True)
            context = multiprocessing.get_context("spawn")
            stop, results, started = context.Event(), context.Queue(), context.Queue()
            # Each attacker starts at another place in the cycle, so all kinds are in flight early.
            procs = [context.Process(target=attacker, daemon=True, args=(
                i, api, _rotated(kinds, i * len(kinds) // args.attackers), payloads, stop, results, started,
                args.hostile_timeout, args.trickle_rate)) for i in range(args.attackers)]
            for proc in procs:
                proc.start()
            for _ in procs:
                started.get(timeout=60)
            time.sleep(args.warmup)
            window_start = time.time()
            profiler = None
            if args.py_spy:  # where the API's time goes while it is attacked (collapsed stacks, per thread)
                profiler = subprocess.Popen([args.py_spy, "record", "--pid", str(api_pid), "--rate", "200", "--threads",
                                             "--nonblocking", "--format", "raw", "--output", args.profile_out],
                                            stdout=subprocess.DEVNULL, stderr=open(args.profile_out + ".log", "wb"))
            attack = measure(api, api_pid, csv, clips, args)
            if profiler is not None:
                profiler.send_signal(signal.SIGINT)
                profiler.wait(timeout=60)
            window_end = time.time()
            stop.set()
            hostile = []
            deadline = time.monotonic() + args.hostile_timeout + 30
            while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
                while not results.empty():
                    hostile.append(results.get())
                time.sleep(0.2)
            while not results.empty():
                hostile.append(results.get())
            stuck = [p.pid for p in procs if p.is_alive()]
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
            load_after = os.getloadavg()
        finally:
            if stack is not None:
                if args.logs:
                    Path(args.logs).mkdir(parents=True, exist_ok=True)
                    for log in stack.run_dir.glob("*.log"):
                        shutil.copy(log, Path(args.logs) / log.name)
                stack.down()
    if args.logs:
        traces = {phase: measured["trace"] for phase, measured in (("baseline", base), ("attack", attack))}
        (Path(args.logs) / "dispatch.json").write_text(json.dumps(traces, indent=1))
    notes = [f"\nload average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after, on {os.cpu_count()} CPUs "
             "(other processes on the machine count too)"]
    if stuck:
        notes.append(f"attacker processes still waiting for an answer at the end: {stuck} (a hang)")
    ok = report(base, attack, hostile, args, (window_start, window_end), notes, stuck)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
