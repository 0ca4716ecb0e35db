"""All configuration, in one pydantic-settings class. Every field reads `RETRAIN_<NAME>`."""

from functools import lru_cache
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RETRAIN_", env_file=".env", extra="ignore")

    # Kafka
    kafka_bootstrap: str = "127.0.0.1:9092"
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
    public_url: str = ""  # base of status_url; empty = relative URLs

    # Worker
    worker_id: str = ""  # empty = hostname-pid
    workdir: Path = Path(".run/work")
    runner: str = "process"  # process | docker
    trainer_python: str = ".venv-trainer/bin/python"
    trainer_dir: Path = Path("trainer_images")
    job_deadline_s: int = 6 * 3600


@lru_cache
def get_settings() -> Settings:
    return Settings()
