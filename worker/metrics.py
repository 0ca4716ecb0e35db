"""A worker's Prometheus metrics, served on RETRAIN_WORKER_METRICS_PORT (0: not served).

    retrain_worker_capacity                      jobs this worker runs at once
    retrain_worker_jobs_running                  jobs running here now
    retrain_worker_jobs_total{outcome}           jobs finished here: succeeded, failed, cancelled, left
    retrain_worker_job_seconds                   taken -> finished, per job
    retrain_worker_epoch_seconds                 seconds per training epoch (training throughput)
    retrain_worker_consumer_lag{partition}       job messages not yet read, per partition it owns
    retrain_worker_gpus / _gpus_busy             GPUs it has / has lent to running jobs
    retrain_worker_gpu_utilization_ratio{gpu}    and _gpu_memory_used_bytes{gpu}: from nvidia-smi, at scrape

Its own registry (not the process-wide default), so tests can make several in one process.
"""

import logging
import shutil
import subprocess

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

JOB_BUCKETS = (1, 10, 30, 60, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400)
EPOCH_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class WorkerMetrics:
    def __init__(self, capacity: int, gpus):
        self.registry = CollectorRegistry(auto_describe=True)
        Gauge("retrain_worker_capacity", "Jobs this worker runs at once", registry=self.registry).set(capacity)
        self.running = Gauge("retrain_worker_jobs_running", "Jobs running on this worker", registry=self.registry)
        self.finished = Counter("retrain_worker_jobs", "Jobs finished on this worker", ["outcome"], registry=self.registry)
        self.job_seconds = Histogram("retrain_worker_job_seconds", "A job's time on this worker", buckets=JOB_BUCKETS, registry=self.registry)
        self.epoch_seconds = Histogram("retrain_worker_epoch_seconds", "Seconds per training epoch", buckets=EPOCH_BUCKETS, registry=self.registry)
        self.lag = Gauge("retrain_worker_consumer_lag", "Job messages not yet read, per partition owned", ["partition"], registry=self.registry)
        self.registry.register(_GpuCollector(gpus))

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        start_http_server(port, addr=host, registry=self.registry)
        log.info("worker metrics on http://%s:%d/metrics", host, port)

    def set_lag(self, lags: dict[int, int]) -> None:
        self.lag.clear()
        for partition, lag in lags.items():
            self.lag.labels(str(partition)).set(lag)


class _GpuCollector:
    def __init__(self, gpus):
        self.gpus = gpus

    def describe(self):
        return []

    def collect(self):
        total = GaugeMetricFamily("retrain_worker_gpus", "GPUs this worker has")
        total.add_metric([], self.gpus.total)
        busy = GaugeMetricFamily("retrain_worker_gpus_busy", "GPUs lent to running jobs")
        busy.add_metric([], self.gpus.total - self.gpus.free_count())
        utilization = GaugeMetricFamily("retrain_worker_gpu_utilization_ratio", "GPU busy time, 0-1 (nvidia-smi)", labels=["gpu"])
        memory = GaugeMetricFamily("retrain_worker_gpu_memory_used_bytes", "GPU memory in use (nvidia-smi)", labels=["gpu"])
        for gpu, busy_ratio, used in _nvidia_smi(self.gpus.ids):
            utilization.add_metric([gpu], busy_ratio)
            memory.add_metric([gpu], used)
        yield from (total, busy, utilization, memory)


def _nvidia_smi(ids: tuple[str, ...]) -> list[tuple[str, float, int]]:
    """(gpu, utilization 0-1, memory used in bytes) of this worker's GPUs; none without nvidia-smi."""
    if not ids or shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    found = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[0] in ids and parts[1].isdigit() and parts[2].isdigit():
            found.append((parts[0], int(parts[1]) / 100, int(parts[2]) * 1024**2))
    return found
