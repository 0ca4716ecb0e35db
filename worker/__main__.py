"""`python -m worker`: one worker process.

RETRAIN_RUNNER=process (default) runs the trainer entrypoint as a subprocess; =docker runs each
job in its training image through the Docker Engine. RETRAIN_CONCURRENCY jobs run at once
(default: one per GPU, at least one).
"""

import logging
import os
import socket

from jobs.settings import Settings, get_settings
from models_store import make_store
from worker.gpus import GpuAllocator, discover_gpus
from worker.loop import Worker, install_signal_handlers
from worker.runners.base import ResourceLimits, Runner
from worker.runners.process import ProcessRunner

log = logging.getLogger("worker")


def make_runner(settings: Settings, worker_id: str) -> Runner:
    if settings.runner == "docker":
        from worker.runners.docker import DockerRunner  # the docker SDK only where it is used

        runner = DockerRunner(worker_id, default_limits=ResourceLimits(
            memory_bytes=settings.container_memory_mb * 1024**2 if settings.container_memory_mb else None,
            cpus=settings.container_cpus, pids=settings.container_pids, shm_bytes=settings.container_shm_mb * 1024**2,
        ))
        for orphan in runner.cleanup_orphans():
            log.warning("removed container %s of job %s left by this worker's previous life", orphan.name, orphan.job_id)
        return runner
    return ProcessRunner(settings.trainer_python, settings.trainer_dir)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    gpus = GpuAllocator(gpu.id for gpu in discover_gpus(settings.gpus))
    capacity = settings.concurrency or max(1, gpus.total)
    log.info("worker %s: runner %s, GPUs %s, %d job(s) at once", worker_id, settings.runner, list(gpus.ids) or "none", capacity)
    worker = Worker(settings.model_copy(update={"worker_id": worker_id}), make_store(settings),
                    make_runner(settings, worker_id), gpus=gpus, capacity=capacity)
    install_signal_handlers(worker)
    worker.run()


if __name__ == "__main__":
    main()
