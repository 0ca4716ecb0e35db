from worker.offsets import OffsetTracker


class FakeMessage:
    """A Kafka message's coordinates only (the tracker reads nothing else)."""

    def __init__(self, offset, partition=0):
        self._offset, self._partition = offset, partition

    def topic(self):
        return "jobs"

    def partition(self):
        return self._partition

    def offset(self):
        return self._offset


def positions(tracker):
    return {(tp.partition, tp.offset) for tp in tracker.committable()}


def test_commit_never_passes_a_job_still_running():
    tracker = OffsetTracker()
    first, second = FakeMessage(4), FakeMessage(5)
    tracker.started(first)
    tracker.started(second)
    tracker.finished(second)
    assert positions(tracker) == {(0, 4)}  # offset 4 still runs: a crash must rerun it
    tracker.finished(first)
    assert positions(tracker) == {(0, 6)}


def test_partitions_are_independent():
    tracker = OffsetTracker()
    tracker.started(FakeMessage(10, partition=1))
    tracker.done_without_running(FakeMessage(3, partition=0))
    assert positions(tracker) == {(0, 4)}


def test_a_copy_of_a_running_job_does_not_release_its_offset():
    # concurrency 2: offset 4 runs, a rebalance hands us offset 4 again while 5 finished.
    tracker = OffsetTracker()
    running, other = FakeMessage(4), FakeMessage(5)
    tracker.started(running)
    tracker.started(other)
    tracker.done_without_running(FakeMessage(4))  # the copy
    tracker.finished(other)
    assert positions(tracker) == {(0, 4)}
    tracker.finished(running)
    assert positions(tracker) == {(0, 6)}


def test_a_revoked_partition_keeps_its_running_jobs_below_any_commit():
    from confluent_kafka import TopicPartition

    tracker = OffsetTracker()
    tracker.started(FakeMessage(7))
    tracker.finished(FakeMessage(6))
    tracker.forget([TopicPartition("jobs", 0)])
    assert positions(tracker) == set()  # the new owner commits it, not us
    # The partition comes back; the copy of the running job arrives again, another job finishes.
    tracker.done_without_running(FakeMessage(7))
    tracker.finished(FakeMessage(8))
    assert positions(tracker) == {(0, 7)}


def test_every_kafka_client_gets_the_operator_s_tls_and_sasl_properties():
    from jobs.kafka import client_config
    from jobs.settings import Settings

    settings = Settings(_env_file=None, kafka_bootstrap="k1:9093", kafka_client_config={
        "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "retrain"})
    config = client_config(settings, **{"group.id": "g", "enable.auto.commit": False})
    assert config == {"bootstrap.servers": "k1:9093", "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
                      "sasl.username": "retrain", "group.id": "g", "enable.auto.commit": False}
