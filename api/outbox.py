"""Publishes outbox rows to Kafka. A row is deleted only after the broker acknowledged it, so a
crash between the two sends it again (the worker ignores a job id it has already finished).

One row never holds up the others:

- each row is produced on its own; a row the broker refuses for good (too large, an invalid
  topic, a record it rejects; `PERMANENT`) is moved to `outbox_dead` with the reason, and when it
  is a job's message that job ends `failed` with the reason (`api.job_events.settle`: the outcome
  in the store, the job row through `apply_event`, a `failed` event on `retrain.job-events`);
- anything else (the broker down, a timeout, a full queue) is retried, each row after its own
  backoff: a row waiting for its acknowledgement is never produced a second time, and each
  acknowledged row is deleted as soon as its acknowledgement arrives, so an outage ends without
  a flood of duplicates;
- several API replicas on one database share the work: a relay claims the rows it produces
  (`SELECT ... FOR UPDATE SKIP LOCKED` on PostgreSQL, then `claimed_by`/`claimed_until`), and
  the others skip rows claimed by a live replica; a replica that stops releases its claims, one
  that dies leaves them to expire after `outbox_claim_s`, then another one produces them (at
  least once: a row acknowledged but not yet deleted when its replica died is sent again, and
  the worker ignores a job it has). SQLite serves one API, so there claims are not consulted;
- the thread never dies: every error is logged and retried after a backoff (doubling up to
  `outbox_retry_max_s`); `/readyz` reports it if it does all the same.
"""

import logging
import threading
import time
import uuid
from datetime import timedelta

from confluent_kafka import KafkaError, KafkaException
from sqlalchemy import delete, or_, select, true, update

from api.db import Database, OutboxDead, OutboxMessage
from jobs.events import utcnow
from jobs.kafka import make_producer
from jobs.settings import Settings

log = logging.getLogger(__name__)

# Errors that sending the same bytes again cannot cure.
PERMANENT = frozenset({
    KafkaError.MSG_SIZE_TOO_LARGE,  # over our producer's message.max.bytes, or the broker's
    KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError.INVALID_RECORD,
    KafkaError.TOPIC_EXCEPTION,  # not a valid topic name
    KafkaError._INVALID_ARG,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.POLICY_VIOLATION,
})


def is_permanent(err: KafkaError) -> bool:
    return err.code() in PERMANENT


class OutboxRelay(threading.Thread):
    def __init__(self, db: Database, settings: Settings, store=None, ready: threading.Event | None = None):
        super().__init__(name="outbox-relay", daemon=True)
        self.db, self.settings, self.store = db, settings, store
        self.ready = ready  # set once the topics exist (the API's startup thread); None = at once
        self.wake = threading.Event()  # set by a submission so its message leaves at once
        self.stopping = threading.Event()
        self.in_flight: set[int] = set()  # produced, acknowledgement not in yet: never produced twice
        self.delivered: list[int] = []
        self.refused: dict[int, str] = {}  # permanent failures, waiting to be set aside
        self.transient: list[tuple[int, KafkaError]] = []  # answers to schedule a retry for
        self.waiting: dict[int, tuple[float, int]] = {}  # row -> (monotonic time of its next try, tries so far)
        self.set_aside_after = 0.0  # monotonic time of the next try after set_aside failed
        self.fatal: KafkaError | None = None  # the producer is unusable: make a new one
        self.max_in_flight = 10 * settings.outbox_batch_size
        self.instance = uuid.uuid4().hex  # this relay, in the rows it claims
        # One API per SQLite file: any claim there is this process's or a dead one's.
        self.shared = db.engine.dialect.name != "sqlite"

    # ---- the thread ---------------------------------------------------------------------------

    def run(self) -> None:
        producer = None
        backoff = 0.5
        while not self.stopping.is_set():
            try:
                if producer is None:
                    if self.ready is not None and not self.ready.wait(timeout=1.0):
                        continue
                    producer = self.make_producer()
                busy = self.step(producer)
                backoff = 0.5
                if not busy:
                    self.wake.wait(timeout=1.0)
                    self.wake.clear()
            except Exception:
                log.exception("outbox relay: round failed; retrying in %.1f s", backoff)
                if self.fatal is not None:
                    # A new producer: what the old one held unacknowledged is produced again.
                    producer, self.fatal = None, None
                    self.in_flight.clear()
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, self.settings.outbox_retry_max_s)
        if producer is not None:
            try:
                producer.flush(10)
                self.settle()
            except Exception:
                log.exception("outbox relay: final flush failed; the rows stay in the outbox")
        self.release_claims()

    def release_claims(self) -> None:
        """At shutdown: the rows this relay claimed but did not get acknowledged are free for
        another replica (or this API restarted) at once, not after outbox_claim_s."""
        try:
            with self.db.sessions() as session:
                session.execute(update(OutboxMessage).where(OutboxMessage.claimed_by == self.instance)
                                .values(claimed_by=None, claimed_until=None))
                session.commit()
        except Exception:
            log.exception("outbox relay: claims not released; they expire after outbox_claim_s")

    def make_producer(self):
        def on_error(err: KafkaError):
            if err.fatal():
                self.fatal = err
            log.warning("outbox relay: kafka: %s", err)

        return make_producer(self.settings, **{"message.max.bytes": self.settings.outbox_max_message_bytes, "error_cb": on_error})

    def step(self, producer) -> bool:
        """One round: serve acknowledgements, settle them in the database, produce rows that are
        not in flight. True while there is work under way (messages in flight or rows left)."""
        producer.poll(0)
        self.settle()
        if self.fatal is not None:
            raise KafkaException(self.fatal)
        produced = self.produce_rows(producer)
        if produced or self.in_flight:
            producer.poll(0.2)  # acknowledgements arrive within milliseconds while the broker is up
            self.settle()
        return bool(produced or self.in_flight)

    def produce_rows(self, producer) -> int:
        """Produce the oldest rows not in flight, each on its own; returns how many."""
        room = min(self.max_in_flight - len(self.in_flight), self.settings.outbox_batch_size)
        if room <= 0:
            return 0
        rows = self.claim(room)
        produced = 0
        for rid, topic, key, value in rows:
            try:
                producer.produce(topic, key=key.encode(), value=value.encode(), on_delivery=self._callback(rid))
            except BufferError:
                break  # the local queue is full: wait for acknowledgements
            except KafkaException as err:
                if is_permanent(err.args[0]):
                    self.refused[rid] = str(err.args[0])
                else:
                    self.transient.append((rid, err.args[0]))
                continue
            self.in_flight.add(rid)
            produced += 1
        self.settle()  # rows refused at produce() are set aside now, not on the next round
        return produced

    def _callback(self, rid: int):
        def delivered(err, _msg):
            if err is None:
                self.delivered.append(rid)
            elif is_permanent(err):
                self.refused[rid] = str(err)
            else:
                self.transient.append((rid, err))
            # Any answer ends the flight; a transient failure is produced again after its backoff.
            self.in_flight.discard(rid)
        return delivered

    # ---- the database side --------------------------------------------------------------------

    def claim(self, room: int) -> list:
        """Up to `room` of the oldest rows that are due: not in flight here, not refused, past
        their backoff, and claimed by no other live relay; claimed for this one in the same
        transaction (rows another replica is claiming right now are skipped, not waited for)."""
        now, wall = time.monotonic(), utcnow()
        skip = len(self.in_flight) + len(self.refused) + len(self.waiting)
        with self.db.sessions() as session:
            free = or_(OutboxMessage.claimed_by.is_(None), OutboxMessage.claimed_by == self.instance,
                       OutboxMessage.claimed_until < wall) if self.shared else true()
            ids = session.scalars(
                select(OutboxMessage.id).where(free).order_by(OutboxMessage.id).limit(room + skip)
                .with_for_update(skip_locked=True)
            ).all()
            ids = [rid for rid in ids if rid not in self.in_flight and rid not in self.refused
                   and self.waiting.get(rid, (0.0, 0))[0] <= now][:room]
            if not ids:
                session.rollback()
                return []
            session.execute(update(OutboxMessage).where(OutboxMessage.id.in_(ids)).values(
                claimed_by=self.instance, claimed_until=wall + timedelta(seconds=self.settings.outbox_claim_s)))
            rows = session.execute(
                select(OutboxMessage.id, OutboxMessage.topic, OutboxMessage.key, OutboxMessage.value)
                .where(OutboxMessage.id.in_(ids)).order_by(OutboxMessage.id)
            ).all()
            session.commit()
        return rows

    def settle(self) -> None:
        """Delete the acknowledged rows at once; schedule the transient failures' retries (each
        row its own backoff, so one row that keeps failing slows nobody else); set aside the
        refused rows."""
        if self.delivered:
            done = list(self.delivered)
            with self.db.sessions() as session:
                session.execute(delete(OutboxMessage).where(OutboxMessage.id.in_(done)))
                session.commit()
            del self.delivered[: len(done)]
            for rid in done:
                self.waiting.pop(rid, None)
        if self.transient:
            failed, self.transient = self.transient, []
            now = time.monotonic()
            for rid, _err in failed:
                tries = self.waiting.get(rid, (0.0, 0))[1] + 1
                self.waiting[rid] = (now + min(0.5 * 2 ** min(tries, 10), self.settings.outbox_retry_max_s), tries)
            log.warning("outbox relay: %d message(s) not delivered (%s); each is retried after its backoff",
                        len(failed), failed[0][1])
        if not self.refused or time.monotonic() < self.set_aside_after:
            return
        for rid, reason in list(self.refused.items()):
            try:
                self.set_aside(rid, reason)
            except Exception:
                # The store or the database is down: the row waits (it is not produced again
                # meanwhile), and the rows behind it keep flowing.
                log.exception("outbox %s: could not set it aside yet; trying again in 5 s", rid)
                self.set_aside_after = time.monotonic() + 5.0
                return
            del self.refused[rid]
            self.waiting.pop(rid, None)

    def set_aside(self, rid: int, reason: str) -> None:
        """Move a refused row to outbox_dead; a job whose message it was ends failed."""
        # api.job_events.settle is the one way the API ends a job itself: the outcome in the
        # store (first writer wins), the job row through apply_event, the event on Kafka.
        from api.job_events import settle
        from jobs.lifecycle import Outcome

        with self.db.sessions() as session:
            row = session.get(OutboxMessage, rid)
            if row is None:
                return
            size = len(row.value.encode())
            log.error("outbox %s (%s, key %s, %d bytes) cannot be delivered: %s; set aside in outbox_dead",
                      rid, row.topic, row.key, size, reason)
            session.add(OutboxDead(outbox_id=row.id, topic=row.topic, key=row.key, value=row.value,
                                   created_at=row.created_at, failed_at=utcnow(), error=reason))
            session.delete(row)
            if row.topic == self.settings.topic_jobs and self.store is not None:
                why = (f"the job's Kafka message ({size} bytes) could not be delivered: {reason}; "
                       "the job was never queued")
                settle(session, self.store, self.settings, row.key, Outcome.failed(why))  # commits
            session.commit()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
