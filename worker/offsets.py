"""Which offsets a worker may commit when several jobs from one partition finish out of order:
never past a job that is still running, so a crash reruns it rather than losing it."""

from confluent_kafka import Message, TopicPartition


class OffsetTracker:
    def __init__(self):
        self.in_flight: dict[tuple[str, int], set[int]] = {}
        self.highest_done: dict[tuple[str, int], int] = {}

    def started(self, message: Message) -> None:
        self.in_flight.setdefault(_key(message), set()).add(message.offset())

    def finished(self, message: Message) -> None:
        key = _key(message)
        self.in_flight.get(key, set()).discard(message.offset())
        self.highest_done[key] = max(self.highest_done.get(key, -1), message.offset())

    def done_without_running(self, message: Message) -> None:
        """A message handled at once (a copy, a dead letter). A copy of a message whose job is
        running here (the same offset, fetched again after a rebalance) changes nothing: the
        running job still holds the commit below it."""
        if message.offset() not in self.in_flight.get(_key(message), set()):
            self.finished(message)

    def forget(self, partitions: list[TopicPartition]) -> None:
        """Partitions revoked: their next owner commits them, so what was done here no longer
        says where to commit. Jobs still running here stay in flight: if a partition comes back,
        commits stay below them."""
        for tp in partitions:
            self.highest_done.pop((tp.topic, tp.partition), None)

    def committable(self) -> list[TopicPartition]:
        positions = []
        for key, done in self.highest_done.items():
            running = self.in_flight.get(key)
            next_offset = min(running) if running else done + 1
            positions.append(TopicPartition(key[0], key[1], next_offset))
        return positions


def _key(message: Message) -> tuple[str, int]:
    return message.topic(), message.partition()
