"""Publishes outbox rows to Kafka. A row is deleted only after the broker acknowledged it, so a
crash between the two sends it again (the worker ignores a job id it has already finished)."""

import logging
import threading

from sqlalchemy import delete, select

from api.db import Database, OutboxMessage
from jobs.kafka import make_producer
from jobs.settings import Settings

log = logging.getLogger(__name__)


class OutboxRelay(threading.Thread):
    def __init__(self, db: Database, settings: Settings):
        super().__init__(name="outbox-relay", daemon=True)
        self.db, self.settings = db, settings
        self.wake = threading.Event()  # set by a submission so its message leaves at once
        self.stopping = threading.Event()

    def run(self) -> None:
        producer = make_producer(self.settings)
        while not self.stopping.is_set():
            self.wake.wait(timeout=1.0)
            self.wake.clear()
            try:
                while self.publish_batch(producer):
                    pass
            except Exception:
                log.exception("outbox relay: publishing failed; will retry")
                self.stopping.wait(2.0)
        producer.flush(10)

    def publish_batch(self, producer, limit: int = 200) -> int:
        with self.db.sessions() as session:
            rows = session.scalars(select(OutboxMessage).order_by(OutboxMessage.id).limit(limit)).all()
            if not rows:
                return 0
            delivered: list[int] = []
            for row in rows:
                producer.produce(
                    row.topic, key=row.key.encode(), value=row.value.encode(),
                    on_delivery=lambda err, _msg, rid=row.id: delivered.append(rid) if err is None else log.error("outbox %s: %s", rid, err),
                )
            producer.flush(30)
            if delivered:
                session.execute(delete(OutboxMessage).where(OutboxMessage.id.in_(delivered)))
                session.commit()
            return len(delivered)

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
