"""Two API replicas on one PostgreSQL database: their outbox relays share the rows (each row
claimed by one of them, SKIP LOCKED), so every message reaches Kafka once while both live, and
the rows a dead replica had claimed flow through the other once its claims expire."""

import uuid

import pytest
from confluent_kafka import Consumer

from api.db import Database, OutboxMessage
from api.outbox import OutboxRelay
from jobs.kafka import ensure_topics
from tests.conftest import isolated, wait_until

pytestmark = pytest.mark.integration


def _add_rows(db: Database, topic: str, n: int) -> list[str]:
    keys = [uuid.uuid4().hex for _ in range(n)]
    with db.sessions() as session:
        session.add_all(OutboxMessage(topic=topic, key=key, value=f'{{"n": "{key}"}}') for key in keys)
        session.commit()
    return keys


def _outbox_rows(db: Database) -> int:
    with db.sessions() as session:
        return session.query(OutboxMessage).count()


def _read_keys(settings, topic: str, expected: int) -> list[str]:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": uuid.uuid4().hex,
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    keys: list[str] = []
    idle = 0
    try:
        while idle < 10 or len(keys) < expected:  # all of them, then 5 s of nothing more (no late duplicate)
            message = consumer.poll(0.5)
            if message is None or message.error():
                idle += 1
                if idle > 240:
                    break
                continue
            idle = 0 if len(keys) < expected else idle
            keys.append(message.key().decode())
    finally:
        consumer.close()
    return keys


def test_two_relays_on_one_database_send_each_row_once(settings, tmp_path_factory):
    s = isolated(settings, tmp_path_factory, "replicas", outbox_batch_size=20)
    assert s.database_url.startswith("postgresql"), "the replicas test runs on PostgreSQL"
    ensure_topics(s)
    db_a, db_b = Database(s.database_url), Database(s.database_url)  # each replica has its own pool
    keys = _add_rows(db_a, s.topic_control, 300)
    relays = [OutboxRelay(db_a, s), OutboxRelay(db_b, s)]
    for relay in relays:
        relay.start()
    try:
        more = _add_rows(db_b, s.topic_control, 100)  # written while both relays run
        wait_until(lambda: _outbox_rows(db_a) == 0, 120, "the outbox to drain")
    finally:
        for relay in relays:
            relay.stop()
            relay.join(timeout=30)
    sent = _read_keys(s, s.topic_control, len(keys) + len(more))
    assert sorted(sent) == sorted(keys + more)  # every row, none twice


def _one_replica_claims_then_another_runs(settings, tmp_path_factory, name: str, claim_s: float, stops: bool) -> None:
    """Replica A claims 10 of 20 rows and dies (or stops: releases its claims); replica B runs
    until the outbox is empty; every row reached Kafka."""
    s = isolated(settings, tmp_path_factory, name, outbox_claim_s=claim_s)
    ensure_topics(s)
    db = Database(s.database_url)
    keys = _add_rows(db, s.topic_control, 20)
    first = OutboxRelay(db, s)
    assert len(first.claim(10)) == 10  # claimed, not produced
    if stops:
        first.release_claims()  # what a relay does when its API stops
    survivor = OutboxRelay(Database(s.database_url), s)
    survivor.start()
    try:
        wait_until(lambda: _outbox_rows(db) == 0, 60, f"the other replica to send all rows (claims: {claim_s:g} s)")
    finally:
        survivor.stop()
        survivor.join(timeout=30)
    assert sorted(_read_keys(s, s.topic_control, len(keys))) == sorted(keys)


def test_rows_claimed_by_a_dead_replica_flow_through_another_after_the_claim(settings, tmp_path_factory):
    _one_replica_claims_then_another_runs(settings, tmp_path_factory, "deadreplica", claim_s=3.0, stops=False)


def test_rows_a_stopped_replica_had_claimed_flow_through_another_at_once(settings, tmp_path_factory):
    # Claims of 300 s: only their release lets the other replica send them within the 60 s waited.
    _one_replica_claims_then_another_runs(settings, tmp_path_factory, "stoppedreplica", claim_s=300.0, stops=True)
