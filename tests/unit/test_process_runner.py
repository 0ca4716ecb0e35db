"""The process runner on small stand-in trainers (shell scripts): the contract's environment,
line relay, failure reasons, deadline and cancellation."""

import sys
import threading
import time

from worker.runners.base import Outcome, RunRequest
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
