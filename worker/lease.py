"""One run at a time per job: a lease in the store (`jobs/<id>/lease.json`).

Kafka can hand the same job message to two workers (a rebalance while a job runs, a message the
outbox produced twice). Before a worker runs a job it takes the job's lease with a conditional
write, and renews it while the job runs; another worker that gets the message meanwhile waits
until the lease is released or expires (its holder died), or until the job has an outcome.

    {"worker": "gpu-box-1", "instance": "<uuid of the worker process>", "expires_at": <unix s>,
     "attempt": 2, "crashes": 1, "released": false}

- attempt: how many runs the job has had; crashes: how many of them ended without an outcome
  and without releasing the lease (the worker died: the trainer took it down, OOM, power). A job
  whose runs took their worker down `max_crashes` times is a poison job: the next worker records
  it failed instead of running it again.
- A worker that stops gracefully releases the lease (the run does not count as a crash).
- A lease of this worker id but of another process (this worker's previous life) is taken over
  at once: worker ids are unique among live workers (stack.py and the README see to it).
- Expiry is judged by the taker's clock against the holder's: keep worker clocks in sync (NTP).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass

from models_store import ModelStore

log = logging.getLogger(__name__)

INSTANCE = uuid.uuid4().hex  # this worker process


class LeaseLost(RuntimeError):
    """Another worker holds the job now (our lease expired and was taken over)."""


@dataclass
class Taken:
    attempt: int
    crashes: int  # runs before this one that took their worker down


class JobLease:
    def __init__(self, store: ModelStore, job_id: str, worker_id: str, ttl_s: float):
        self.store, self.job_id, self.worker_id, self.ttl_s = store, job_id, worker_id, ttl_s
        self.key = f"jobs/{job_id}/lease.json"
        self.etag: str | None = None
        self.value: dict | None = None

    def try_take(self) -> Taken | None:
        """Take the lease if it is free, expired, released or ours; None while another live
        worker holds it."""
        current = self.store.get_json_tagged(self.key)
        if current is None:
            value = self._value(attempt=1, crashes=0)
            return self._write(value, None)
        held, etag = current
        if not isinstance(held, dict):
            held = {}
        mine = held.get("worker") == self.worker_id
        if not (held.get("released") or mine or float(held.get("expires_at", 0)) < time.time()):
            return None
        died = not held.get("released")
        if mine and held.get("instance") == INSTANCE:
            died = False  # this very process took it before (a copy of the message): not a crash
        value = self._value(attempt=int(held.get("attempt", 0)) + 1, crashes=int(held.get("crashes", 0)) + int(died))
        return self._write(value, etag)

    def renew(self) -> None:
        """Extend the lease; raises LeaseLost when another worker took it over meanwhile."""
        value = {**self.value, "expires_at": time.time() + self.ttl_s}
        etag = self.store.put_if(self.key, value, self.etag)
        if etag is None:
            raise LeaseLost(f"job {self.job_id}: the lease was taken over by another worker")
        self.value, self.etag = value, etag

    def release(self) -> None:
        """Give the job back without an outcome (graceful shutdown): the next run is no crash."""
        if self.value is not None:
            self.store.put_if(self.key, {**self.value, "released": True, "expires_at": 0}, self.etag)

    def _value(self, attempt: int, crashes: int) -> dict:
        return {"worker": self.worker_id, "instance": INSTANCE, "expires_at": time.time() + self.ttl_s,
                "attempt": attempt, "crashes": crashes, "released": False}

    def _write(self, value: dict, etag: str | None) -> Taken | None:
        new_etag = self.store.put_if(self.key, value, etag)
        if new_etag is None:
            return None  # another worker took it between our read and our write
        self.value, self.etag = value, new_etag
        return Taken(value["attempt"], value["crashes"])


class LeaseKeeper(threading.Thread):
    """Renews a job's lease while it runs and watches for its outcome (a cancel written by the
    API). Sets `cancel` when the job got an outcome elsewhere or the lease was lost; a store
    outage only delays renewals (the job keeps running)."""

    def __init__(self, lease: JobLease, cancel: threading.Event, every_s: float):
        super().__init__(name=f"lease-{lease.job_id[:8]}", daemon=True)
        self.lease, self.cancel, self.every_s = lease, cancel, every_s
        self.stopping = threading.Event()
        self.lost = False
        self.outcome = None  # the outcome someone else recorded (a cancel), when seen

    def run(self) -> None:
        while not self.stopping.wait(self.every_s):
            try:
                self.outcome = self.lease.store.job_outcome(self.lease.job_id)
                if self.outcome is not None:
                    log.info("job %s: has an outcome (%s) recorded elsewhere; stopping it", self.lease.job_id, self.outcome.state)
                    self.cancel.set()
                    return
                self.lease.renew()
            except LeaseLost as err:
                log.error("%s; stopping this run", err)
                self.lost = True
                self.cancel.set()
                return
            except Exception as err:  # store unreachable: keep training, try again
                log.warning("job %s: could not renew the lease (%s); will retry", self.lease.job_id, err)

    def stop(self) -> None:
        self.stopping.set()
