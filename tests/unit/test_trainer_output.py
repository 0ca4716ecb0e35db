"""Everything a trainer emits is hostile: progress lines, log volume, the files it leaves behind.

No servers: the parsing and relaying (worker/events.py), the bounded reader (worker/runners/base.py)
and the link-proof collection of outputs (worker/outputs.py), on forged lines and on workspaces
where a trainer made links to host files, FIFOs and floods.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from jobs.events import EventType, JobEvent, ProgressRecord
from worker.events import (
    BoundedLogFile,
    EventPublisher,
    RelayLimits,
    TrainerOutputRelay,
    parse_trainer_line,
)
from worker.outputs import OutputsTooLarge, collect_outputs, read_json_object, read_small_file, read_text_file
from worker.runners.base import (
    LineSplitter,
    ResourceCaps,
    ResourceLimits,
    ResourcesRefused,
    RunRequest,
    apply_caps,
    failure_reason,
    relay_lines,
)
from worker.workspace import Workspace

TOKEN = "a" * 32
HOST_SECRET = "host-secret-root:x:0:0"


class RecordingProducer:
    """Stands in for the Kafka producer: keeps what EventPublisher produces."""

    def __init__(self):
        self.values: list[JobEvent] = []

    def produce(self, topic, key, value):
        event = JobEvent.model_validate_json(value)
        assert key.decode() == event.job_id
        self.values.append(event)

    def poll(self, timeout):
        return 0


def publisher() -> tuple[EventPublisher, RecordingProducer]:
    producer = RecordingProducer()
    return EventPublisher(producer, "events"), producer


def progress(record: dict | str, token: str = TOKEN) -> str:
    text = record if isinstance(record, str) else json.dumps(record)
    return f"retrain-progress {token} {text}"


# ---- the progress channel ------------------------------------------------------------------------

def test_a_record_with_this_runs_token_is_progress():
    parsed = parse_trainer_line(progress({"epoch": 2, "epochs": 5, "step": 40, "metrics": {"val_loss": 0.5}}), TOKEN)
    assert parsed.type == EventType.progress
    assert parsed.data == {"epoch": 2, "epochs": 5, "step": 40, "metrics": {"val_loss": 0.5}}
    assert parsed.warning is None


@pytest.mark.parametrize(
    ("line", "warned"),
    [
        ('{"epoch": 1, "epochs": 3, "metrics": {"val_loss": 0.5}}', False),  # the old contract: forged by any print
        ('x\n{"epoch": 99}'.split("\n")[1], False),  # a hyperparameter name with a newline and a JSON object
        (progress({"epoch": 1}, token="b" * 32), True),  # somebody else's token
        (progress({"epoch": 1}, token=""), True),
        ("retrain-progress", False),
        (progress({"epoch": 1, "type": "succeeded"}), True),  # keys that would collide with the event's
        (progress({"epoch": 1, "job_id": "someone-else"}), True),
        (progress({"epoch": 1, "wait": True}), True),
        (progress({"epoch": "3"}), True),  # wrong types for integer columns
        (progress({"epoch": 2.5}), True),
        (progress({"epoch": True}), True),
        (progress({"epoch": -1}), True),
        (progress({"step": 2**40}), True),  # over a 32-bit column
        (progress({"epochs": [1, 2]}), True),
        (progress('{"metrics": {"loss": NaN}}'), True),
        (progress('{"metrics": {"loss": Infinity}}'), True),
        (progress('{"metrics": {"loss": 1e999}}'), True),
        (progress({"metrics": {"loss": "0.5"}}), True),
        (progress({"metrics": {"loss": {"nested": 1}}}), True),
        (progress({"metrics": {"bad name\n": 1.0}}), True),
        (progress({"metrics": {f"m{i}": 1.0 for i in range(10_000)}}), True),  # 10k metrics
        (progress({"phase": "x" * 500}), True),
        (progress([1, 2, 3]), True),
        (progress("{not json"), True),
        (progress('{"epoch": 1}' + " " * 20_000), True),  # over the line bound
        (progress("[" * 100_000), True),  # deep nesting
    ],
)
def test_anything_but_a_valid_record_with_the_token_is_a_log_line(line, warned):
    parsed = parse_trainer_line(line, TOKEN)
    assert parsed.type == EventType.log
    assert set(parsed.data) == {"line"}
    assert len(parsed.data["line"]) <= 2000 + 40
    assert (parsed.warning is not None) == warned


def test_without_a_token_every_line_is_a_log_line():
    assert parse_trainer_line(progress({"epoch": 1}), None).type == EventType.log
    assert parse_trainer_line('{"epoch": 1}', None).type == EventType.log


def test_log_lines_never_show_the_token_and_are_cut():
    parsed = parse_trainer_line(f"env: RETRAIN_PROGRESS_TOKEN={TOKEN} " + "y" * 5000, TOKEN, max_log_chars=100)
    assert TOKEN not in parsed.data["line"]
    assert parsed.data["line"].startswith("env: RETRAIN_PROGRESS_TOKEN=<token> ")
    assert len(parsed.data["line"]) < 140 and "characters cut" in parsed.data["line"]


def test_a_record_only_carries_schema_keys_and_phase_labels():
    record = ProgressRecord.model_validate_json('{"epoch": 1, "phase": "learning curve 25% (12 clips)", '
                                                '"metrics": {"val/accuracy": 1, "diverged": null}}')
    assert record.event_data() == {"epoch": 1, "phase": "learning curve 25% (12 clips)",
                                   "metrics": {"val/accuracy": 1.0, "diverged": None}}


def test_the_publisher_is_not_broken_by_data_keys():
    events, producer = publisher()
    events.emit("job-1", EventType.log, {"job_id": "other", "type": "succeeded", "wait": True, "time": "x"})
    (event,) = producer.values
    assert (event.job_id, event.type) == ("job-1", EventType.log)
    assert event.data == {"job_id": "other", "type": "succeeded", "wait": True, "time": "x"}
    events.emit("job-1", EventType.started, worker="w1")  # the worker's own fields still work
    assert producer.values[-1].data == {"worker": "w1"}


# ---- the relay: bounded, rate-limited, never raises ----------------------------------------------

class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_relay_sends_progress_for_its_own_job_and_refuses_forgeries(tmp_path):
    events, producer = publisher()
    with TrainerOutputRelay(events, "job-1", TOKEN, tmp_path / "train.log") as relay:
        relay(progress({"epoch": 1, "epochs": 2, "metrics": {"loss": 0.5}}))
        relay('{"epoch": 99, "job_id": "job-2"}')
        relay(progress({"epoch": 98, "job_id": "job-2"}))
        relay("plain log")
    progress_events = [e for e in producer.values if e.type == EventType.progress]
    assert [e.data for e in progress_events] == [{"epoch": 1, "epochs": 2, "metrics": {"loss": 0.5}}]
    assert {e.job_id for e in producer.values} == {"job-1"}
    lines = [e.data["line"] for e in producer.values if e.type == EventType.log]
    assert '{"epoch": 99, "job_id": "job-2"}' in lines and "plain log" in lines
    assert any("invalid progress record" in line for line in lines)
    log_text = (tmp_path / "train.log").read_text()
    assert "plain log" in log_text and TOKEN not in log_text


def test_relay_rate_limits_and_caps_log_events(tmp_path):
    events, producer = publisher()
    clock = Clock()
    limits = RelayLimits(log_events_per_s=10, log_events_burst=5, log_events_max=8)
    relay = TrainerOutputRelay(events, "job-1", TOKEN, tmp_path / "train.log", limits, clock=clock)
    for i in range(100):
        relay(f"line {i}")
    assert len(producer.values) == 5  # the burst, then nothing until time passes
    clock.now = 1.0
    for i in range(100):
        relay(f"more {i}")
    assert len(producer.values) == 8  # the cap: 5 + 3 more, not the burst of 5 the second allows
    clock.now = 100.0
    relay("later")
    assert len(producer.values) == 8
    relay.close()
    note = producer.values[-1].data["line"]
    assert "193 log lines were not sent" in note
    # train.log still has every line.
    assert len((tmp_path / "train.log").read_text().splitlines()) == 201 + 1


def test_relay_holds_back_progress_floods_but_sends_the_latest(tmp_path):
    events, producer = publisher()
    clock = Clock()
    relay = TrainerOutputRelay(events, "job-1", TOKEN, tmp_path / "train.log",
                               RelayLimits(progress_events_per_s=1), clock=clock)
    for step in range(1000):
        relay(progress({"step": step}))
    relay.close()
    steps = [e.data["step"] for e in producer.values if e.type == EventType.progress]
    assert len(steps) == 11 and steps[:10] == list(range(10)) and steps[-1] == 999


def test_relay_survives_a_failing_publisher(tmp_path):
    class Broken:
        def emit(self, *args, **kwargs):
            raise RuntimeError("kafka is down")

    relay = TrainerOutputRelay(Broken(), "job-1", TOKEN, tmp_path / "train.log")
    relay("a line")
    relay(progress({"epoch": 1}))
    relay.close()
    assert "a line" in (tmp_path / "train.log").read_text()


def test_train_log_never_grows_past_its_bound(tmp_path):
    path = tmp_path / "train.log"
    log_file = BoundedLogFile(path, max_bytes=100_000)
    for i in range(200_000):
        log_file.write_line(f"line {i:07d} " + "z" * 50)
    log_file.write_line("the last line says what went wrong")
    log_file.close()
    text = path.read_text()
    assert path.stat().st_size <= 100_000
    assert text.startswith("line 0000000 ")
    assert text.rstrip().endswith("the last line says what went wrong")
    assert "lines (" in text and "left out" in text


def test_train_log_bound_counts_what_an_earlier_attempt_wrote(tmp_path):
    path = tmp_path / "train.log"
    path.write_text("x" * 90_000 + "\n")
    log_file = BoundedLogFile(path, max_bytes=100_000)
    for i in range(10_000):
        log_file.write_line(f"line {i}")
    log_file.close()
    assert path.stat().st_size <= 100_000


# ---- the reader ----------------------------------------------------------------------------------

def test_line_splitter_bounds_a_line_without_newlines():
    splitter = LineSplitter(max_bytes=1000)
    lines = []
    for _ in range(10_000):  # 10 MB of one line
        lines += splitter.feed(b"q" * 1000)
        assert len(splitter.buf) <= 1000
    lines += splitter.feed(b"rest of it\nnext\npartial")
    lines += splitter.close()
    assert len(lines) == 3
    assert lines[0].startswith("q" * 1000) and lines[0].endswith("[... line cut by the worker]")
    assert lines[1:] == ["next", "partial"]


def test_line_splitter_decodes_garbage_and_keeps_lines_whole_across_chunks():
    splitter = LineSplitter()
    lines = splitter.feed(b"caf\xc3") + splitter.feed(b"\xa9 \xff\xfe\r\n") + splitter.close()
    assert lines == ["café \ufffd\ufffd"]


def test_relay_lines_goes_on_when_the_callback_raises():
    seen = []

    def on_line(line):
        seen.append(line)
        if "boom" in line:
            raise KeyError("type")

    relay_lines(iter([b"one\nboom\n", b"two\nboom\nthree"]), on_line)
    assert seen == ["one", "boom", "two", "boom", "three"]


def test_relay_lines_survives_a_stream_that_breaks():
    def chunks():
        yield b"before\n"
        raise OSError("engine went away")

    seen = []
    relay_lines(chunks(), seen.append)
    assert seen == ["before"]


# ---- caps on spec.resources ----------------------------------------------------------------------

def request(tmp_path, **kw) -> RunRequest:
    return RunRequest(job_id="j", workspace=Workspace(tmp_path), trainer="t", **kw)


CAPS = ResourceCaps(memory_bytes=4 * 2**30, cpus=2, gpus=1, deadline_s=3600)


def test_unset_limits_become_the_caps_and_defaults_above_them_are_lowered(tmp_path):
    unset = ResourceLimits(memory_bytes=None, cpus=None, pids=None, shm_bytes=None)
    capped = apply_caps(request(tmp_path, deadline_s=60, limits=unset), CAPS,
                        ResourceLimits(memory_bytes=16 * 2**30, cpus=None, pids=100, shm_bytes=8 * 2**30))
    assert capped.limits == ResourceLimits(memory_bytes=4 * 2**30, cpus=2, pids=100, shm_bytes=4 * 2**30)


@pytest.mark.parametrize(
    ("kw", "words"),
    [
        ({"limits": ResourceLimits(memory_bytes=64 * 2**30), "deadline_s": 60}, "memory 65536 MiB"),
        ({"limits": ResourceLimits(cpus=64), "deadline_s": 60}, "64 CPUs"),
        ({"gpus": ("0", "1"), "deadline_s": 60}, "2 GPUs"),
        ({"deadline_s": 10**9}, "deadline of 1000000000 s"),
    ],
)
def test_a_job_over_a_cap_is_refused_with_the_reason(tmp_path, kw, words):
    with pytest.raises(ResourcesRefused, match=words):
        apply_caps(request(tmp_path, **kw), CAPS)


def test_a_request_within_the_caps_keeps_its_own_limits(tmp_path):
    capped = apply_caps(request(tmp_path, limits=ResourceLimits(memory_bytes=2**30, cpus=1.5), deadline_s=600), CAPS)
    assert (capped.limits.memory_bytes, capped.limits.cpus) == (2**30, 1.5)


def test_each_request_has_its_own_token(tmp_path):
    a, b = request(tmp_path), request(tmp_path)
    assert len(a.progress_token) == 32 and a.progress_token != b.progress_token
    assert a.progress_token not in repr(a)


# ---- files the trainer leaves: never followed ----------------------------------------------------

@pytest.fixture
def host_file(tmp_path) -> Path:
    path = tmp_path / "host" / "passwd"
    path.parent.mkdir()
    path.write_text(HOST_SECRET + "\n")
    return path


def workspace(tmp_path) -> Workspace:
    ws = Workspace(tmp_path / "ws")
    ws.prepare({}, {})
    return ws


def test_a_failure_file_that_is_a_link_to_a_host_file_is_not_read(tmp_path, host_file):
    ws = workspace(tmp_path)
    ws.failure_file.symlink_to(host_file)
    assert failure_reason(ws, "trainer exited with code 1") == "trainer exited with code 1"


def test_a_failure_file_under_a_linked_output_dir_is_not_read(tmp_path, host_file):
    ws = workspace(tmp_path)
    os.rename(ws.root / "output", ws.root / "output.real")
    (ws.root / "output").symlink_to(host_file.parent)
    (host_file.parent / "failure").write_text(HOST_SECRET)
    assert failure_reason(ws, "fallback") == "fallback"


def test_a_failure_fifo_does_not_block_the_worker(tmp_path):
    ws = workspace(tmp_path)
    os.mkfifo(ws.failure_file)
    done = []
    reader = threading.Thread(target=lambda: done.append(failure_reason(ws, "fallback")), daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert done == ["fallback"]


def test_a_huge_failure_file_is_cut(tmp_path):
    ws = workspace(tmp_path)
    with open(ws.failure_file, "wb") as f:
        f.truncate(10 * 1024**3)  # sparse 10 GiB
    f = ws.failure_file
    f.write_bytes(b"reason " * 10_000)
    reason = failure_reason(ws, "fallback")
    assert reason.startswith("reason reason") and len(reason) <= 4000


def test_a_regular_failure_file_is_the_reason(tmp_path):
    ws = workspace(tmp_path)
    ws.failure_file.write_text("  row 7: clip does not decode\n")
    assert failure_reason(ws, "fallback") == "row 7: clip does not decode"


def test_small_file_readers_refuse_links_fifos_and_oversize(tmp_path, host_file):
    ws = workspace(tmp_path)
    data = ws.output_data
    (data / "metrics.json").symlink_to(host_file)
    assert read_json_object(ws.root, "output/data/metrics.json", 1024) is None
    (data / "metrics.json").unlink()
    (data / "metrics.json").write_text(json.dumps({"accuracy": 0.9}))
    assert read_json_object(ws.root, "output/data/metrics.json", 1024) == {"accuracy": 0.9}
    (data / "big.json").write_text(json.dumps({"x": "y" * 5000}))
    assert read_json_object(ws.root, "output/data/big.json", 1024) is None
    assert read_small_file(ws.root, "output/data/big.json", 10, truncate=True) == b'{"x": "yyy'
    os.mkfifo(data / "fifo")
    assert read_text_file(ws.root, "output/data/fifo", 100) is None
    assert read_text_file(ws.root, "output/data/missing", 100) is None
    with pytest.raises(ValueError):
        read_small_file(ws.root, "../etc/passwd", 100)


def test_collect_takes_regular_files_only_and_the_copy_holds_no_links(tmp_path, host_file):
    ws = workspace(tmp_path)
    model, data = ws.model_dir, ws.output_data
    (model / "model.onnx").write_bytes(b"onnx")
    (model / "sub").mkdir()
    (model / "sub" / "weights.bin").write_bytes(b"w" * 1000)
    (model / "labels.json").symlink_to(host_file)  # a link to a host file
    (model / "etc").symlink_to(host_file.parent, target_is_directory=True)  # a directory link
    (model / "dangling").symlink_to(tmp_path / "nowhere")
    os.mkfifo(model / "pipe")
    os.link(model / "model.onnx", model / "hardlinked.onnx")
    (model / "bad\nname").write_text("x")
    (model / os.fsdecode(b"bad\xffname")).write_text("x")
    (data / "metrics.json").write_text('{"accuracy": 1.0}')
    (data / "plot.png").symlink_to(host_file)

    collected = collect_outputs(ws, tmp_path / "results", max_files=100, max_bytes=10**6)

    taken = sorted(str(p.relative_to(collected.root)) for p in collected.root.rglob("*"))
    assert taken == ["data", "data/metrics.json", "model", "model/hardlinked.onnx", "model/model.onnx",
                     "model/sub", "model/sub/weights.bin"]
    for path in collected.root.rglob("*"):
        assert not path.is_symlink()
        assert path.is_dir() or (path.is_file() and path.stat().st_nlink == 1)
    assert HOST_SECRET not in "".join(p.read_text(errors="replace") for p in collected.root.rglob("*") if p.is_file())
    assert (collected.model_dir / "sub" / "weights.bin").read_bytes() == b"w" * 1000
    skipped = "\n".join(collected.skipped)
    for name in ("model/labels.json", "model/etc", "model/dangling", "model/pipe", "data/plot.png"):
        assert name in skipped
    assert "control characters or not UTF-8" in skipped
    assert collected.files == 12 and collected.bytes == 4 + 4 + 1000 + 17


def test_collect_skips_model_and_output_dirs_that_are_links(tmp_path, host_file):
    ws = workspace(tmp_path)
    os.rmdir(ws.model_dir)
    ws.model_dir.symlink_to(host_file.parent)
    os.rename(ws.root / "output", ws.root / "output.real")
    (ws.root / "output").symlink_to(host_file.parent)
    collected = collect_outputs(ws, tmp_path / "results", max_files=100, max_bytes=10**6)
    assert list(collected.model_dir.iterdir()) == [] and list(collected.data_dir.iterdir()) == []
    assert len(collected.skipped) == 2


def test_collect_bounds_file_count_and_bytes(tmp_path):
    ws = workspace(tmp_path)
    for i in range(50):
        (ws.model_dir / f"f{i}").write_bytes(b"x")
    with pytest.raises(OutputsTooLarge, match="more than 20 files"):
        collect_outputs(ws, tmp_path / "results", max_files=20, max_bytes=10**6)
    with pytest.raises(OutputsTooLarge, match="larger than 10 bytes"):
        collect_outputs(ws, tmp_path / "results", max_files=100, max_bytes=10)
    with open(ws.model_dir / "sparse", "wb") as f:
        f.truncate(2**40)  # 1 TiB, sparse: refused by its size before a byte is copied
    with pytest.raises(OutputsTooLarge):
        collect_outputs(ws, tmp_path / "results", max_files=100, max_bytes=2**30)


def test_collect_replaces_an_earlier_copy(tmp_path):
    ws = workspace(tmp_path)
    (ws.model_dir / "a").write_text("1")
    collect_outputs(ws, tmp_path / "results", max_files=10, max_bytes=100)
    (ws.model_dir / "a").unlink()
    (ws.model_dir / "b").write_text("2")
    collected = collect_outputs(ws, tmp_path / "results", max_files=10, max_bytes=100)
    assert [p.name for p in collected.model_dir.iterdir()] == ["b"]


def test_a_new_attempt_replaces_links_a_trainer_left_in_place_of_its_folders(tmp_path, host_file):
    ws = workspace(tmp_path)
    for folder in (ws.model_dir, ws.checkpoints):
        os.rmdir(folder)
        folder.symlink_to(host_file.parent, target_is_directory=True)
    ws.prepare({}, {})
    for folder in (ws.model_dir, ws.output_data, ws.checkpoints):
        assert folder.is_dir() and not folder.is_symlink()
    assert host_file.read_text() == HOST_SECRET + "\n"  # nothing of the host was removed either
