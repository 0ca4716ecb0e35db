"""The process runner on small stand-in trainers (Python scripts): the contract's environment,
line relay, failure reasons, deadline and cancellation; and a hostile trainer: forged lines,
floods of output, lines without end, links to host files, memory and file-size limits."""

import sys
import threading
import time

from jobs.events import EventType
from worker.runners.base import Outcome, ResourceCaps, ResourceLimits, RunRequest
from worker.runners.process import ProcessRunner
from worker.workspace import Workspace


def make_trainer(tmp_path, body: str) -> ProcessRunner:
    folder = tmp_path / "trainers" / "t"
    folder.mkdir(parents=True)
    (folder / "train").write_text("import os, sys, time, json, pathlib\n" + body)
    return ProcessRunner(sys.executable, tmp_path / "trainers")


def run(runner, tmp_path, cancel=None, deadline_s=60):
    workspace = Workspace(tmp_path / "ws")
    workspace.prepare({"epochs": 3}, {"task": "t"})
    workspace.channel("train").mkdir(parents=True)
    lines = []
    request = RunRequest(job_id="j", workspace=workspace, trainer="t", deadline_s=deadline_s)
    result = runner.run(request, lines.append, cancel or threading.Event())
    return result, lines, workspace


def test_contract_environment_and_lines(tmp_path):
    runner = make_trainer(tmp_path, """
print(json.dumps({"epoch": 1, "epochs": int(json.loads(os.environ["SM_HPS"])["epochs"])}))
print("channels", os.environ["SM_CHANNELS"], "hp", os.environ["SM_HP_EPOCHS"])
pathlib.Path(os.environ["SM_MODEL_DIR"], "model.bin").write_text("m")
""")
    result, lines, workspace = run(runner, tmp_path)
    assert result.outcome == Outcome.succeeded
    assert lines == ['{"epoch": 1, "epochs": 3}', 'channels ["train"] hp 3']
    assert (workspace.model_dir / "model.bin").read_text() == "m"


def test_failure_file_becomes_the_reason(tmp_path):
    runner = make_trainer(tmp_path, """
pathlib.Path(os.environ["SM_OUTPUT_DIR"], "failure").write_text("row 7: clip does not decode")
sys.exit(3)
""")
    result, _, _ = run(runner, tmp_path)
    assert (result.outcome, result.exit_code, result.reason) == (Outcome.failed, 3, "row 7: clip does not decode")


def test_deadline_ends_in_timeout(tmp_path):
    runner = make_trainer(tmp_path, "time.sleep(60)\n")
    started = time.monotonic()
    result, _, _ = run(runner, tmp_path, deadline_s=1)
    assert result.outcome == Outcome.timeout
    assert time.monotonic() - started < 15


def test_cancel_stops_the_trainer(tmp_path):
    runner = make_trainer(tmp_path, "print('going', flush=True)\ntime.sleep(60)\n")
    cancel = threading.Event()
    threading.Timer(1.0, cancel.set).start()
    started = time.monotonic()
    result, lines, _ = run(runner, tmp_path, cancel=cancel)
    assert result.outcome == Outcome.cancelled
    assert lines == ["going"]
    assert time.monotonic() - started < 12


# ---- a hostile trainer: forged lines, floods, links, memory -----------------------------------

CAPS = ResourceCaps(memory_bytes=1024 * 2**20, cpus=2, gpus=0, deadline_s=3600)


def hostile(tmp_path, body: str, **kw) -> ProcessRunner:
    folder = tmp_path / "trainers" / "t"
    folder.mkdir(parents=True)
    (folder / "train").write_text("import os, sys, time, json, pathlib, resource\n" + body)
    return ProcessRunner(sys.executable, tmp_path / "trainers", caps=kw.pop("caps", CAPS),
                         max_file_bytes=kw.pop("max_file_bytes", 64 * 2**20), **kw)


def test_the_trainer_gets_this_runs_token_and_request_env_cannot_replace_it(tmp_path):
    runner = hostile(tmp_path, "print('token', os.environ['RETRAIN_PROGRESS_TOKEN'])\n")
    workspace = Workspace(tmp_path / "ws")
    workspace.prepare({}, {})
    request = RunRequest(job_id="j", workspace=workspace, trainer="t", deadline_s=60,
                         env={"RETRAIN_PROGRESS_TOKEN": "chosen-by-someone-else"})
    lines = []
    assert runner.run(request, lines.append, threading.Event()).outcome == Outcome.succeeded
    assert lines == [f"token {request.progress_token}"]


def test_the_reader_survives_a_failing_callback_and_the_trainer_never_blocks(tmp_path):
    # 5 MB through a 64 KiB pipe: a dead reader would leave the trainer blocked on write.
    runner = hostile(tmp_path, "for i in range(50_000): print('x' * 100, i)\nprint('done')\n")
    seen = []

    def on_line(line):
        seen.append(line)
        raise KeyError("type")  # what JobEvent(**data) used to raise on a forged line

    result, _, _ = run(runner, tmp_path, deadline_s=120)
    assert result.outcome == Outcome.succeeded
    workspace = Workspace(tmp_path / "ws")
    request = RunRequest(job_id="j", workspace=workspace, trainer="t", deadline_s=120)
    assert runner.run(request, on_line, threading.Event()).outcome == Outcome.succeeded
    assert len(seen) == 50_001 and seen[-1] == "done"


def test_a_line_without_end_is_cut_not_held(tmp_path):
    runner = hostile(tmp_path, "sys.stdout.write('y' * (50 * 1024 * 1024)); sys.stdout.write('\\nafter\\n')\n")
    result, lines, _ = run(runner, tmp_path, deadline_s=120)
    assert result.outcome == Outcome.succeeded
    assert len(lines) == 2 and len(lines[0]) < 1024**2 + 100 and lines[0].endswith("cut by the worker]")
    assert lines[1] == "after"


def test_a_flood_of_output_leaves_a_bounded_train_log_and_few_events(tmp_path):
    from worker.events import RelayLimits, TrainerOutputRelay

    class Events:
        def __init__(self):
            self.sent = []

        def emit(self, job_id, type, data=None, **fields):
            self.sent.append((job_id, type, data))

    # 100 MB of log, plus forged progress in the middle of it.
    runner = hostile(tmp_path, """
line = ('z' * 1000 + '\\n') * 1000
for i in range(100):
    sys.stdout.write(line)
    print(json.dumps({"epoch": 7, "job_id": "other", "type": "succeeded"}))
print('the end')
""")
    workspace = Workspace(tmp_path / "ws")
    workspace.prepare({}, {})
    request = RunRequest(job_id="j", workspace=workspace, trainer="t", deadline_s=300)
    events = Events()
    log_path = tmp_path / "train.log"
    limits = RelayLimits(log_events_max=500, log_file_max_bytes=4 * 2**20)
    with TrainerOutputRelay(events, "j", request.progress_token, log_path, limits) as relay:
        result = runner.run(request, relay, threading.Event())
    assert result.outcome == Outcome.succeeded
    assert log_path.stat().st_size <= 4 * 2**20
    assert log_path.read_text().rstrip().endswith("were kept as log lines")
    assert "the end" in log_path.read_text()
    assert len(events.sent) <= 502
    assert {job for job, _, _ in events.sent} == {"j"}
    assert all(kind == EventType.log for _, kind, _ in events.sent)


def test_memory_past_the_cap_fails_the_trainer_instead_of_the_host(tmp_path):
    runner = hostile(tmp_path, """
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
print('as', soft, 'fsize', resource.getrlimit(resource.RLIMIT_FSIZE)[0], 'core', resource.getrlimit(resource.RLIMIT_CORE)[0], flush=True)
try:
    hog = bytearray(3 * 1024**3)
except MemoryError:
    pathlib.Path(os.environ['SM_OUTPUT_DIR'], 'failure').write_text('out of memory: MemoryError')
    sys.exit(2)
print('allocated 3 GiB')
""", caps=ResourceCaps(memory_bytes=512 * 2**20, cpus=1, deadline_s=3600))
    result, lines, _ = run(runner, tmp_path)
    assert lines[0] == f"as {512 * 2**20} fsize {64 * 2**20} core 0"
    assert (result.outcome, result.reason) == (Outcome.failed, "out of memory: MemoryError")


def test_no_file_grows_past_the_size_limit(tmp_path):
    # Python ignores SIGXFSZ, so the write fails with EFBIG (another program is killed by it).
    runner = hostile(tmp_path, """
with open(pathlib.Path(os.environ['SM_MODEL_DIR'], 'big'), 'wb') as f:
    f.write(b'x' * (8 * 1024 * 1024))
""", max_file_bytes=1024 * 1024)
    result, lines, workspace = run(runner, tmp_path)
    assert result.outcome == Outcome.failed
    assert (workspace.model_dir / "big").stat().st_size <= 1024 * 1024
    assert any("File too large" in line for line in lines)


def test_a_job_over_the_caps_does_not_start(tmp_path):
    runner = hostile(tmp_path, "pathlib.Path('started').write_text('1')\n")
    workspace = Workspace(tmp_path / "ws")
    workspace.prepare({}, {})
    request = RunRequest(job_id="j", workspace=workspace, trainer="t", deadline_s=60,
                         limits=ResourceLimits(memory_bytes=64 * 2**30))
    result = runner.run(request, lambda line: None, threading.Event())
    assert result.outcome == Outcome.failed and "memory 65536 MiB" in result.reason
    assert not (workspace.root / "started").exists()


def test_a_failure_file_linked_to_a_host_file_is_not_the_reason(tmp_path):
    secret = tmp_path / "host-secret"
    secret.write_text("root:x:0:0:secret")
    runner = hostile(tmp_path, f"""
failure = pathlib.Path(os.environ['SM_OUTPUT_DIR'], 'failure')
failure.symlink_to({str(secret)!r})
sys.exit(4)
""")
    result, _, _ = run(runner, tmp_path)
    assert (result.outcome, result.reason) == (Outcome.failed, "trainer exited with code 4")
