"""One job, start to finish: stage the inputs, run the trainer, store the model, record the outcome."""

import logging
import shutil
import threading
from dataclasses import dataclass, field

from jobs.events import EventType, JobState
from jobs.spec import JobMessage, Task
from jobs.settings import Settings
from models_store import ModelStore
from worker.events import EventPublisher, parse_trainer_line
from worker.gpus import GpuAllocator
from worker.runners.base import Outcome, ResourceLimits, Runner, RunRequest
from worker.staging import stage_inputs
from worker.workspace import Workspace

log = logging.getLogger(__name__)

@dataclass
class JobExecution:
    message: JobMessage
    settings: Settings
    store: ModelStore
    runner: Runner
    events: EventPublisher
    worker_id: str
    gpus: GpuAllocator
    cancel: threading.Event = field(default_factory=threading.Event)
    abandoned: bool = False

    def abandon(self) -> None:
        """Stop without recording an outcome (worker shutdown): the job stays queued on Kafka."""
        self.abandoned = True
        self.cancel.set()

    @property
    def job_id(self) -> str:
        return self.message.job_id

    def run(self) -> dict | None:
        """Returns the outcome it recorded, or None when abandoned. Never raises: every failure
        is an outcome."""
        job_id, spec = self.job_id, self.message.spec
        workspace = Workspace(self.settings.workdir / job_id)
        log_path = self.settings.workdir / f"{job_id}.log"
        self.events.emit(job_id, EventType.started, worker=self.worker_id)
        try:
            stage_inputs(self.store, self.message, workspace)
            resources = spec.resources
            # A GPU worker gives a job one GPU unless it asks otherwise; a CPU worker none.
            wanted = resources.gpus if resources.gpus is not None else min(1, self.gpus.total)
            with self.gpus.lease(wanted, cancel=self.cancel) as gpu_ids:  # waits while none is free
                request = RunRequest(
                    job_id=job_id, workspace=workspace, trainer=self.message.trainer, image=spec.image,
                    gpus=gpu_ids, deadline_s=resources.deadline_s or self.settings.job_deadline_s,
                    limits=ResourceLimits(
                        memory_bytes=resources.memory_mb * 1024**2 if resources.memory_mb else None,
                        cpus=resources.cpus, pids=None, shm_bytes=None,
                    ),
                )
                with log_path.open("a") as train_log:
                    result = self.runner.run(request, on_line=lambda line: self._relay(line, train_log), cancel=self.cancel)
            self.store.put_file(f"jobs/{job_id}/train.log", log_path, "text/plain")
            if result.outcome == Outcome.succeeded and spec.task == Task.transcribe:
                # A transcription makes no model: its outputs (transcripts, report) belong to the job.
                names = self.store.publish_job_outputs(job_id, workspace.output_data)
                outcome = {"state": JobState.succeeded, "outputs": names}
            elif result.outcome == Outcome.succeeded:
                info = self.store.publish_version(
                    spec.model_name, job_id, workspace.model_dir, workspace.output_data,
                    lineage={
                        "task": spec.task, "dataset": self.message.inputs.dataset,
                        "base_model": spec.base.model if spec.base else None, "base_version": self.message.base_version,
                        "trainer": request.trainer, "image": self.runner.image_for(request),
                    },
                )
                outcome = {
                    "state": JobState.succeeded, "model_name": spec.model_name, "model_version": info.version,
                    "metrics": _headline(info.metrics),
                }
            elif result.outcome == Outcome.cancelled:
                outcome = {"state": JobState.cancelled, "reason": "cancelled"}
            elif result.outcome == Outcome.timeout:
                outcome = {"state": JobState.failed, "reason": "timeout", "detail": result.reason}
            elif result.outcome == Outcome.out_of_memory:
                outcome = {"state": JobState.failed, "reason": "out_of_memory", "detail": result.reason}
            else:
                outcome = {"state": JobState.failed, "reason": result.reason or result.outcome.value}
        except InterruptedError:  # cancelled while waiting for a GPU
            outcome = {"state": JobState.cancelled, "reason": "cancelled"}
        except Exception as err:  # staging or storing failed: the job fails, the worker goes on
            log.exception("job %s failed outside the trainer", job_id)
            outcome = {"state": JobState.failed, "reason": f"{type(err).__name__}: {err}"}
        if self.abandoned and outcome["state"] == JobState.cancelled:
            return None  # worker shutdown: nothing recorded, workspace and checkpoints stay for the rerun
        self.record(outcome)
        shutil.rmtree(workspace.root, ignore_errors=True)
        log_path.unlink(missing_ok=True)
        return outcome

    def record(self, outcome: dict) -> None:
        """The outcome goes to the store first (what makes the job 'finished' for every worker),
        then to Kafka. Only then may the caller commit the job's offset."""
        self.store.record_job_outcome(self.job_id, outcome)
        announce(self.events, self.job_id, outcome)

    def _relay(self, line: str, train_log) -> None:
        train_log.write(line + "\n")
        train_log.flush()
        kind, data = parse_trainer_line(line)
        self.events.emit(self.job_id, kind, **data)


def announce(events: EventPublisher, job_id: str, outcome: dict) -> None:
    state = JobState(outcome["state"])
    data = {k: v for k, v in outcome.items() if k != "state"}
    events.emit(job_id, EventType(state.value), wait=True, **data)


def _headline(metrics: dict) -> dict:
    """The top-level numbers of metrics.json, for the job record."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
