"""Kafka plumbing both deployables use: clients with the right guarantees, topics, JSON values."""

import logging

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from pydantic import BaseModel

from jobs.settings import Settings

log = logging.getLogger(__name__)


def client_config(settings: Settings, **config) -> dict:
    """Every client's librdkafka properties: the brokers, the operator's own (TLS, SASL:
    settings.kafka_client_config), then what this client needs."""
    return {"bootstrap.servers": settings.kafka_bootstrap, **settings.kafka_client_config, **config}


def make_producer(settings: Settings, **overrides) -> Producer:
    # Idempotent + acks=all: a retried send is never duplicated and an acknowledged one never lost.
    config = {
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "client.id": "retrain",
    }
    return Producer(client_config(settings, **{**config, **overrides}))


def make_consumer(settings: Settings, group_id: str, **overrides) -> Consumer:
    # Offsets are committed by hand, after the work a message asked for is recorded.
    config = {
        "group.id": group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": settings.kafka_session_timeout_ms,
        "heartbeat.interval.ms": max(1000, settings.kafka_session_timeout_ms // 5),
    }
    return Consumer(client_config(settings, **{**config, **overrides}))


def ensure_topics(settings: Settings, timeout: float = 30.0) -> None:
    """Create the service's topics if they are missing (idempotent; API and worker both call it)."""
    admin = AdminClient(client_config(settings))
    existing = set(admin.list_topics(timeout=timeout).topics)
    wanted = {
        settings.topic_jobs: settings.topic_partitions,
        settings.topic_events: settings.topic_partitions,
        settings.topic_control: 1,
        settings.topic_dlq: 1,
    }
    missing = [NewTopic(name, num_partitions=n, replication_factor=1) for name, n in wanted.items() if name not in existing]
    if not missing:
        return
    for name, future in admin.create_topics(missing, operation_timeout=timeout).items():
        try:
            future.result()
            log.info("created topic %s", name)
        except KafkaException as err:
            if err.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise


def check_kafka(settings: Settings, timeout: float = 3.0) -> None:
    AdminClient(client_config(settings)).list_topics(timeout=timeout)


def send(producer: Producer, topic: str, key: str, value: BaseModel, timeout: float = 30.0) -> None:
    """Produce one JSON message and wait until the broker has it (raises on failure)."""
    errors: list = []

    def delivered(err, _msg):
        if err is not None:
            errors.append(err)

    producer.produce(topic, key=key.encode(), value=value.model_dump_json().encode(), on_delivery=delivered)
    remaining = producer.flush(timeout)
    if remaining or errors:
        raise KafkaException(errors[0] if errors else f"{remaining} message(s) not delivered to {topic}")
