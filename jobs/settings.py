"""All configuration, in one pydantic-settings class. Every field reads `RETRAIN_<NAME>`."""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RETRAIN_", env_file=".env", extra="ignore")

    # Kafka
    kafka_bootstrap: str = "127.0.0.1:9092"
    # librdkafka properties added to every Kafka client of the API and the workers, for TLS and
    # SASL in production, e.g. RETRAIN_KAFKA_CLIENT_CONFIG='{"security.protocol": "SASL_SSL",
    # "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "retrain", "sasl.password": "...",
    # "ssl.ca.location": "/etc/retrain/kafka-ca.pem"}' (README, "Production: TLS and SASL").
    kafka_client_config: dict[str, str | int | bool] = {}
    topic_jobs: str = "retrain.jobs"
    topic_events: str = "retrain.job-events"
    topic_control: str = "retrain.control"
    topic_dlq: str = "retrain.jobs.dlq"
    topic_partitions: int = 6
    worker_group: str = "retrain-workers"
    api_events_group: str = "retrain-api"
    # How soon the group notices a dead worker and hands its job to another one.
    kafka_session_timeout_ms: int = 10_000

    # MinIO / S3
    s3_endpoint: str = "127.0.0.1:9000"
    s3_access_key: str = "retrain"
    s3_secret_key: str = "retrain-secret"
    s3_secure: bool = False
    s3_bucket: str = "retrain"

    # API
    database_url: str = "sqlite:///.run/retrain.db"
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    max_upload_bytes: int = 2 * 1024**3  # per uploaded file
    upload_url_ttl_s: int = 900  # POST /v1/uploads: how long its presigned form stays valid
    public_url: str = ""  # base of status_url; empty = relative URLs
    # GET /v1/jobs/{id}/events (Server-Sent Events): streams open at once (503 over it), how
    # often each looks for new events, and the keep-alive comment's period (s).
    auth_cache_s: float = 5.0  # a validated API key is trusted this long without a database query (a revoke waits as long)
    event_streams_max: int = 200
    event_streams_poll_s: float = 0.5
    event_streams_keepalive_s: float = 15.0

    # Images a job spec may name (bring your own image): allowed name prefixes.
    allowed_images: list[str] = ["retrain/"]

    # Worker
    worker_id: str = ""  # empty = hostname-pid; give each worker a stable one with the docker runner
    workdir: Path = Path(".run/work")
    runner: Literal["process", "docker"] = "process"
    trainer_python: str = ".venv-trainer/bin/python"  # process runner
    trainer_dir: Path = Path("trainer_images")  # process runner
    concurrency: int = 0  # jobs at once; 0 = one per GPU, at least 1
    # The worker's Prometheus metrics (worker/metrics.py) at http://host:port/metrics; 0 = off.
    worker_metrics_port: int = 0
    worker_metrics_host: str = "127.0.0.1"
    gpus: str | None = None  # GPU ids ("0,1"); unset = discover (NVML, nvidia-smi); "" = none
    job_deadline_s: int = 6 * 3600
    # Container defaults (docker runner) for what a job's spec.resources leaves unset.
    container_memory_mb: int | None = 16 * 1024
    container_cpus: float | None = None
    container_pids: int = 4096
    container_shm_mb: int = 2048

    # ---- Bounds on what clients upload (CSV, archives, model uploads) ---------------------------
    # A submission over one of these is refused before anything is stored: 413 for a size, 422
    # otherwise, naming the field, file and row. Archives are read by jobs/archive.py in a child
    # process capped at archive_cpu_seconds of CPU, archive_memory_bytes of address space and
    # archive_timeout_s of wall time, in the API and the worker alike.
    csv_max_bytes: int = 256 * 1024**2  # the dataset CSV file
    csv_max_rows: int = 100_000  # data rows in the dataset CSV (the header not counted)
    csv_max_field_chars: int = 8192  # one CSV field (an audio path, a label, an ASR transcript)
    csv_max_labels: int = 1000  # distinct labels of a classification CSV
    csv_max_label_chars: int = 200  # one label
    archive_max_entries: int = 100_000  # entries (files and folders) in one archive
    archive_max_total_bytes: int = 8 * 1024**3  # all entries unpacked, summed over every entry
    archive_max_ratio: float = 50.0  # unpacked bytes / archive bytes, over the whole archive
    archive_cpu_seconds: int = 120  # CPU time of one archive read (RLIMIT_CPU of the reader)
    archive_memory_bytes: int = 1024**3  # address space of the reader process (RLIMIT_AS)
    archive_timeout_s: float = 300.0  # wall-clock time of one archive read
    model_config_max_bytes: int = 4 * 1024**2  # a config.json (or *_config.json) read from a model upload
    # The dataset check (the CSV parsed, each clip it names extracted and decoded once) runs in a
    # child of the API (api/checker.py), never in the API's own interpreter, capped like this:
    check_cpu_seconds: int = 300  # CPU time of one submission's check (RLIMIT_CPU)
    check_memory_bytes: int = 4 * 1024**3  # its address space (RLIMIT_AS)
    check_timeout_s: float = 600.0  # its wall-clock time

    # ---- Bounds on the job spec and the API's requests ------------------------------------------
    # The spec's *shape* (identifier-like hyperparameter names, scalar or flat-list values, finite
    # numbers, seed in 0..2**32-1, version numbers up to 999,999,999, image references) is fixed
    # in jobs/spec.py; these are the *sizes*, checked by api.submissions.parse_spec.
    # Bytes of the `spec` form field (UTF-8), checked before it is parsed (413 over it).
    max_spec_bytes: int = 64 * 1024
    # Hyperparameters in one spec, known and trainer-specific together (422 over it).
    max_hyperparameters: int = 64
    # Bytes of each hyperparameter value serialised as compact JSON (413 over it).
    max_hyperparameter_value_bytes: int = 4096
    # The API's producer refuses a message over this (librdkafka message.max.bytes; keep it at or
    # under the broker's message.max.bytes, 1 MiB by default). A job message is its spec plus a
    # few hundred bytes, so max_spec_bytes must stay well under it (create_app checks 16 KiB of
    # headroom). An outbox row the broker refuses for good is set aside (outbox_dead), its job failed.
    outbox_max_message_bytes: int = 1_000_000
    # Outbox rows the relay takes per round, and the longest it backs off after an error (s);
    # it also retries creating the bucket and the topics at startup with this backoff.
    outbox_batch_size: int = 200
    outbox_retry_max_s: float = 30.0
    # With several API replicas on one database: how long a replica's claim on the outbox rows it
    # produces keeps the others off them (s). A dead replica's rows flow again after this long;
    # keep it over librdkafka's message.timeout.ms (300 s), the longest a produce waits for its answer.
    outbox_claim_s: float = 330.0

    # ---- Bounds on what a trainer emits, and the sandbox ---------------------------------------
    # A trainer is outside code (bring-your-own images): everything it prints or writes is
    # bounded here (worker/events.py, worker/outputs.py, worker/runners/).
    # A progress line (`retrain-progress <token> <json>`) longer than this is a log line.
    progress_line_max_bytes: int = 16 * 1024
    # Log lines are cut to this many characters (in events and in train.log).
    trainer_log_line_max_chars: int = 2000
    # Log events per job on retrain.job-events: a token bucket (rate, burst) and a total cap;
    # lines over them still go to train.log (within its cap) and are counted in a final note.
    trainer_log_events_per_s: float = 20.0
    trainer_log_events_burst: int = 200
    trainer_log_events_max: int = 10_000
    # Progress events per job: at most this many per second (the latest record waits its turn).
    trainer_progress_events_per_s: float = 5.0
    # train.log as the worker writes it: its first part up to this size, then only the last
    # lines (a quarter of it, at most 1 MiB) and a note of what was left out.
    trainer_log_file_max_bytes: int = 64 * 1024**2
    # What the worker takes from the trainer's model dir and output/data (regular files only;
    # links, FIFOs and devices are skipped): more files or bytes than this fail the job.
    output_max_files: int = 10_000
    output_max_bytes: int = 32 * 1024**3
    # Small files the worker reads itself (output/failure, metrics.json).
    output_small_file_max_bytes: int = 1024**2
    # The feature cache (worker/feature_cache.py): decoded audio a built-in trainer leaves in
    # output/cache, stored per model and staged for its next job; a larger cache is not kept.
    feature_cache_max_bytes: int = 8 * 1024**3
    # Caps on a job's spec.resources (worker side; a job asking for more fails with a reason).
    # Unset: memory = half of this host's RAM, cpus = this host's CPU count, gpus = the worker's.
    # These caps are also the process runner's limits when the spec leaves a resource unset.
    job_max_memory_mb: int | None = None
    job_max_cpus: float | None = None
    job_max_gpus: int | None = None
    job_max_deadline_s: int = 48 * 3600
    # Process runner only (RLIMIT_FSIZE): the largest file a trainer process may write.
    process_max_file_mb: int = 16 * 1024

    # ---- Job lifecycle: leases, attempts, retries -------------------------------------------------
    # A running job's lease in the store is renewed every job_lease_s / 3; another worker takes
    # the job over only after job_lease_s without renewal (its worker died).
    job_lease_s: float = 30.0
    # Runs of a job that took their worker down (killed, out of memory) before it is failed as poison.
    max_job_crashes: int = 3
    # Store and Kafka outages are waited out, backing off up to this many seconds between tries.
    retry_max_s: float = 15.0


@lru_cache
def get_settings() -> Settings:
    return Settings()
