"""One job, start to finish, read top to bottom:

1. take the job's lease (one run at a time: wait while another live worker runs it);
2. a job that already has an outcome (finished, cancelled while queued) is announced, not run;
   a job whose runs took their worker down too often (poison) is failed;
3. stage the inputs, run the trainer, keep worker-owned copies of its results;
4. publish the model version (or a transcription's outputs);
5. record the outcome in the store (first writer wins), announce it on Kafka.

Faults are normal: every store or Kafka call is retried until it goes through or the worker
stops (then the job stays uncommitted and reruns). A trained model is kept in the workspace
(`results/`) until it is published, so a rerun publishes it without training again; an upload
that failed never turns into a failed job.
"""

import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from confluent_kafka import KafkaException

from jobs.archive import ArchiveLimits
from jobs.events import EventType
from jobs.lifecycle import Outcome
from jobs.settings import Settings
from jobs.spec import JobMessage, Task
from models_store import ModelStore, store_unavailable
from worker.events import EventPublisher, RelayLimits, TrainerOutputRelay
from worker.feature_cache import collect_feature_cache, publish_feature_cache, uses_feature_cache
from worker.gpus import GpuAllocator
from worker.lease import JobLease, LeaseKeeper, Taken
from worker.outputs import OutputsTooLarge, collect_results
from worker.promotion import decide_promotion
from worker.runners.base import Outcome as RunOutcome
from worker.runners.base import ResourceLimits, Runner, RunRequest
from worker.staging import StagingError, stage_inputs
from worker.workspace import Workspace

log = logging.getLogger(__name__)
T = TypeVar("T")


class Abandoned(Exception):
    """The worker is stopping (or lost the job's lease): leave the job for its next run."""


@dataclass
class JobExecution:
    message: JobMessage
    settings: Settings
    store: ModelStore
    runner: Runner
    events: EventPublisher
    worker_id: str
    gpus: GpuAllocator
    on_epoch: Callable[[float], None] | None = None  # seconds per training epoch, for the worker's metrics
    cancel: threading.Event = field(default_factory=threading.Event)
    abandoned: threading.Event = field(default_factory=threading.Event)

    def abandon(self) -> None:
        """Stop without recording an outcome (worker shutdown): the job stays queued on Kafka."""
        self.abandoned.set()
        self.cancel.set()

    @property
    def job_id(self) -> str:
        return self.message.job_id

    @property
    def workspace(self) -> Workspace:
        return Workspace(self.settings.workdir / self.job_id)

    def run(self) -> Outcome | None:
        """The outcome this job ended with, or None when this worker left it: it is stopping
        (`abandoned` is set: the job reruns later) or another worker took the job's lease over.
        Never raises."""
        lease = JobLease(self.store, self.job_id, self.worker_id, self.settings.job_lease_s)
        try:
            taken = self._take(lease)
            if isinstance(taken, Outcome):
                self._retry("announce the outcome", lambda: self._announce(taken))
                return taken
            outcome = self._run_leased(lease, taken)
        except Abandoned:
            return None
        except Exception as err:  # not a fault of the store or Kafka: the job fails, the worker goes on
            log.exception("job %s failed outside the trainer", self.job_id)
            outcome = Outcome.failed(f"{type(err).__name__}: {err}")
            self._best_effort(lambda: self.store.record_job_outcome(self.job_id, outcome))
            self._best_effort(lambda: self._announce(outcome))
        shutil.rmtree(self.workspace.root, ignore_errors=True)
        (self.settings.workdir / f"{self.job_id}.log").unlink(missing_ok=True)
        return outcome

    # ---- the steps --------------------------------------------------------------------------

    def _take(self, lease: JobLease) -> Taken | Outcome:
        """The lease, or the job's outcome when it has one (then it is not run)."""
        while True:
            outcome = self._retry("read the job's outcome", lambda: self.store.job_outcome(self.job_id))
            if outcome is not None:
                log.info("job %s already %s; not running it again", self.job_id, outcome.state)
                return outcome
            taken = self._retry("take the job's lease", lease.try_take)
            if taken is not None:
                return taken
            log.info("job %s runs on another worker; waiting for it to finish or to die", self.job_id)
            if self.abandoned.wait(self.settings.job_lease_s / 3):
                raise Abandoned

    def _run_leased(self, lease: JobLease, taken: Taken) -> Outcome:
        if taken.crashes >= self.settings.max_job_crashes:
            outcome = Outcome.failed(
                f"poison job: {taken.crashes} runs of it took their worker down (killed or out of memory) "
                f"without finishing; not trying again",
            )
            return self._record(outcome)
        keeper = LeaseKeeper(lease, self.cancel, every_s=self.settings.job_lease_s / 3)
        keeper.start()
        try:
            # Progress-like: asynchronous, and lost rather than waited for while Kafka is away.
            self._best_effort(lambda: self.events.emit(self.job_id, EventType.started, worker=self.worker_id, attempt=taken.attempt))
            outcome = self._train_and_publish()
        except Abandoned:
            if not keeper.lost:
                self._best_effort(lease.release)
            raise
        finally:
            keeper.stop()
        if keeper.lost:
            raise Abandoned  # another worker runs it now
        if keeper.outcome is not None:
            outcome = keeper.outcome  # cancelled through the API while it ran
        return self._record(outcome)

    def _train_and_publish(self) -> Outcome:
        workspace, spec = self.workspace, self.message.spec
        results = workspace.root / "results"
        if not (results / "complete").is_file():  # not trained yet (a rerun after a failed upload skips this)
            try:
                self._retry("stage the inputs", lambda: stage_inputs(self.store, self.message, workspace))
            except StagingError as err:
                return Outcome.failed(f"inputs could not be staged: {err}")
            trained = self._train(workspace)
            if trained is not None:
                return trained
            shutil.rmtree(results, ignore_errors=True)
            try:
                collect_results(workspace, results, self.settings)  # link-free, bounded copies
            except OutputsTooLarge as err:
                return Outcome.failed(str(err))
            if uses_feature_cache(self.message):
                collect_feature_cache(workspace.root, results / "cache", self.settings.feature_cache_max_bytes)
            (results / "complete").touch()
        if spec.task == Task.transcribe:
            # A transcription makes no model: its outputs (transcripts, report) belong to the job.
            names = self._retry("store the outputs", lambda: self.store.publish_job_outputs(self.job_id, results / "data"))
            return Outcome.succeeded(outputs=names)
        info = self._retry("publish the model version", lambda: self.store.publish_version(
            spec.model_name, self.job_id, results / "model", results / "data",
            lineage={
                "task": spec.task, "dataset": self.message.inputs.dataset,
                "base_model": spec.base.model if spec.base else None, "base_version": self.message.base_version,
                "trainer": self.message.trainer, "image": self.runner.image_for(self._request(())),
            },
        ))
        # The decoded audio for the model's next job: worth keeping, not worth failing the job for.
        self._best_effort(lambda: publish_feature_cache(self.store, spec.model_name, results / "cache"))
        if spec.promote is not None:
            self._retry("decide the promotion", lambda: self._promote(info, results / "model"))
        return Outcome.succeeded(model_name=spec.model_name, model_version=info.version, metrics=_headline(info.metrics))

    def _promote(self, info, model_dir) -> None:
        log_path = self.settings.workdir / f"{self.job_id}.score.log"
        decision = decide_promotion(self.store, self.runner, self.message, info, self.workspace, model_dir,
                                    ArchiveLimits.from_settings(self.settings), self.cancel, log_path, deadline_s=3600)
        self._best_effort(lambda: self.store.put_file(f"jobs/{self.job_id}/score.log", log_path, "text/plain"))
        self._best_effort(lambda: self.events.emit(self.job_id, EventType.log, line=f"[retrain-worker] promotion: {decision['reason']}"))

    def _train(self, workspace: Workspace) -> Outcome | None:
        """Run the trainer; None when it succeeded, else how the job ends."""
        resources = self.message.spec.resources
        # A GPU worker gives a job one GPU unless it asks otherwise; a CPU worker none.
        wanted = resources.gpus if resources.gpus is not None else min(1, self.gpus.total)
        log_path = self.settings.workdir / f"{self.job_id}.log"
        try:
            with self.gpus.lease(wanted, cancel=self.cancel) as gpu_ids:  # waits while none is free
                request = self._request(gpu_ids)
                # Bounded train.log, validated progress (this run's token), rate-limited logs.
                with TrainerOutputRelay(self.events, self.job_id, request.progress_token, log_path,
                                        RelayLimits.from_settings(self.settings), on_epoch=self.on_epoch) as relay:
                    result = self.runner.run(request, on_line=relay, cancel=self.cancel)
        except InterruptedError:  # cancelled while waiting for a GPU
            result = None
        if self.abandoned.is_set():
            raise Abandoned
        self._best_effort(lambda: self.store.put_file(f"jobs/{self.job_id}/train.log", log_path, "text/plain"))
        if result is None or result.outcome == RunOutcome.cancelled:
            return Outcome.cancelled()
        if result.outcome == RunOutcome.succeeded:
            return None
        if result.outcome in (RunOutcome.timeout, RunOutcome.out_of_memory):
            return Outcome.failed(result.outcome.value, detail=result.reason)
        return Outcome.failed(result.reason or result.outcome.value)

    def _request(self, gpu_ids: tuple[str, ...]) -> RunRequest:
        resources = self.message.spec.resources
        return RunRequest(
            job_id=self.job_id, workspace=self.workspace, trainer=self.message.trainer, image=self.message.spec.image,
            gpus=gpu_ids, deadline_s=resources.deadline_s or self.settings.job_deadline_s,
            limits=ResourceLimits(
                memory_bytes=resources.memory_mb * 1024**2 if resources.memory_mb else None,
                cpus=resources.cpus, pids=None, shm_bytes=None,
            ),
        )

    def _record(self, outcome: Outcome) -> Outcome:
        """The outcome goes to the store first (what makes the job finished for every worker),
        then to Kafka. Only then may the caller commit the job's offset. Returns the job's
        outcome: this one, or one recorded first elsewhere (a cancel)."""
        final = self._retry("record the outcome", lambda: self.store.record_job_outcome(self.job_id, outcome))
        self._retry("announce the outcome", lambda: self._announce(final))
        return final

    def _announce(self, outcome: Outcome) -> None:
        self.events.emit(self.job_id, outcome.event, outcome.event_data(), wait=True)

    # ---- faults -----------------------------------------------------------------------------

    def _retry(self, what: str, call: Callable[[], T]) -> T:
        """`call` until it goes through; store and Kafka outages are waited out (backing off up
        to `retry_max_s`), until the worker stops (Abandoned)."""
        delay = 0.5
        while True:
            try:
                return call()
            except Exception as err:
                if not (store_unavailable(err) or isinstance(err, (KafkaException, BufferError))):
                    raise
                log.warning("job %s: could not %s (%s: %s); retrying in %.0f s", self.job_id, what, type(err).__name__, err, delay)
            if self.abandoned.wait(delay):
                raise Abandoned
            delay = min(delay * 2, self.settings.retry_max_s)

    def _best_effort(self, call: Callable[[], object]) -> None:
        try:
            call()
        except Exception as err:
            log.warning("job %s: %s failed: %s", self.job_id, getattr(call, "__name__", "a side step"), err)


def _headline(metrics: dict) -> dict:
    """The top-level finite numbers of metrics.json, for the job record."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")}
