"""The docker runner: one sandboxed training container per job, through the Docker Engine API.

    runner = DockerRunner(worker_id="worker-1")
    runner.cleanup_orphans()                 # once at start: containers of this worker's last life
    result = runner.run(request, on_line, cancel)

The container sees the contract paths and nothing else of the host:
  <workspace>/input        -> /opt/ml/input        read-only (config + data channels)
  <workspace>/model        -> /opt/ml/model        writable
  <workspace>/output       -> /opt/ml/output       writable (data/, failure)
  <workspace>/checkpoints  -> /opt/ml/checkpoints  writable, kept between attempts
It runs `train` (the SageMaker contract) with the SM_* variables for /opt/ml plus request.env,
no network (network_mode=none), as a non-root uid:gid, with every capability dropped,
no-new-privileges, a read-only root file system and a tmpfs on /tmp (HOME=/tmp), under the
memory / CPU / pids / shm limits of the request (runner defaults fill what the request leaves
unset), with Docker's init as PID 1 so SIGTERM reaches the trainer, and with GPUs only when the
request names device ids (device requests pinned to those ids).

User: a worker that is not root runs the container as its own uid:gid, so the files the trainer
writes belong to the worker. A root worker runs it as `container_user` (default 1000:1000, the
`trainer` user of our images) and chowns the job's workspace to it first; root can still read and
delete everything afterwards.

Orphans: containers carry the labels retrain.job_id, retrain.worker and retrain.instance (one
per DockerRunner object). `cleanup_orphans()` stops and removes this worker id's containers that
another instance (a previous life of the worker) started; it does not re-adopt them. The job's
Kafka message was not committed, so it is delivered again and rerun; the checkpoints directory is
kept in the workspace, so a trainer that checkpoints resumes. `list_containers()` shows what
exists, for a caller that would rather re-adopt.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import docker
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.types import DeviceRequest, LogConfig

from worker.runners.base import (
    Outcome,
    ResourceCaps,
    ResourceLimits,
    ResourcesRefused,
    RunRequest,
    RunResult,
    apply_caps,
    cpu_count_for,
    failure_reason,
    relay_lines,
)
from worker.workspace import CONTAINER_ROOT, Workspace

log = logging.getLogger(__name__)

LABEL_JOB = "retrain.job_id"
LABEL_WORKER = "retrain.worker"
LABEL_INSTANCE = "retrain.instance"
LABEL_MANAGED = "retrain.managed"
LABEL_OWNER = "retrain.owner"  # host:pid:process-start of the worker process that started it

DEFAULT_IMAGES = {
    "audio": "retrain/trainer-audio:latest",
    "keras": "retrain/trainer-keras:latest",
}


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    name: str
    job_id: str
    worker_id: str
    status: str  # created / running / exited / ...


class DockerRunner:
    def __init__(
        self,
        worker_id: str = "worker",
        client: docker.DockerClient | None = None,
        *,
        images: dict[str, str] | None = None,
        default_limits: ResourceLimits | None = None,
        container_user: str = "1000:1000",
        tmp_size: str = "2g",
        stop_timeout_s: int = 5,
        runtime: str | None = None,
        caps: ResourceCaps | None = None,
    ):
        """`images`: built-in trainer name -> image (request.image wins when set).
        `default_limits`: used for every limit the request leaves as None.
        `container_user`: uid:gid for containers when the worker runs as root.
        `stop_timeout_s`: SIGTERM grace before SIGKILL on cancel/timeout (keep it under 10 s).
        `runtime`: e.g. "nvidia" on hosts with the legacy nvidia runtime instead of the CDI/hook.
        `caps`: the most a job may ask for (default: Settings.job_max_*); a job over a cap fails
        with a reason, and a limit left unset by the job and the defaults becomes the cap."""
        self.worker_id = worker_id
        # Every running job holds two streaming connections (logs, wait): a roomy pool.
        self.client = client or docker.from_env(timeout=120, max_pool_size=64)
        self.images = {**DEFAULT_IMAGES, **(images or {})}
        self.default_limits = default_limits or ResourceLimits(memory_bytes=None, cpus=None)
        self.container_user = container_user
        self.tmp_size = tmp_size
        self.stop_timeout_s = stop_timeout_s
        self.runtime = runtime
        if caps is None:
            from jobs.settings import get_settings

            caps = ResourceCaps.from_settings(get_settings())
        self.caps = caps
        self.instance = uuid.uuid4().hex[:12]
        self._active: set[str] = set()
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- helpers
    def image_for(self, request: RunRequest) -> str:
        return request.image or self.images.get(request.trainer) or f"retrain/trainer-{request.trainer}:latest"

    def ping(self) -> bool:
        try:
            return bool(self.client.ping())
        except DockerException:
            return False

    def _limits(self, request: RunRequest) -> ResourceLimits:
        """The request's limits, runner defaults filling what it leaves unset, within the caps."""
        return apply_caps(request, self.caps, self.default_limits).limits

    def _user(self) -> str:
        if os.getuid() != 0:
            return f"{os.getuid()}:{os.getgid()}"
        return self.container_user

    @staticmethod
    def _prepare_dirs(ws: Workspace, user: str) -> None:
        for path in (ws.root / "input", ws.input_config, ws.model_dir, ws.output_data, ws.checkpoints):
            path.mkdir(parents=True, exist_ok=True)
        if os.getuid() != 0:
            return
        uid, gid = (int(x) for x in user.split(":"))
        # The trainer must write model/output/checkpoints and read input; give it the workspace.
        for top in (ws.root,):
            os.chown(top, uid, gid)
            for dirpath, dirnames, filenames in os.walk(top):
                for name in dirnames + filenames:
                    try:
                        os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)
                    except FileNotFoundError:
                        pass

    def _create(self, request: RunRequest, image: str, user: str):
        ws = request.workspace
        limits = self._limits(request)
        cpus = limits.cpus
        env = ws.sm_env(CONTAINER_ROOT, num_gpus=len(request.gpus), num_cpus=cpu_count_for(limits))
        env["HOME"] = "/tmp"
        env.update(request.env)
        env.update(request.trainer_env())  # the progress token: last, nothing overrides it
        volumes = {
            str((ws.root / "input").resolve()): {"bind": str(CONTAINER_ROOT / "input"), "mode": "ro"},
            str(ws.model_dir.resolve()): {"bind": str(CONTAINER_ROOT / "model"), "mode": "rw"},
            str((ws.root / "output").resolve()): {"bind": str(CONTAINER_ROOT / "output"), "mode": "rw"},
            str(ws.checkpoints.resolve()): {"bind": str(CONTAINER_ROOT / "checkpoints"), "mode": "rw"},
        }
        kwargs: dict = dict(
            command=["train"],
            name=f"retrain-{_safe(request.job_id)}-{uuid.uuid4().hex[:6]}",
            hostname="algo-1",
            labels={LABEL_JOB: request.job_id, LABEL_WORKER: self.worker_id,
                    LABEL_INSTANCE: self.instance, LABEL_MANAGED: "true", LABEL_OWNER: _owner_token()},
            environment=env,
            volumes=volumes,
            user=user,
            working_dir="/tmp",
            network_mode="none",
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            read_only=True,
            tmpfs={"/tmp": f"rw,exec,nosuid,nodev,size={self.tmp_size},mode=1777"},
            init=True,
            ipc_mode="private",
            pids_limit=limits.pids,
            # The engine's own copy of the output is bounded too: a trainer printing forever must not
            # fill the host's disk (the worker reads the stream live; train.log has its own bound).
            log_config=LogConfig(type=LogConfig.types.JSON, config={"max-size": "16m", "max-file": "2"}),
            detach=True,
        )
        if limits.memory_bytes:
            kwargs["mem_limit"] = int(limits.memory_bytes)
            kwargs["memswap_limit"] = int(limits.memory_bytes)  # no swap on top
        if cpus:
            kwargs["nano_cpus"] = int(cpus * 1e9)
        if limits.shm_bytes:
            kwargs["shm_size"] = int(limits.shm_bytes)
        if request.gpus:
            kwargs["device_requests"] = [DeviceRequest(device_ids=list(request.gpus), capabilities=[["gpu"]])]
            kwargs["environment"].setdefault("NVIDIA_DRIVER_CAPABILITIES", "compute,utility")
        if self.runtime:
            kwargs["runtime"] = self.runtime
        return self.client.containers.create(image, **kwargs), limits

    # -------------------------------------------------------------------- run
    def run(self, request: RunRequest, on_line: Callable[[str], None], cancel: threading.Event) -> RunResult:
        image = self.image_for(request)
        try:
            self.client.images.get(image)
        except ImageNotFound:
            return RunResult(Outcome.failed, None, f"image {image} is not available on this worker")
        except DockerException as exc:
            return RunResult(Outcome.failed, None, f"Docker Engine not reachable: {exc}")
        if cancel.is_set():
            return RunResult(Outcome.cancelled, None, "cancelled before the container started")
        try:
            request = apply_caps(request, self.caps, self.default_limits)
        except ResourcesRefused as err:
            return RunResult(Outcome.failed, None, str(err))

        user = self._user()
        self._prepare_dirs(request.workspace, user)
        try:
            container, limits = self._create(request, image, user)
        except (APIError, DockerException) as exc:
            return RunResult(Outcome.failed, None, f"could not create the container: {_explain(exc)}")
        with self._lock:
            self._active.add(container.id)
        tail: collections.deque[str] = collections.deque(maxlen=20)
        try:
            return self._run_container(container, request, limits, on_line, cancel, tail)
        finally:
            try:
                container.remove(force=True)
            except NotFound:
                pass
            except DockerException as exc:
                log.warning("could not remove container %s: %s", container.name, exc)
            with self._lock:
                self._active.discard(container.id)

    def _run_container(self, container, request, limits, on_line, cancel, tail) -> RunResult:
        try:
            container.start()
        except APIError as exc:
            return RunResult(Outcome.failed, None, f"could not start the container: {_explain(exc)}")
        started = time.monotonic()
        log.info("job %s: container %s (%s) started", request.job_id, container.name, container.short_id)

        logs_done = threading.Thread(target=self._pump_logs, args=(container, on_line, tail),
                                     name=f"logs-{request.job_id}", daemon=True)
        logs_done.start()
        exited = threading.Event()
        wait_result: dict = {}

        def waiter():
            try:
                wait_result.update(container.wait())
            except Exception as exc:  # the engine went away, etc.
                wait_result["error"] = exc
            finally:
                exited.set()

        threading.Thread(target=waiter, name=f"wait-{request.job_id}", daemon=True).start()

        stopped_for: Outcome | None = None
        while not exited.wait(0.2):
            if cancel.is_set():
                stopped_for = Outcome.cancelled
            elif time.monotonic() - started > request.deadline_s:
                stopped_for = Outcome.timeout
            if stopped_for:
                log.info("job %s: stopping container (%s)", request.job_id, stopped_for)
                self._stop(container)
                exited.wait(self.stop_timeout_s + 10)
                break
        logs_done.join(timeout=10)

        try:
            container.reload()
            state = container.attrs.get("State", {})
        except DockerException:
            state = {}
        exit_code = state.get("ExitCode", wait_result.get("StatusCode"))
        oom = bool(state.get("OOMKilled"))
        elapsed = time.monotonic() - started

        if stopped_for is Outcome.cancelled:
            return RunResult(Outcome.cancelled, exit_code, "cancelled")
        if stopped_for is Outcome.timeout:
            return RunResult(Outcome.timeout, exit_code, f"timeout: still running after the {request.deadline_s} s deadline")
        if "error" in wait_result and exit_code is None:
            return RunResult(Outcome.failed, None, f"lost the container: {wait_result['error']}")
        if oom or (exit_code == 137 and limits.memory_bytes):
            mib = f"{limits.memory_bytes / 2**20:.0f} MiB" if limits.memory_bytes else "its"
            return RunResult(Outcome.out_of_memory, exit_code,
                             f"out of memory: the trainer went past its memory limit of {mib} and was killed")
        if exit_code == 0:
            return RunResult(Outcome.succeeded, 0)
        last = " | ".join(list(tail)[-5:]).replace(request.progress_token, "<token>")
        fallback = f"trainer exited with code {exit_code} after {elapsed:.0f} s" + (f"; last output: {last}" if last else "")
        return RunResult(Outcome.failed, exit_code, failure_reason(request.workspace, fallback))

    def _stop(self, container) -> None:
        try:
            container.stop(timeout=self.stop_timeout_s)
        except NotFound:
            pass
        except DockerException as exc:
            log.warning("stop of %s failed (%s); killing it", container.name, exc)
            try:
                container.kill()
            except DockerException:
                pass

    @staticmethod
    def _pump_logs(container, on_line: Callable[[str], None], tail) -> None:
        """stdout and stderr, line by line, as the trainer writes them; lines are bounded and a
        bad line or a failing callback never ends the reading (worker.runners.base.relay_lines)."""
        try:
            stream = container.logs(stream=True, follow=True, stdout=True, stderr=True)
        except DockerException as exc:
            log.warning("log stream of %s did not start: %s", container.name, exc)
            return
        relay_lines(stream, on_line, what=f"container {container.name}", tail=tail)

    # ---------------------------------------------------------------- orphans
    def list_containers(self, worker_id: str | None = None) -> list[ContainerInfo]:
        wid = worker_id or self.worker_id
        found = self.client.containers.list(all=True, filters={"label": [f"{LABEL_WORKER}={wid}"]})
        return [ContainerInfo(c.id, c.name, c.labels.get(LABEL_JOB, ""), wid, c.status) for c in found]

    def cleanup_orphans(self, worker_id: str | None = None) -> list[ContainerInfo]:
        """Stop and remove the containers labelled with this worker id that this runner did not
        start (a previous life of the worker). Returns what it removed. Call it at start-up."""
        wid = worker_id or self.worker_id
        removed = []
        for c in self.client.containers.list(all=True, filters={"label": [f"{LABEL_WORKER}={wid}"]}):
            with self._lock:
                if c.id in self._active or c.labels.get(LABEL_INSTANCE) == self.instance:
                    continue
            if _owner_alive(c.labels.get(LABEL_OWNER, "")):
                # Another live process on this host uses the same worker id (a misconfiguration,
                # or two test sessions): its containers are not orphans.
                log.warning("container %s has worker id %s but its worker process is alive: left alone", c.name, wid)
                continue
            info = ContainerInfo(c.id, c.name, c.labels.get(LABEL_JOB, ""), wid, c.status)
            log.warning("removing orphan container %s of job %s (%s)", c.name, info.job_id, c.status)
            try:
                if c.status in ("running", "restarting", "paused"):
                    c.stop(timeout=self.stop_timeout_s)
                c.remove(force=True)
                removed.append(info)
            except NotFound:
                removed.append(info)
            except DockerException as exc:
                log.warning("could not remove orphan %s: %s", c.name, exc)
        return removed


def _process_start(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks since boot


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _owner_token() -> str:
    return f"{socket.gethostname()}:{_boot_id()}:{os.getpid()}:{_process_start(os.getpid()) or ''}"


def _owner_alive(token: str) -> bool:
    """True when the token names a process of this host, this boot, that is still running (same
    pid and start time, so a recycled pid does not count)."""
    try:
        host, boot, pid, start = token.rsplit(":", 3)
    except ValueError:
        return False
    if host != socket.gethostname() or boot != _boot_id() or not start:
        return False
    if int(pid) == os.getpid():
        return False  # our own process: a previous runner object in it is gone
    return _process_start(int(pid)) == start


def _safe(job_id: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "_.-" else "-" for ch in job_id)
    return keep[:64] or "job"


def _explain(exc: Exception) -> str:
    if isinstance(exc, APIError) and exc.explanation:
        return str(exc.explanation)
    return str(exc)


__all__ = ["DockerRunner", "ContainerInfo", "DEFAULT_IMAGES", "LABEL_JOB", "LABEL_WORKER"]
