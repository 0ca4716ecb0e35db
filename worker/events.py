"""Publishing job events, and turning trainer output into them.

A trainer is outside code: a bring-your-own image runs anything, and our own trainers print
user-controlled text (hyperparameter names, file names, labels). So nothing a trainer prints is
trusted:

- Progress travels on a channel that printed text cannot imitate: the worker makes a random token
  per run (`new_progress_token`, passed as RETRAIN_PROGRESS_TOKEN), and only a line
  `retrain-progress <token> <json>` is a progress record. The record is validated against
  `jobs.events.ProgressRecord`; the event's `job_id` and `type` are the worker's, never the
  record's. Every other line, and every line that fails a check, is a log line.
- `TrainerOutputRelay` (the runners' `on_line`) never raises, cuts log lines, rate-limits and caps
  the events a job sends, and writes train.log through `BoundedLogFile`, which never grows past
  its size bound however long the trainer prints.
"""

from __future__ import annotations

import collections
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from pydantic import ValidationError

from jobs.events import EventType, JobEvent, ProgressRecord
from jobs.kafka import send

log = logging.getLogger(__name__)

PROGRESS_PREFIX = "retrain-progress"
PROGRESS_TOKEN_ENV = "RETRAIN_PROGRESS_TOKEN"
WORKER_NOTE = "[retrain-worker]"  # prefix of the notes the worker adds to a job's log


class EventPublisher:
    def __init__(self, producer: Producer, topic: str):
        self.producer, self.topic = producer, topic

    def emit(self, job_id: str, type: EventType, data: dict[str, Any] | None = None, /, *,
             wait: bool = False, **fields: Any) -> None:
        """Send one event. Pass data that is not the worker's own (anything derived from a trainer)
        as the positional `data` dict: its keys can never reach the event's own fields or this
        method's parameters. `fields` are merged over it (the worker's own values).

        Progress and logs go out asynchronously; outcomes are sent with wait=True so the offset
        is committed only after the broker has them."""
        event = JobEvent(job_id=job_id, type=type, data={**(data or {}), **fields})
        if wait:
            send(self.producer, self.topic, job_id, event)
        else:
            self.producer.produce(self.topic, key=job_id.encode(), value=event.model_dump_json().encode())
            self.producer.poll(0)


def new_progress_token() -> str:
    """A fresh secret for one run of a trainer (128 random bits, hex)."""
    return secrets.token_hex(16)


@dataclass(frozen=True)
class ParsedLine:
    type: EventType  # progress or log
    data: dict[str, Any]  # ProgressRecord.event_data() or {"line": str}
    warning: str | None = None  # why a line that looked like progress is a log line


def parse_trainer_line(line: str, token: str | None, *, max_progress_bytes: int = 16 * 1024,
                       max_log_chars: int = 2000) -> ParsedLine:
    """The contract (trainer_images/CONTRACT.md): `retrain-progress <token> <json object>` with
    this run's token is progress; anything else is a log line. Never raises.

    With `token` None (a run without a progress channel) every line is a log line. Log lines
    are cut to `max_log_chars` and never show the token."""
    warning = None
    if token and line.startswith(PROGRESS_PREFIX + " "):
        parts = line.split(" ", 2)
        given = parts[1] if len(parts) > 1 else ""
        if not hmac.compare_digest(given.encode("utf-8", "replace"), token.encode()):
            warning = "a progress line without this run's token: kept as a log line"
        elif len(line.encode("utf-8", "replace")) > max_progress_bytes:
            warning = f"a progress line over {max_progress_bytes} bytes: kept as a log line"
        else:
            try:
                record = ProgressRecord.model_validate_json(parts[2] if len(parts) > 2 else "")
                return ParsedLine(EventType.progress, record.event_data())
            except ValidationError as err:
                warning = f"an invalid progress record ({_first_error(err)}): kept as a log line"
            except Exception as err:  # noqa: BLE001 - whatever the parser does, the line is a log line
                warning = f"an unreadable progress record ({type(err).__name__}): kept as a log line"
    if token:
        line = line.replace(token, "<token>")
    return ParsedLine(EventType.log, {"line": cut(line, max_log_chars)}, warning)


def _first_error(err: ValidationError) -> str:
    try:
        first = err.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in first.get("loc", ()))[:80]
        return f"{where}: {first.get('msg', '')}"[:200] if where else str(first.get("msg", ""))[:200]
    except Exception:  # noqa: BLE001
        return "does not match the schema"


def cut(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    return text[:max_chars] + f" [... {len(text) - max_chars} characters cut]"


class TokenBucket:
    """`rate` events per second on average, bursts of `burst`."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, max(1.0, burst), clock
        self.tokens, self.last = self.burst, clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class BoundedLogFile:
    """A log file that never grows past `max_bytes` (counting what it held when opened): the
    first lines up to the bound minus a tail budget, then only the last lines (a quarter of the
    bound, at most 1 MiB, kept in memory), written at `close()` after a note of what was left out."""

    def __init__(self, path: Path, max_bytes: int):
        self.path = Path(path)
        self.file = open(self.path, "ab")  # noqa: SIM115 - closed in close()
        used = self.file.tell()
        room = max(0, max_bytes - used - 200)  # 200: the note of what was left out
        self.tail_budget = min(1024**2, max(0, max_bytes) // 4, room)
        self.head_left = room - self.tail_budget
        self.tail: collections.deque[bytes] = collections.deque()
        self.tail_bytes = 0
        self.omitted_lines = self.omitted_bytes = 0
        self.closed = False
        self._lock = threading.Lock()

    def write_line(self, line: str) -> None:
        data = (line + "\n").encode("utf-8", "replace")
        with self._lock:
            if self.closed:
                return
            if not self.tail and len(data) <= self.head_left:
                self.head_left -= len(data)
                self.file.write(data)
                self.file.flush()
                return
            if len(data) > self.tail_budget:
                self.omitted_lines += 1
                self.omitted_bytes += len(data)
                return
            self.tail.append(data)
            self.tail_bytes += len(data)
            while self.tail_bytes > self.tail_budget:
                dropped = self.tail.popleft()
                self.tail_bytes -= len(dropped)
                self.omitted_lines += 1
                self.omitted_bytes += len(dropped)

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            try:
                if self.omitted_lines:
                    self.file.write(f"{WORKER_NOTE} ... {self.omitted_lines} lines ({self.omitted_bytes} bytes) "
                                    f"left out: train.log is bounded ...\n".encode())
                self.file.writelines(self.tail)
            finally:
                self.file.close()


@dataclass(frozen=True)
class RelayLimits:
    progress_line_max_bytes: int = 16 * 1024
    log_line_max_chars: int = 2000
    log_events_per_s: float = 20.0
    log_events_burst: int = 200
    log_events_max: int = 10_000
    progress_events_per_s: float = 5.0
    log_file_max_bytes: int = 64 * 1024**2
    warnings_max: int = 20  # notes about refused progress lines, per job

    @classmethod
    def from_settings(cls, settings) -> RelayLimits:
        return cls(
            progress_line_max_bytes=settings.progress_line_max_bytes,
            log_line_max_chars=settings.trainer_log_line_max_chars,
            log_events_per_s=settings.trainer_log_events_per_s,
            log_events_burst=settings.trainer_log_events_burst,
            log_events_max=settings.trainer_log_events_max,
            progress_events_per_s=settings.trainer_progress_events_per_s,
            log_file_max_bytes=settings.trainer_log_file_max_bytes,
        )


class TrainerOutputRelay:
    """The runners' `on_line` for one run: each line to train.log (bounded) and to the job's
    events (progress validated, logs cut and rate-limited). Calling it never raises.

        with TrainerOutputRelay(events, job_id, request.progress_token, log_path, limits) as relay:
            result = runner.run(request, on_line=relay, cancel=cancel)

    `close()` (or leaving the `with`) sends the progress record still waiting for its turn and a
    note of what was dropped, and closes train.log.
    """

    def __init__(self, events: EventPublisher, job_id: str, token: str | None, log_path: Path,
                 limits: RelayLimits | None = None, clock: Callable[[], float] = time.monotonic,
                 on_epoch: Callable[[float], None] | None = None):
        self.events, self.job_id, self.token = events, job_id, token
        self.clock, self.on_epoch, self.last_epoch = clock, on_epoch, None  # (epoch, clock time) last seen
        self.limits = limits or RelayLimits()
        self.log_file = BoundedLogFile(log_path, self.limits.log_file_max_bytes)
        self.log_bucket = TokenBucket(self.limits.log_events_per_s, self.limits.log_events_burst, clock)
        # A short burst (10) so a trainer's ordinary records are never held back.
        self.progress_bucket = TokenBucket(max(self.limits.progress_events_per_s, 1e-6), 10, clock)
        self.log_events = 0
        self.dropped_logs = 0
        self.refused_progress = 0
        self.warnings = 0
        self.pending_progress: dict | None = None
        self.failures = 0
        self._lock = threading.Lock()

    def __enter__(self) -> TrainerOutputRelay:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, line: str) -> None:
        try:
            with self._lock:
                self._handle(line)
        except Exception:  # noqa: BLE001 - a bad line or a Kafka hiccup must not end the relay
            self.failures += 1
            if self.failures <= 5:
                log.exception("job %s: could not relay a trainer line", self.job_id)

    def _handle(self, line: str) -> None:
        if not isinstance(line, str):
            line = str(line)
        parsed = parse_trainer_line(line, self.token, max_progress_bytes=self.limits.progress_line_max_bytes,
                                    max_log_chars=self.limits.log_line_max_chars)
        if parsed.type == EventType.progress:
            self.log_file.write_line(f"{PROGRESS_PREFIX} {_json(parsed.data)}")
            self.pending_progress = parsed.data
            self._time_epoch(parsed.data.get("epoch"))
        else:
            self.log_file.write_line(parsed.data["line"])
            if parsed.warning:
                self.refused_progress += 1
                self._warn(parsed.warning)
            self._log_event(parsed.data)
        self._flush_progress()

    def _time_epoch(self, epoch: int | None) -> None:
        if epoch is None or self.on_epoch is None:
            return
        now = self.clock()
        if self.last_epoch is not None and epoch > self.last_epoch[0]:
            self.on_epoch((now - self.last_epoch[1]) / (epoch - self.last_epoch[0]))
        if self.last_epoch is None or epoch != self.last_epoch[0]:
            self.last_epoch = (epoch, now)

    def _flush_progress(self, force: bool = False) -> None:
        if self.pending_progress is not None and (force or self.progress_bucket.take()):
            data, self.pending_progress = self.pending_progress, None
            self.events.emit(self.job_id, EventType.progress, data)

    def _log_event(self, data: dict) -> None:
        if self.log_events >= self.limits.log_events_max or not self.log_bucket.take():
            self.dropped_logs += 1
            return
        self.log_events += 1
        self.events.emit(self.job_id, EventType.log, data)

    def _warn(self, warning: str) -> None:
        self.warnings += 1
        if self.warnings > self.limits.warnings_max:
            return
        note = f"{WORKER_NOTE} {warning}"
        if self.warnings == self.limits.warnings_max:
            note += " (further such notes are not shown)"
        log.warning("job %s: %s", self.job_id, warning)
        self.log_file.write_line(note)
        self._log_event({"line": note})

    def close(self) -> None:
        with self._lock:
            try:
                self._flush_progress(force=True)
                if self.dropped_logs or self.refused_progress:
                    note = (f"{WORKER_NOTE} {self.dropped_logs} log lines were not sent as events (rate or count "
                            f"limit; train.log has them within its size bound); {self.refused_progress} lines "
                            f"that looked like progress were kept as log lines")
                    self.log_file.write_line(note)
                    self.events.emit(self.job_id, EventType.log, {"line": note})
            except Exception:  # noqa: BLE001
                log.exception("job %s: could not send the relay's last events", self.job_id)
            finally:
                self.log_file.close()


def _json(data: dict) -> str:
    import json

    return json.dumps(data, separators=(",", ":"))
