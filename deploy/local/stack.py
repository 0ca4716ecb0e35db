"""The local stack: Kafka (KRaft), MinIO, optionally PostgreSQL, the API and workers as plain
background processes.

No Docker: Kafka runs from the Maven Central jars, MinIO from the binary that
`deploy/local/install.sh` puts under ~/.cache/retrain, PostgreSQL from Debian's
postgresql-15 binaries. The API's database is SQLite (embedded, the default) or, with
`database="postgres"` (RETRAIN_STACK_DATABASE=postgres), a PostgreSQL server of the stack's
own. The API and the workers reach MinIO as users of their own (`minio_service_user`), not as
root. Every process is started in its own session, so its PID is also its process-group id
and stopping it stops whatever it spawned (a worker's trainer subprocess included).

Layout under the run dir (default `.run/` in the repo root):

    <name>.pid           PID of the running service (absent when stopped)
    <name>.log           its stdout + stderr, appended across restarts
    data/<name>/         its data; survives `down`/`up`
    work/                the workers' shared workdir (a replacement worker resumes checkpoints)
    retrain.db           the API's SQLite database (database="sqlite")

PostgreSQL refuses to run as root: started by root it runs as the `postgres` user, its data
outside the run dir (which may not be reachable for that user) in
$TMPDIR/retrain-postgres-<hash of the run dir>/, removed by `purge_postgres()`.

Library use (tests):

    stack = Stack(run_dir=tmp, kafka_port=..., minio_port=..., api_port=...)
    stack.up(["kafka", "minio"])
    ... stack.env(), stack.kafka_bootstrap, stack.s3_endpoint ...
    stack.down()

CLI (ports from RETRAIN_* env when set, see `Stack.from_env`):

    .venv/bin/python deploy/local/stack.py up|down|status|env [names...]

This module imports nothing from the project and only the standard library at import
time, so it runs under any Python; readiness of Kafka uses confluent_kafka when it is
importable (it is in .venv) and falls back to a TCP probe otherwise.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import hmac
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
KAFKA_VERSION = "3.9.1"  # keep in step with deploy/local/install.sh and kafka-pom.xml
CACHE = Path(os.environ.get("RETRAIN_CACHE", Path.home() / ".cache" / "retrain"))

# Start order; `down` uses the reverse. Extra workers ("worker-2", ...) come after "worker",
# extra API replicas ("api-2", ..., each on a free port of its own) after "api".
# "postgres" is started by default only by a stack whose database is PostgreSQL.
ORDER = ("kafka", "minio", "postgres", "api", "worker")
POSTGRES_BIN = Path(os.environ.get("RETRAIN_POSTGRES_BIN", "/usr/lib/postgresql/15/bin"))
POSTGRES_USER = "retrain"  # the server's superuser, trusted on its loopback address only
# What the API's and the workers' MinIO users may do: objects of their bucket, nothing else (no
# other bucket, no bucket creation or policy, no admin). The stack makes the bucket as root.
SERVICE_POLICY_ACTIONS = {
    "bucket": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
    "objects": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
}
# How each service is asked to stop: PostgreSQL's SIGTERM waits for every client to leave.
STOP_SIGNALS = {"postgres": signal.SIGINT}


class StackError(RuntimeError):
    """A service failed to start or to become ready; the message carries its log tail."""


def _tail(path: Path, n: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=n))
    except FileNotFoundError:
        return "(no log file)"


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Without SO_REUSEADDR a port in TIME_WAIT from our own previous run looks taken.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def _tcp_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _pid_alive(pid: int) -> bool:
    """True when `pid` exists and is not a zombie (a dead child we have not reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The state follows the parenthesised command name, which may contain spaces.
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _start_time(pid: int) -> str | None:
    """When `pid` started (clock ticks since boot, /proc/<pid>/stat field 22): with the pid, what
    tells our process from a later one that got the same number (pids wrap at pid_max, 32768 here)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for tests that run a second stack)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Stack:
    def __init__(
        self,
        run_dir: str | os.PathLike | None = None,
        *,
        host: str = "127.0.0.1",
        api_port: int = 8000,
        kafka_port: int = 9092,
        kafka_controller_port: int = 9093,
        minio_port: int = 9000,
        minio_console_port: int = 9001,
        postgres_port: int = 5432,
        database: str = "sqlite",
        s3_access_key: str = "retrain",
        s3_secret_key: str = "retrain-secret",
        s3_bucket: str | None = None,
        kafka_home: str | os.PathLike | None = None,
        minio_bin: str | os.PathLike | None = None,
        python: str | os.PathLike | None = None,
        trainer_python: str | os.PathLike | None = None,
        database_url: str | None = None,
        workdir: str | os.PathLike | None = None,
        kafka_heap: str = "512m",
        extra_env: dict[str, str] | None = None,
        ready_timeout: float = 60.0,
    ):
        self.root = REPO_ROOT
        self.run_dir = Path(run_dir if run_dir is not None else REPO_ROOT / ".run").resolve()
        self.host = host
        self.api_port = api_port
        self.kafka_port = kafka_port
        self.kafka_controller_port = kafka_controller_port
        self.minio_port = minio_port
        self.minio_console_port = minio_console_port
        self.postgres_port = postgres_port
        if database not in ("sqlite", "postgres"):
            raise ValueError(f"database must be 'sqlite' or 'postgres', not {database!r}")
        self.database = database
        self.s3_access_key = s3_access_key
        self.s3_secret_key = s3_secret_key
        self.s3_bucket = s3_bucket
        self.kafka_home = Path(kafka_home or CACHE / f"kafka-{KAFKA_VERSION}")
        self.minio_bin = Path(minio_bin or CACHE / "bin" / "minio")
        venv_python = REPO_ROOT / ".venv" / "bin" / "python"
        self.python = str(python or (venv_python if venv_python.exists() else sys.executable))
        # Absolute, because workers may run the trainer from another working directory.
        self.trainer_python = str((REPO_ROOT / (trainer_python or ".venv-trainer/bin/python")).absolute())
        self._database_url = database_url
        self._workdir = Path(workdir).resolve() if workdir else None
        self.kafka_heap = kafka_heap
        self.extra_env = dict(extra_env or {})
        self.ready_timeout = ready_timeout
        # Popen objects of the children this process started: lets us reap them (a dead,
        # unreaped child is a zombie that still "exists" for os.kill(pid, 0)).
        self._procs: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ configuration

    @classmethod
    def from_env(cls, run_dir: str | os.PathLike | None = None, **overrides) -> "Stack":
        """A Stack on the ports named by the RETRAIN_* settings (what `make up` uses).

        Reads RETRAIN_RUN_DIR, RETRAIN_API_HOST/RETRAIN_API_PORT, RETRAIN_KAFKA_BOOTSTRAP
        (first host:port), RETRAIN_KAFKA_CONTROLLER_PORT, RETRAIN_S3_ENDPOINT,
        RETRAIN_MINIO_CONSOLE_PORT, RETRAIN_S3_ACCESS_KEY/SECRET_KEY/BUCKET,
        RETRAIN_DATABASE_URL, RETRAIN_TRAINER_PYTHON, RETRAIN_WORKDIR (relative paths are
        taken from the repo root, where the services run), RETRAIN_STACK_DATABASE (sqlite or
        postgres) and RETRAIN_POSTGRES_PORT.
        """
        e = os.environ
        kw: dict = {}
        if e.get("RETRAIN_API_HOST"):
            kw["host"] = e["RETRAIN_API_HOST"]
        if e.get("RETRAIN_API_PORT"):
            kw["api_port"] = int(e["RETRAIN_API_PORT"])
        if e.get("RETRAIN_KAFKA_BOOTSTRAP"):
            kw["kafka_port"] = int(e["RETRAIN_KAFKA_BOOTSTRAP"].split(",")[0].rsplit(":", 1)[1])
        if e.get("RETRAIN_KAFKA_CONTROLLER_PORT"):
            kw["kafka_controller_port"] = int(e["RETRAIN_KAFKA_CONTROLLER_PORT"])
        if e.get("RETRAIN_S3_ENDPOINT"):
            kw["minio_port"] = int(e["RETRAIN_S3_ENDPOINT"].split("://")[-1].rsplit(":", 1)[1])
        if e.get("RETRAIN_MINIO_CONSOLE_PORT"):
            kw["minio_console_port"] = int(e["RETRAIN_MINIO_CONSOLE_PORT"])
        for key, arg in (("RETRAIN_S3_ACCESS_KEY", "s3_access_key"),
                         ("RETRAIN_S3_SECRET_KEY", "s3_secret_key"),
                         ("RETRAIN_S3_BUCKET", "s3_bucket"),
                         ("RETRAIN_DATABASE_URL", "database_url"),
                         ("RETRAIN_TRAINER_PYTHON", "trainer_python")):
            if e.get(key):
                kw[arg] = e[key]
        if e.get("RETRAIN_WORKDIR"):
            kw["workdir"] = REPO_ROOT / e["RETRAIN_WORKDIR"]
        if e.get("RETRAIN_STACK_DATABASE"):
            kw["database"] = e["RETRAIN_STACK_DATABASE"]
        if e.get("RETRAIN_POSTGRES_PORT"):
            kw["postgres_port"] = int(e["RETRAIN_POSTGRES_PORT"])
        kw.update(overrides)
        return cls(run_dir or e.get("RETRAIN_RUN_DIR") or None, **kw)

    @property
    def kafka_bootstrap(self) -> str:
        return f"{self.host}:{self.kafka_port}"

    @property
    def s3_endpoint(self) -> str:
        """host:port, as RETRAIN_S3_ENDPOINT and the minio SDK want it (no scheme)."""
        return f"{self.host}:{self.minio_port}"

    @property
    def minio_url(self) -> str:
        return f"http://{self.s3_endpoint}"

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.api_port}"

    def metrics_url(self, name: str = "worker") -> str:
        """A worker's Prometheus endpoint (each worker gets a free port when it starts)."""
        port = int((self.run_dir / f"{name}.metrics-port").read_text())
        return f"http://{self.host}:{port}/metrics"

    @property
    def database_url(self) -> str:
        if self._database_url:
            return self._database_url
        if self.database == "postgres":
            return self.postgres_url("retrain")
        return f"sqlite:///{self.run_dir / 'retrain.db'}"

    def postgres_url(self, database: str) -> str:
        return f"postgresql+psycopg://{POSTGRES_USER}@{self.host}:{self.postgres_port}/{database}"

    @property
    def default_services(self) -> tuple[str, ...]:
        return tuple(n for n in ORDER if n != "postgres" or self.database == "postgres")

    @property
    def workdir(self) -> Path:
        # One workdir shared by all workers on this host: a worker that replaces a killed
        # one finds the job's checkpoints where the first one left them.
        return self._workdir or self.run_dir / "work"

    @property
    def urls(self) -> dict[str, str]:
        return {
            "api": self.api_url,
            "kafka": self.kafka_bootstrap,
            "minio": self.minio_url,
            "minio-console": f"http://{self.host}:{self.minio_console_port}",
            **({"postgres": f"{self.host}:{self.postgres_port}"} if self.database == "postgres" else {}),
        }

    def env(self) -> dict[str, str]:
        """The RETRAIN_* settings that point a process (API, worker, test client) here."""
        env = {
            "RETRAIN_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "RETRAIN_S3_ENDPOINT": self.s3_endpoint,
            "RETRAIN_S3_ACCESS_KEY": self.s3_access_key,
            "RETRAIN_S3_SECRET_KEY": self.s3_secret_key,
            "RETRAIN_S3_SECURE": "false",
            "RETRAIN_DATABASE_URL": self.database_url,
            "RETRAIN_API_HOST": self.host,
            "RETRAIN_API_PORT": str(self.api_port),
            "RETRAIN_WORKDIR": str(self.workdir),
            "RETRAIN_TRAINER_PYTHON": self.trainer_python,
            "RETRAIN_TRAINER_DIR": str(self.root / "trainer_images"),
        }
        if self.s3_bucket:
            env["RETRAIN_S3_BUCKET"] = self.s3_bucket
        env.update(self.extra_env)
        return env

    # ------------------------------------------------------------------ paths and state

    def pid_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def log_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.log"

    def data_dir(self, name: str) -> Path:
        if name == "postgres" and os.geteuid() == 0:  # see the module's docstring
            digest = hashlib.sha256(str(self.run_dir).encode()).hexdigest()[:12]
            return Path(tempfile.gettempdir()) / f"retrain-postgres-{digest}"
        return self.run_dir / "data" / name

    def pid(self, name: str) -> int | None:
        """PID of `name` if it is running (a stale pid file counts as not running)."""
        proc = self._procs.get(name)
        if proc is not None:
            # Our own child: poll() knows for sure (and reaps it, so it leaves no zombie).
            if proc.poll() is None and self.pid_path(name).exists():
                return proc.pid
            return None
        try:
            pid_text, _, started = self.pid_path(name).read_text().strip().partition(" ")
            pid = int(pid_text)
        except (FileNotFoundError, ValueError):
            return None
        if not _pid_alive(pid):
            return None
        # The number may belong to a later process by now (another stack's service even): not ours.
        if started and _start_time(pid) != started:
            return None
        # After a reboot the number may belong to another program: check it is ours.
        if self._signature(name) not in _cmdline(pid):
            return None
        return pid

    def is_running(self, name: str) -> bool:
        return self.pid(name) is not None

    def status(self) -> dict[str, int | None]:
        names = list(ORDER) + sorted(
            p.stem for pattern in ("api-*.pid", "worker-*.pid") for p in self.run_dir.glob(pattern) if p.stem not in ORDER
        )
        return {n: self.pid(n) for n in names}

    @staticmethod
    def _kind(name: str) -> str:
        if name in ORDER:
            return name
        for kind in ("api", "worker"):
            if name.startswith(f"{kind}-") and name[len(kind) + 1:]:
                return kind
        raise ValueError(f"unknown service {name!r} (kafka, minio, postgres, api, worker, worker-<n>)")

    def _signature(self, name: str) -> str:
        # A substring of the command line that identifies the service's process.
        return {"kafka": "kafka.Kafka", "minio": "minio", "postgres": "postgres", "api": "uvicorn",
                "worker": "-m worker"}[self._kind(name)]

    def _ordered(self, names) -> list[str]:
        names = list(self.default_services if names is None else ([names] if isinstance(names, str) else names))
        for n in names:
            self._kind(n)  # validate early, before starting anything

        def key(n: str):
            kind = self._kind(n)
            return (ORDER.index(kind), n != kind, n)

        return sorted(dict.fromkeys(names), key=key)

    @contextlib.contextmanager
    def _locked(self):
        # Two `make up`s at once (or a test and a shell) would both see "not running" and
        # start two Kafkas on one data dir; one lock file per run dir serialises them.
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / ".lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    # ------------------------------------------------------------------ up

    def up(self, names=None, *, wait: bool = True) -> None:
        """Start what is not running yet, in dependency order, each ready before the next."""
        names = self._ordered(names)
        with self._locked():
            for name in names:
                self._up_one(name, wait)

    def _up_one(self, name: str, wait: bool) -> None:
        """Start `name` unless it runs already; with `wait`, until its probe passes."""
        if self.is_running(name):
            print(f"[stack] {name}: already running (pid {self.pid(name)})", flush=True)
            return
        t0 = time.monotonic()
        kind = self._kind(name)
        getattr(self, f"_start_{kind}")(name)
        if wait:
            self._wait_ready(name)
            print(f"[stack] {name}: ready in {time.monotonic() - t0:.1f} s "
                  f"(pid {self.pid(name)}, log {self.log_path(name)})", flush=True)

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], ports: tuple[int, ...], user: str | None = None) -> None:
        for port in ports:
            # Another program on our port would answer our readiness probe and fool us.
            if not _port_free(self.host, port):
                raise StackError(f"{name}: port {self.host}:{port} is already in use by another process")
        self.pid_path(name).unlink(missing_ok=True)
        log = open(self.log_path(name), "ab")
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}: {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd,
            cwd=self.root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Own session: the pid is the process-group id, killpg reaches its children,
            # and a Ctrl-C in the terminal that ran `make up` does not reach the stack.
            start_new_session=True,
            user=user,
        )
        log.close()  # the child holds its own copy of the descriptor
        self._procs[name] = proc
        self.pid_path(name).write_text(f"{proc.pid} {_start_time(proc.pid) or ''}\n")

    def _service_env(self, kind: str | None = None) -> dict[str, str]:
        """The environment of a service process; the API and the workers get MinIO users of their own."""
        env = dict(os.environ)
        env.update(self.env())
        env["PYTHONUNBUFFERED"] = "1"  # log lines reach the log file as they happen
        if kind in ("api", "worker"):
            env["RETRAIN_S3_ACCESS_KEY"], env["RETRAIN_S3_SECRET_KEY"] = self.minio_service_user(kind)
        return env

    def minio_service_user(self, kind: str) -> tuple[str, str]:
        """The MinIO user (access key, secret key) that the API or the workers of this stack use:
        made, with a policy limited to the bucket's objects, with the root credentials, which only
        the stack and MinIO hold. Idempotent; the secret is derived from the root secret, so every
        Stack of this MinIO gives the same one. The bucket is made here too (the users may not)."""
        from minio import Minio
        from minio.credentials import StaticProvider
        from minio.minioadmin import MinioAdmin

        bucket = self.env().get("RETRAIN_S3_BUCKET", "retrain")
        user = f"{bucket}-{kind}"
        secret = hmac.new(self.s3_secret_key.encode(), user.encode(), "sha256").hexdigest()[:40]
        root = Minio(self.s3_endpoint, access_key=self.s3_access_key, secret_key=self.s3_secret_key, secure=False)
        if not root.bucket_exists(bucket):
            root.make_bucket(bucket)
        admin = MinioAdmin(endpoint=self.s3_endpoint, credentials=StaticProvider(self.s3_access_key, self.s3_secret_key), secure=False)
        admin.policy_add(user, policy={"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": SERVICE_POLICY_ACTIONS["bucket"], "Resource": [f"arn:aws:s3:::{bucket}"]},
            {"Effect": "Allow", "Action": SERVICE_POLICY_ACTIONS["objects"], "Resource": [f"arn:aws:s3:::{bucket}/*"]},
        ]})
        admin.user_add(user, secret)
        if user not in admin.user_info(user):  # "policyName" names the attached policy
            admin.attach_policy([user], user=user)
        return user, secret

    # --- kafka

    def _kafka_cluster_id(self, data: Path) -> str:
        """The cluster id, generated once and kept in the data dir (format needs the same one)."""
        path = data / "cluster.id"
        if path.exists():
            return path.read_text().strip()
        while True:
            # Kafka's Uuid.toString: URL-safe base64 of 16 random bytes, no padding; Kafka
            # refuses ids that start with '-' (they read as command-line flags).
            cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            if not cid.startswith("-"):
                break
        path.write_text(cid + "\n")
        return cid

    def _start_kafka(self, name: str) -> None:
        libs = self.kafka_home / "libs"
        if not any(libs.glob("kafka_2.13-*.jar")):
            raise StackError(f"kafka: no jars in {libs}; run deploy/local/install.sh")
        data = self.data_dir(name)
        (data / "logs").mkdir(parents=True, exist_ok=True)
        cid = self._kafka_cluster_id(data)
        h, p, cp = self.host, self.kafka_port, self.kafka_controller_port
        # Rewritten on every start so a change of ports takes effect; the data (log.dirs)
        # stays. Single node, broker and controller in one JVM, everything replicated once.
        (data / "server.properties").write_text(f"""\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@{h}:{cp}
listeners=PLAINTEXT://{h}:{p},CONTROLLER://{h}:{cp}
advertised.listeners=PLAINTEXT://{h}:{p}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs={data / 'logs'}
num.partitions=6
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=12
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=6
# A consumer group on one node has nobody to wait for: rebalance at once.
group.initial.rebalance.delay.ms=0
log.retention.hours=168
""")
        # Everything to stdout, i.e. to .run/kafka.log; the chatty request/state-change
        # loggers only at WARN.
        (data / "log4j.properties").write_text("""\
log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.state.change.logger=WARN
log4j.logger.kafka.controller=INFO
log4j.logger.org.apache.kafka.raft=INFO
log4j.logger.kafka.log.LogCleaner=WARN
log4j.logger.org.apache.kafka.storage.internals.log=WARN
log4j.logger.kafka.log=WARN
""")
        java = ["java", f"-Xmx{self.kafka_heap}", f"-Xms{self.kafka_heap}", "-XX:+UseG1GC",
                "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true",
                f"-Dlog4j.configuration=file:{data / 'log4j.properties'}",
                "-cp", f"{libs}/*"]
        env = dict(os.environ)
        if not (data / "logs" / "meta.properties").exists():
            # Format once; later starts reuse the formatted log dirs (data survives down/up).
            fmt = subprocess.run(
                java + ["kafka.tools.StorageTool", "format", "-t", cid,
                        "-c", str(data / "server.properties"), "--ignore-formatted"],
                cwd=data, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            with open(self.log_path(name), "a") as log:
                log.write(fmt.stdout)
            if fmt.returncode != 0:
                raise StackError(f"kafka: storage format failed ({fmt.returncode}):\n{fmt.stdout[-3000:]}")
        self._spawn(name, java + ["kafka.Kafka", str(data / "server.properties")], env,
                    (self.kafka_port, self.kafka_controller_port))

    def _kafka_ready(self) -> bool:
        try:
            from confluent_kafka.admin import AdminClient
        except ImportError:  # not in this interpreter: the port being open is the best we know
            return _tcp_open(self.host, self.kafka_port) and "Kafka Server started" in _tail(
                self.log_path("kafka"), 200)
        if not _tcp_open(self.host, self.kafka_port):
            return False  # skip librdkafka while nothing listens: it would log connect errors
        admin = AdminClient({"bootstrap.servers": self.kafka_bootstrap, "log_level": 0,
                             "socket.timeout.ms": 2000})
        try:
            md = admin.list_topics(timeout=2)
        except Exception:
            return False
        return bool(md.brokers)

    # --- minio

    def _start_minio(self, name: str) -> None:
        if not os.access(self.minio_bin, os.X_OK):
            raise StackError(f"minio: no binary at {self.minio_bin}; run deploy/local/install.sh")
        data = self.data_dir(name)
        data.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(MINIO_ROOT_USER=self.s3_access_key, MINIO_ROOT_PASSWORD=self.s3_secret_key,
                   # Offline machines: no update checks, no call-home.
                   MINIO_UPDATE="off", MINIO_CALLHOME_ENABLE="off")
        self._spawn(name, [str(self.minio_bin), "server", str(data),
                           "--address", f"{self.host}:{self.minio_port}",
                           "--console-address", f"{self.host}:{self.minio_console_port}",
                           "--quiet"],
                    env, (self.minio_port, self.minio_console_port))

    # --- postgres

    def _start_postgres(self, name: str) -> None:
        if not (POSTGRES_BIN / "postgres").is_file():
            raise StackError(f"postgres: no server binaries in {POSTGRES_BIN}; run deploy/local/install.sh")
        data = self.data_dir(name)
        user = "postgres" if os.geteuid() == 0 else None  # the server refuses to run as root
        if not (data / "PG_VERSION").exists():
            shutil.rmtree(data, ignore_errors=True)  # a half-made cluster from an interrupted init
            data.mkdir(mode=0o700, parents=True)
            if user:
                shutil.chown(data, user, user)
            init = subprocess.run(
                [str(POSTGRES_BIN / "initdb"), "-D", str(data), "-U", POSTGRES_USER, "--auth=trust",
                 "--encoding=UTF8", "--locale=C.UTF-8"],
                cwd=tempfile.gettempdir(), user=user, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            with open(self.log_path(name), "a") as log:
                log.write(init.stdout)
            if init.returncode != 0:
                raise StackError(f"postgres: initdb failed ({init.returncode}):\n{init.stdout[-3000:]}")
        # Loopback TCP only (no unix socket: its path would have to be writable for that user).
        self._spawn(name, [str(POSTGRES_BIN / "postgres"), "-D", str(data), "-h", self.host, "-p", str(self.postgres_port),
                           "-c", "unix_socket_directories=", "-c", "max_connections=200"],
                    dict(os.environ), (self.postgres_port,), user=user)

    def _postgres_ready(self) -> bool:
        """The server answers, and the service's database exists (made on the first start)."""
        if not _tcp_open(self.host, self.postgres_port):
            return False
        try:
            self.create_database("retrain")
        except StackError:
            return False
        return True

    def create_database(self, database: str) -> str:
        """Makes `database` on the stack's server unless it exists; its SQLAlchemy URL."""
        psql = [str(POSTGRES_BIN / "psql"), "-h", self.host, "-p", str(self.postgres_port), "-U", POSTGRES_USER,
                "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-tAc"]
        try:
            found = subprocess.run(psql + [f"SELECT 1 FROM pg_database WHERE datname = '{database}'"],
                                   capture_output=True, text=True, timeout=30)
            if found.returncode == 0 and found.stdout.strip() != "1":
                found = subprocess.run(psql + [f'CREATE DATABASE "{database}"'], capture_output=True, text=True, timeout=30)
        except subprocess.TimeoutExpired as err:
            raise StackError(f"postgres: {err}") from None
        if found.returncode != 0:
            raise StackError(f"postgres: {found.stderr.strip()}")
        return self.postgres_url(database)

    def purge_postgres(self) -> None:
        """Remove the server's data (it must be stopped): what a test stack does at its end."""
        shutil.rmtree(self.data_dir("postgres"), ignore_errors=True)

    # --- api and workers

    @property
    def admin_key_path(self) -> Path:
        return self.run_dir / "admin.key"

    def admin_key(self) -> str:
        """The local stack's admin API key (made when the API starts; mode 600)."""
        return self.admin_key_path.read_text().strip()

    def api_url_of(self, name: str = "api") -> str:
        """The URL of the API replica `name` ("api" on api_port; "api-2", ... on their own ports)."""
        if name == "api":
            return self.api_url
        return f"http://{self.host}:{int((self.run_dir / f'{name}.port').read_text())}"

    def _start_api(self, name: str) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        env = self._service_env("api")  # once: it makes the API's MinIO user
        # Auth is on everywhere: the local stack's admin key, valid for its database, in admin.key.
        subprocess.run([self.python, "-m", "api.admin", "local-key", str(self.admin_key_path)], cwd=self.root,
                       env=env, check=True, stdout=subprocess.DEVNULL, timeout=120)
        port = self.api_port
        if name != "api":  # another replica on the same database, Kafka and store
            port = free_port()
            (self.run_dir / f"{name}.port").write_text(str(port))
        self._spawn(name, [self.python, "-m", "uvicorn", "api.main:app", "--host", self.host, "--port", str(port)],
                    env, (port,))

    def _start_worker(self, name: str) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # A stable id per named worker: a restarted worker finds the containers of its last life.
        worker_id = self.extra_env.get("RETRAIN_WORKER_ID", f"{socket.gethostname()}-{name}")
        port = free_port()
        (self.run_dir / f"{name}.metrics-port").write_text(str(port))
        env = {**self._service_env("worker"), "RETRAIN_WORKER_ID": worker_id,
               "RETRAIN_WORKER_METRICS_PORT": str(port), "RETRAIN_WORKER_METRICS_HOST": self.host}
        self._spawn(name, [self.python, "-m", "worker"], env, (port,))

    # --- readiness

    def _wait_ready(self, name: str) -> None:
        kind = self._kind(name)
        probe = {
            "kafka": self._kafka_ready,
            "minio": lambda: _http_ok(f"{self.minio_url}/minio/health/ready"),
            "postgres": self._postgres_ready,
            "api": lambda: _http_ok(f"{self.api_url_of(name)}/healthz"),
            "worker": lambda: _http_ok(self.metrics_url(name)),
        }[kind]
        # A worker has no endpoint: alive after a short grace (imports done, settings
        # parsed, Kafka connected or at least not crashed) is what we can check.
        grace = 2.0 if kind == "worker" else 0.0
        deadline = time.monotonic() + self.ready_timeout
        start = time.monotonic()
        while True:
            if not self.is_running(name):
                raise StackError(f"{name} exited while starting; last lines of "
                                 f"{self.log_path(name)}:\n{_tail(self.log_path(name))}")
            if time.monotonic() - start >= grace and probe():
                return
            if time.monotonic() > deadline:
                raise StackError(f"{name} not ready after {self.ready_timeout:.0f} s (still running, "
                                 f"pid {self.pid(name)}); last lines of {self.log_path(name)}:\n"
                                 f"{_tail(self.log_path(name))}")
            time.sleep(0.25)

    # ------------------------------------------------------------------ down / kill

    def kill(self, name: str, sig: int = signal.SIGTERM) -> bool:
        """Send `sig` to the service's whole process group. False if it was not running."""
        pid = self.pid(name)
        if pid is None:
            return False
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return False
        except PermissionError:
            os.kill(pid, sig)
        return True

    def _wait_gone(self, name: str, pid: int, timeout: float) -> bool:
        proc = self._procs.get(name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                return True
            if not _pid_alive(pid):
                return True
            time.sleep(0.1)
        return False

    def stop(self, name: str, timeout: float = 15.0) -> None:
        """SIGTERM the group, wait up to `timeout` s, then SIGKILL; remove the pid file."""
        pid = self.pid(name)
        if pid is not None:
            started = _start_time(pid)
            t0 = time.monotonic()
            self.kill(name, STOP_SIGNALS.get(self._kind(name), signal.SIGTERM))
            if not self._wait_gone(name, pid, timeout):
                print(f"[stack] {name}: still running after {timeout:.0f} s, SIGKILL", flush=True)
                self.kill(name, signal.SIGKILL)
                self._wait_gone(name, pid, 5.0)
            # Stragglers in the group (a trainer the worker did not stop) go too. While they live
            # the group's id cannot be given to a new process; if a process with that pid exists
            # and started at another time, the group is gone and the number is someone else's.
            if _start_time(pid) in (None, started):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            print(f"[stack] {name}: stopped in {time.monotonic() - t0:.1f} s", flush=True)
        self._procs.pop(name, None)
        self.pid_path(name).unlink(missing_ok=True)

    def down(self, names=None, timeout: float = 15.0) -> None:
        """Stop services in reverse start order. Default: all, extra workers included."""
        with self._locked():
            if names is None:
                names = list(self.status())
            for name in reversed(self._ordered(names)):
                self.stop(name, timeout)

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc) -> None:
        self.down()


# ---------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="stack.py", description="Start/stop the local retrain stack (Kafka, MinIO, API, workers).")
    ap.add_argument("command", choices=["up", "down", "status", "env"])
    ap.add_argument("names", nargs="*",
                    help="services: kafka minio postgres api worker worker-<n> (default: all; postgres with RETRAIN_STACK_DATABASE=postgres)")
    ap.add_argument("--run-dir", help="default: $RETRAIN_RUN_DIR or .run in the repo root")
    ap.add_argument("--timeout", type=float, default=60.0, help="readiness timeout per service, s")
    args = ap.parse_args(argv)
    stack = Stack.from_env(args.run_dir, ready_timeout=args.timeout)
    names = args.names or None
    try:
        if args.command == "up":
            stack.up(names)
            for k, v in stack.urls.items():
                print(f"  {k:14} {v}")
        elif args.command == "down":
            stack.down(names)
        elif args.command == "status":
            st = stack.status()
            for n in names or st:
                pid = stack.pid(n)
                print(f"{n:10} {'running' if pid else 'stopped':8} {pid or '':>8}  {stack.log_path(n)}")
        elif args.command == "env":
            for k, v in stack.env().items():
                print(f"export {k}={v}")
    except StackError as e:
        print(f"[stack] error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
