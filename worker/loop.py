"""The worker: a Kafka consumer that runs training jobs, read top to bottom.

At-least-once: a job's offset is committed only after its outcome is recorded in the store and
announced on Kafka, and never past a job still running (worker/offsets.py). Training takes
hours, so while jobs run the worker keeps polling (the group keeps it as a member); a message
that arrives while every slot is busy is held, its partition paused, and starts the moment a
slot frees. What happens to one job, its lease (one run at a time), its outcome and its
retries, is worker/execution.py. This loop never exits on a fault: a Kafka or store outage is
logged and waited out.
"""

import json
import logging
import os
import signal
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition
from pydantic import ValidationError

from jobs.events import ControlCommand
from jobs.kafka import ensure_topics, make_consumer, make_producer
from jobs.settings import Settings
from jobs.spec import JobMessage
from models_store import ModelStore
from worker.events import EventPublisher
from worker.execution import JobExecution
from worker.gpus import GpuAllocator
from worker.metrics import WorkerMetrics
from worker.offsets import OffsetTracker
from worker.runners.base import Runner

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, settings: Settings, store: ModelStore, runner: Runner, gpus: GpuAllocator | None = None, capacity: int = 1):
        self.settings, self.store, self.runner, self.capacity = settings, store, runner, capacity
        self.gpus = gpus or GpuAllocator([])
        self.worker_id = settings.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.producer = make_producer(settings)
        self.events = EventPublisher(self.producer, settings.topic_events)
        self.pool = ThreadPoolExecutor(max_workers=capacity, thread_name_prefix="job")
        self.running: dict[Future, tuple[Message, JobExecution]] = {}
        self.offsets = OffsetTracker()
        self.commit_pending = False
        # Per partition, the first job message fetched while every slot was busy (see take()).
        self.held: dict[tuple[str, int], Message] = {}
        self.metrics = WorkerMetrics(capacity, self.gpus)
        self.taken_at: dict[Future, float] = {}
        self.lag_checked = 0.0
        self.stopping = threading.Event()

    # ---- the loop -------------------------------------------------------------------------

    def run(self) -> None:
        if self.settings.worker_metrics_port:
            self.metrics.serve(self.settings.worker_metrics_port, self.settings.worker_metrics_host)
        self._wait_for_servers()
        self.settings.workdir.mkdir(parents=True, exist_ok=True)
        jobs = make_consumer(self.settings, self.settings.worker_group, **{"max.poll.interval.ms": 600_000})
        jobs.subscribe([self.settings.topic_jobs], on_assign=self._on_assign, on_revoke=self._on_revoke)
        # Every worker sees every control command: a group of its own, from now on.
        control = make_consumer(self.settings, f"retrain-control-{self.worker_id}", **{"auto.offset.reset": "latest", "enable.auto.commit": True})
        control.subscribe([self.settings.topic_control])
        self.consumer = jobs
        log.info("worker %s: taking jobs from %s (capacity %d)", self.worker_id, self.settings.topic_jobs, self.capacity)
        try:
            while not self.stopping.is_set():
                try:
                    # Short timeout: a finished job frees its slot (and resumes fetching) within 0.1 s.
                    # With partitions paused this poll only keeps us in the group.
                    message = jobs.poll(0.1)
                    if message is not None:
                        self.take(message)
                    command = control.poll(0)
                    if command is not None and not command.error():
                        self.on_control(command)
                    self.finish_done_jobs()
                    if self.commit_pending:
                        self._commit()
                    self._measure_lag()
                except Exception:  # a fault outside any one job: log it and go on
                    log.exception("worker loop")
                    self.stopping.wait(1.0)
        finally:
            self.shutdown(jobs, control)

    def _wait_for_servers(self) -> None:
        """Topics and bucket exist before the first poll; Kafka or MinIO down at start is waited out."""
        delay = 1.0
        while not self.stopping.is_set():
            try:
                ensure_topics(self.settings)
                self.store.ensure_bucket()
                return
            except Exception as err:
                log.warning("worker: Kafka or the store is not reachable yet (%s); retrying in %.0f s", err, delay)
                self.stopping.wait(delay)
                delay = min(delay * 2, self.settings.retry_max_s)

    def take(self, message: Message) -> None:
        if message.error():
            if message.error().code() != KafkaError._PARTITION_EOF:
                log.warning("kafka: %s", message.error())
            return
        if len(self.running) >= self.capacity:
            # Every slot is busy: the partition's message is held here, and the partition paused,
            # until a slot frees (then it starts at once: fetching a resumed partition again can
            # take a second). A later one of the same partition, fetched before the pause took
            # effect, is put back. Partitions with nothing held keep fetching, so whatever arrives
            # while the worker is full is here when a slot frees. Nothing held is committed.
            partition = TopicPartition(message.topic(), message.partition(), message.offset())
            if (message.topic(), message.partition()) in self.held:
                self.consumer.seek(partition)
            else:
                self.held[(message.topic(), message.partition())] = message
            self.consumer.pause([partition])
            return
        try:
            job = JobMessage.model_validate_json(message.value())
        except ValidationError as err:
            self.dead_letter(message, f"not a valid job message: {err.errors()[0]['msg']}")
            return
        if any(execution.job_id == job.job_id for _, execution in self.running.values()):
            # A copy of a job that runs here (a rebalance gave us its partition again, or the
            # outbox sent it twice): the run here answers for it; the copy's offset is done only
            # if it is not the running one's (OffsetTracker keeps that one in flight).
            log.info("job %s delivered again while it runs here; ignoring the copy", job.job_id)
            self.offsets.done_without_running(message)
            self._commit()
            return
        # Whether it already has an outcome, or runs on another worker, JobExecution finds out.
        execution = JobExecution(job, self.settings, self.store.for_tenant(job.tenant), self.runner, self.events, self.worker_id, self.gpus,
                                 on_epoch=self.metrics.epoch_seconds.observe)
        log.info("job %s: taken (%s, model %s)", job.job_id, job.spec.task, job.spec.model_name)
        self.offsets.started(message)
        future = self.pool.submit(execution.run)
        self.running[future], self.taken_at[future] = (message, execution), time.monotonic()
        self.metrics.running.set(len(self.running))

    def finish_done_jobs(self) -> None:
        for future in [f for f in self.running if f.done()]:
            message, execution = self.running.pop(future)
            outcome = future.result()
            self.metrics.running.set(len(self.running))
            self.metrics.job_seconds.observe(time.monotonic() - self.taken_at.pop(future))
            self.metrics.finished.labels(outcome.state.value if outcome else "left").inc()
            if outcome is None and execution.abandoned.is_set():
                continue  # worker shutdown: left uncommitted for the next worker
            # Finished here, or another worker took the job's lease over (its copy is its own).
            log.info("job %s: %s", execution.job_id, outcome.state if outcome else "left to the worker that holds it")
            self.offsets.finished(message)
            self._commit()
        while self.held and len(self.running) < self.capacity:  # the oldest held message first
            (topic, partition), message = next(iter(self.held.items()))
            del self.held[(topic, partition)]
            try:
                self.take(message)
            except Exception:
                self.consumer.seek(TopicPartition(topic, partition, message.offset()))  # fetched again
                raise
            finally:
                self.consumer.resume([TopicPartition(topic, partition)])

    def on_control(self, message: Message) -> None:
        try:
            command = ControlCommand.model_validate_json(message.value())
        except ValidationError:
            return
        if command.command == "cancel":
            for _, execution in self.running.values():
                if execution.job_id == command.job_id:
                    log.info("job %s: cancelling", command.job_id)
                    execution.cancel.set()

    def dead_letter(self, message: Message, reason: str) -> None:
        log.error("dead-lettering offset %s: %s", message.offset(), reason)
        value = {"reason": reason, "topic": message.topic(), "partition": message.partition(), "offset": message.offset(),
                 "value": (message.value() or b"").decode("utf-8", "replace")}
        self.producer.produce(self.settings.topic_dlq, key=message.key(), value=json.dumps(value).encode())
        self.producer.flush(30)
        self.offsets.done_without_running(message)
        self._commit()

    # ---- partitions and offsets -----------------------------------------------------------

    def _commit(self) -> None:
        assigned = {(tp.topic, tp.partition) for tp in self.consumer.assignment()}
        positions = [tp for tp in self.offsets.committable() if (tp.topic, tp.partition) in assigned]
        if not positions:
            self.commit_pending = False
            return
        try:
            self.consumer.commit(offsets=positions, asynchronous=False)
            self.commit_pending = False
        except Exception as err:  # Kafka away, or a rebalance meanwhile: try again from the loop
            log.warning("commit failed (%s); will retry", err)
            self.commit_pending = True

    def _measure_lag(self, every_s: float = 5.0) -> None:
        """Messages not yet read, per owned partition (for /metrics), every few seconds."""
        if time.monotonic() - self.lag_checked < every_s:
            return
        self.lag_checked = time.monotonic()
        lags = {}
        try:
            for tp in self.consumer.position(self.consumer.assignment()):
                low, high = self.consumer.get_watermark_offsets(tp, cached=True)
                lags[tp.partition] = max(0, high - (tp.offset if tp.offset >= 0 else low))
        except Exception as err:  # Kafka away: the last figures stay
            log.debug("consumer lag not measured: %s", err)
            return
        self.metrics.set_lag(lags)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # librdkafka keeps a partition's pause across a rebalance: one paused for a held message
        # that the rebalance dropped would never be fetched again. Nothing is held for newly
        # assigned partitions, so they all fetch (and hold again, while the worker is full).
        consumer.assign(partitions)
        consumer.resume(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Their next owner commits them; jobs of theirs still running here finish here (their
        # lease keeps the new owner from starting them a second time).
        self.offsets.forget(partitions)
        for tp in partitions:  # not started: the partition's next owner gets it from the committed offset
            self.held.pop((tp.topic, tp.partition), None)

    def stop(self, *_args) -> None:
        """Graceful shutdown: running jobs are stopped but not recorded, so their offsets stay
        uncommitted and another worker (or this one, restarted) runs them again from checkpoints."""
        self.stopping.set()
        for _, execution in self.running.values():
            execution.abandon()

    def shutdown(self, jobs: Consumer, control: Consumer) -> None:
        self.pool.shutdown(wait=True)
        self.finish_done_jobs()
        jobs.close()
        control.close()
        self.producer.flush(10)


def install_signal_handlers(worker: Worker) -> None:
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
