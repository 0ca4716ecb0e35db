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
