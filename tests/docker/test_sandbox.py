"""The docker runner's sandbox, proved against a real Docker Engine with a tiny contract image."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jobs.events import EventType
from worker.events import parse_trainer_line
from worker.runners.base import Outcome, ResourceLimits, RunRequest

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[2]


TOKEN = "feedfacefeedfacefeedfacefeedface"  # the runs' progress token, so the lines can be read back


def run_job(runner, ws, image, env=None, cancel=None, **kw):
    lines: list[tuple[float, str]] = []
    request = RunRequest(job_id=ws.root.name, workspace=ws, trainer="test", image=image, env=env or {},
                         progress_token=TOKEN, **kw)
    t0 = time.monotonic()
    result = runner.run(request, lambda line: lines.append((time.monotonic() - t0, line)), cancel or threading.Event())
    return result, [line for _, line in lines], lines, time.monotonic() - t0


def json_lines(lines):
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def test_contract_run_succeeds_and_container_is_removed(runner, test_image, make_workspace, docker_client):
    ws = make_workspace(hyperparameters={"epochs": 2, "lr": 0.01})
    result, lines, _, _ = run_job(runner, ws, test_image, env={"EXTRA": "1"})
    assert result.outcome is Outcome.succeeded, (result, lines)
    assert result.exit_code == 0
    # Outputs land in the workspace through the writable mounts.
    assert (ws.model_dir / "model.txt").read_text().startswith("rows=3 ")
    assert json.loads((ws.output_data / "metrics.json").read_text()) == {"accuracy": 1.0}
    assert (ws.checkpoints / "ckpt.txt").exists()
    # Progress lines arrive marked with the run's token (RETRAIN_PROGRESS_TOKEN), and read as progress.
    parsed = [parse_trainer_line(line, TOKEN) for line in lines]
    progress = [p.data for p in parsed if p.type == EventType.progress]
    assert [p["epoch"] for p in progress] == [1, 2]
    assert all(line.startswith(f"retrain-progress {TOKEN} ") for line in lines if '"epoch"' in line)
    report = [o for o in json_lines(lines) if "env" in o][0]
    env = report["env"]
    assert env["SM_MODEL_DIR"] == "/opt/ml/model"
    assert env["SM_CHANNEL_TRAIN"] == "/opt/ml/input/data/train"
    assert json.loads(env["SM_HPS"]) == {"epochs": "2", "lr": "0.01"}
    assert env["SM_NUM_GPUS"] == "0"
    assert report["uid"] != 0
    # Containers are removed once the result is read.
    assert runner.list_containers() == []


def test_trainer_is_not_root_and_has_no_capabilities(runner, test_image, make_workspace):
    ws = make_workspace()
    result, lines, _, _ = run_job(runner, ws, test_image, env={"TEST_ACTION": "whoami"})
    assert result.outcome is Outcome.succeeded, lines
    ids = next(line for line in lines if line.startswith("uid="))
    assert "uid=0 " not in ids and "euid=0" not in ids, ids
    caps = json_lines(lines)[0]
    assert caps["CapEff"] == "0000000000000000", caps
    assert caps["CapPrm"] == "0000000000000000", caps
    assert caps["NoNewPrivs"] == "1", caps


def test_network_is_unreachable(runner, test_image, make_workspace):
    ws = make_workspace()
    result, lines, _, _ = run_job(runner, ws, test_image, env={"TEST_ACTION": "network"})
    report = json_lines(lines)[0]
    assert report["interfaces"] == ["lo"], report
    assert all(v != "connected" for v in report["results"].values()), report
    # The trainer saw every connection fail and said so through the failure file.
    assert result.outcome is Outcome.failed and result.exit_code == 3, (result, lines)
    assert result.reason == "network unreachable"


def test_root_filesystem_and_inputs_are_read_only(runner, test_image, make_workspace):
    ws = make_workspace()
    result, lines, _, _ = run_job(runner, ws, test_image, env={"TEST_ACTION": "write"})
    assert result.outcome is Outcome.succeeded, lines
    outcome = json_lines(lines)[0]
    for path in ("/etc/evil", "/opt/evil", "/usr/local/bin/evil", "/opt/ml/input/data/train/evil", "/opt/ml/input/config/evil"):
        assert "errno 30" in outcome[path], (path, outcome[path])  # EROFS: read-only file system
    for path in ("/tmp/ok", "/opt/ml/model/ok", "/opt/ml/output/data/ok", "/opt/ml/checkpoints/ok"):
        assert outcome[path] == "written", (path, outcome[path])
    assert not (ws.channel("train") / "evil").exists()
    assert (ws.model_dir / "ok").exists() and (ws.checkpoints / "ok").exists()


def test_memory_limit_kills_and_reports_out_of_memory(runner, test_image, make_workspace):
    ws = make_workspace()
    result, lines, _, elapsed = run_job(
        runner, ws, test_image, env={"TEST_ACTION": "oom"}, limits=ResourceLimits(memory_bytes=128 * 2**20)
    )
    assert result.outcome is Outcome.out_of_memory, (result, lines[-3:])
    assert "128 MiB" in result.reason
    allocated = [int(line.split()[1]) for line in lines if line.startswith("allocated")]
    assert allocated and max(allocated) <= 128, allocated[-3:]
    assert elapsed < 60


def test_deadline_ends_with_timeout(runner, test_image, make_workspace):
    ws = make_workspace()
    result, lines, _, elapsed = run_job(runner, ws, test_image, env={"TEST_ACTION": "sleep"}, deadline_s=3)
    assert result.outcome is Outcome.timeout, (result, lines)
    assert "timeout" in result.reason
    assert 3 <= elapsed < 3 + 10, elapsed
    assert "woke up" not in lines
    assert runner.list_containers() == []


@pytest.mark.parametrize("action", ["sleep", "ignore_term"])
def test_cancel_stops_the_container_within_10s(runner, test_image, make_workspace, action):
    ws = make_workspace()
    cancel = threading.Event()
    started = threading.Event()
    lines: list[str] = []

    def on_line(line):
        lines.append(line)
        if line == "sleeping":
            started.set()

    box = {}
    request = RunRequest(job_id="cancel-me", workspace=ws, trainer="test", image=test_image, env={"TEST_ACTION": action})
    th = threading.Thread(target=lambda: box.update(result=runner.run(request, on_line, cancel)))
    th.start()
    assert started.wait(60), lines
    assert len(runner.list_containers()) == 1
    t0 = time.monotonic()
    cancel.set()
    th.join(30)
    took = time.monotonic() - t0
    assert not th.is_alive()
    assert box["result"].outcome is Outcome.cancelled, box
    assert took < 10, took
    assert runner.list_containers() == []


def test_logs_stream_line_by_line_while_running(runner, test_image, make_workspace):
    ws = make_workspace()
    result, lines, timed, elapsed = run_job(
        runner, ws, test_image, env={"TEST_ACTION": "ticks", "TEST_TICKS": "5", "TEST_TICK_S": "1"}
    )
    assert result.outcome is Outcome.succeeded
    ticks = [(t, line) for t, line in timed if line.startswith("tick ")]
    assert [line.split()[1] for _, line in ticks] == ["0", "1", "2", "3", "4"]
    # Each line reached on_line about when it was printed, not in one batch at the end.
    arrival = [t for t, _ in ticks]
    assert arrival[-1] - arrival[0] > 3, arrival
    assert arrival[0] < elapsed - 3, (arrival, elapsed)
    printed = [float(line.split()[2]) for _, line in ticks]
    assert all(b - a > 0.5 for a, b in zip(arrival, arrival[1:])), arrival
    assert printed == sorted(printed)


def test_failure_file_becomes_the_reason(runner, test_image, make_workspace):
    ws = make_workspace()
    result, lines, _, _ = run_job(runner, ws, test_image, env={"TEST_ACTION": "fail"})
    assert result.outcome is Outcome.failed
    assert result.exit_code == 2
    assert result.reason == "the dataset has only one class: need at least two"


def test_exit_code_without_failure_file(runner, test_image, make_workspace):
    ws = make_workspace()
    result, _, _, _ = run_job(runner, ws, test_image, env={"TEST_ACTION": "crash", "TEST_EXIT": "7"})
    assert result.outcome is Outcome.failed and result.exit_code == 7
    assert "exited with code 7" in result.reason


def test_missing_image_fails_cleanly(runner, make_workspace, docker_client):
    ws = make_workspace()
    result, _, _, _ = run_job(runner, ws, "retrain/no-such-image:latest")
    assert result.outcome is Outcome.failed
    assert "retrain/no-such-image:latest" in result.reason and "not available" in result.reason


def test_container_settings(runner, test_image, make_workspace, docker_client):
    """What the engine was asked for: mounts, limits, GPU device requests pinned to ids, labels."""
    ws = make_workspace()
    request = RunRequest(
        job_id="cfg", workspace=ws, trainer="test", image=test_image, gpus=("1", "3"),
        limits=ResourceLimits(memory_bytes=512 * 2**20, cpus=1.5, pids=256, shm_bytes=64 * 2**20),
    )
    container, _ = runner._create(request, test_image, runner._user())
    try:
        attrs = docker_client.api.inspect_container(container.id)
    finally:
        container.remove(force=True)
    hc = attrs["HostConfig"]
    assert hc["NetworkMode"] == "none"
    assert hc["ReadonlyRootfs"] is True
    assert hc["CapDrop"] == ["ALL"] and not hc.get("CapAdd")
    assert hc["SecurityOpt"] == ["no-new-privileges"]
    assert hc["Privileged"] is False
    assert hc["Memory"] == 512 * 2**20 and hc["MemorySwap"] == 512 * 2**20
    assert hc["NanoCpus"] == 1_500_000_000
    assert hc["PidsLimit"] == 256
    assert hc["ShmSize"] == 64 * 2**20
    assert "/tmp" in hc["Tmpfs"]
    assert hc["DeviceRequests"] == [
        {"Driver": "", "Count": 0, "DeviceIDs": ["1", "3"], "Capabilities": [["gpu"]], "Options": {}}
    ]
    binds = {m["Destination"]: (m["Source"], m["RW"]) for m in attrs["Mounts"]}
    assert binds == {
        "/opt/ml/input": (str((ws.root / "input").resolve()), False),
        "/opt/ml/model": (str(ws.model_dir.resolve()), True),
        "/opt/ml/output": (str((ws.root / "output").resolve()), True),
        "/opt/ml/checkpoints": (str(ws.checkpoints.resolve()), True),
    }
    assert attrs["Config"]["User"] not in ("", "0", "root", "0:0")
    assert attrs["Config"]["Labels"]["retrain.job_id"] == "cfg"
    assert attrs["Config"]["Labels"]["retrain.worker"] == runner.worker_id
    env = dict(e.split("=", 1) for e in attrs["Config"]["Env"])
    assert env["SM_NUM_GPUS"] == "2" and env["SM_NUM_CPUS"] == "2"


def test_no_gpus_means_no_device_requests(runner, test_image, make_workspace, docker_client):
    ws = make_workspace()
    request = RunRequest(job_id="cpu", workspace=ws, trainer="test", image=test_image)
    container, _ = runner._create(request, test_image, runner._user())
    try:
        hc = docker_client.api.inspect_container(container.id)["HostConfig"]
    finally:
        container.remove(force=True)
    assert not hc.get("DeviceRequests")


KILLED_WORKER = r"""
import sys, threading
from pathlib import Path
from worker.runners.base import RunRequest
from worker.runners.docker import DockerRunner
from worker.workspace import Workspace
runner = DockerRunner(worker_id=sys.argv[1])
req = RunRequest(job_id="orphan-job", workspace=Workspace(Path(sys.argv[2])), trainer="test",
                 image=sys.argv[3], env={"TEST_ACTION": "sleep"})
runner.run(req, lambda line: print(line, flush=True), threading.Event())
"""


def test_killed_workers_container_is_cleaned_up_after_restart(test_image, make_workspace, docker_client, worker_id):
    from worker.runners.docker import DockerRunner

    ws = make_workspace()
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WORKER, worker_id, str(ws.root), test_image],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout.readline().strip() == "sleeping"
        proc.send_signal(signal.SIGKILL)  # the worker dies; its container lives on
        proc.wait(10)
    finally:
        proc.kill()
    left = docker_client.containers.list(all=True, filters={"label": [f"retrain.worker={worker_id}"]})
    assert [c.status for c in left] == ["running"]
    assert left[0].labels["retrain.job_id"] == "orphan-job"

    # Another worker's containers are not touched.
    other = DockerRunner(worker_id=worker_id + "-other", client=docker_client)
    assert other.cleanup_orphans() == []

    restarted = DockerRunner(worker_id=worker_id, client=docker_client)
    t0 = time.monotonic()
    removed = restarted.cleanup_orphans()
    assert [r.job_id for r in removed] == ["orphan-job"]
    assert time.monotonic() - t0 < 15
    assert docker_client.containers.list(all=True, filters={"label": [f"retrain.worker={worker_id}"]}) == []


def test_cleanup_spares_the_running_instances_own_containers(runner, test_image, make_workspace):
    ws = make_workspace()
    cancel = threading.Event()
    started = threading.Event()
    request = RunRequest(job_id="mine", workspace=ws, trainer="test", image=test_image, env={"TEST_ACTION": "sleep"})
    th = threading.Thread(target=runner.run, args=(request, lambda l: l == "sleeping" and started.set(), cancel))
    th.start()
    try:
        assert started.wait(60)
        assert runner.cleanup_orphans() == []
        assert len(runner.list_containers()) == 1
    finally:
        cancel.set()
        th.join(30)


def test_two_jobs_run_side_by_side(runner, test_image, make_workspace):
    """One runner object, two jobs at once in two threads (the worker's concurrency N = 2)."""
    results, spans = {}, {}

    def job(name):
        ws = make_workspace(name)
        t0 = time.monotonic()
        results[name], *_ = run_job(runner, ws, test_image, env={"TEST_ACTION": "ticks", "TEST_TICKS": "4", "TEST_TICK_S": "1"})
        spans[name] = (t0, time.monotonic())

    threads = [threading.Thread(target=job, args=(n,)) for n in ("job-a", "job-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r.outcome is Outcome.succeeded for r in results.values()), results
    (a0, a1), (b0, b1) = spans["job-a"], spans["job-b"]
    assert min(a1, b1) - max(a0, b0) > 2, spans  # they overlapped
    assert runner.list_containers() == []


def test_cleanup_leaves_containers_of_a_live_worker_with_the_same_id(test_image, docker_client, worker_id):
    """Two live processes sharing a worker id (a misconfiguration, or two test sessions on one
    host) must not kill each other's containers; once the owner dies they are orphans."""
    from worker.runners import docker as docker_runner

    owner = subprocess.Popen(["sleep", "300"])
    try:
        start = docker_runner._process_start(owner.pid)
        token = f"{docker_runner.socket.gethostname()}:{docker_runner._boot_id()}:{owner.pid}:{start}"
        docker_client.containers.run(
            test_image, ["sleep", "300"], detach=True, network_mode="none",
            labels={"retrain.worker": worker_id, "retrain.job_id": "live-job", "retrain.owner": token},
        )
        runner = docker_runner.DockerRunner(worker_id=worker_id, client=docker_client, stop_timeout_s=1)
        assert runner.cleanup_orphans() == []
        assert [c.job_id for c in runner.list_containers()] == ["live-job"]
    finally:
        owner.kill()
        owner.wait()
    assert [c.job_id for c in runner.cleanup_orphans()] == ["live-job"]
    assert runner.list_containers() == []
