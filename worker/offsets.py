"""Which offsets a worker may commit when several jobs from one partition finish out of order:
never past a job that is still running, so a crash reruns it rather than losing it."""

from confluent_kafka import Message, TopicPartition


class OffsetTracker:
    def __init__(self):
        self.in_flight: dict[tuple[str, int], set[int]] = {}
        self.highest_done: dict[tuple[str, int], int] = {}

    def started(self, message: Message) -> None:
        self.in_flight.setdefault((message.topic(), message.partition()), set()).add(message.offset())

    def finished(self, message: Message) -> None:
        key = (message.topic(), message.partition())
        self.in_flight.get(key, set()).discard(message.offset())
        self.highest_done[key] = max(self.highest_done.get(key, -1), message.offset())

    def done_without_running(self, message: Message) -> None:
        self.finished(message)

    def committable(self) -> list[TopicPartition]:
        positions = []
        for key, done in self.highest_done.items():
            running = self.in_flight.get(key)
            next_offset = min(running) if running else done + 1
            positions.append(TopicPartition(key[0], key[1], next_offset))
        return positions
