"""Fixtures for the tests against a real Docker Engine.

These tests are never skipped: when the engine is not reachable (and cannot be started, which
needs root and the docker.io package) they fail with a message that says so. The images they
need are built by deploy/docker/build_images.sh (offline: debootstrap base + local wheels), once
per session and only the ones the selected tests use.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
import wave
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "deploy" / "docker" / "build_images.sh"
LIB = REPO / "deploy" / "docker" / "lib.sh"

TEST_IMAGE = "retrain/test-trainer:latest"
AUDIO_IMAGE = "retrain/trainer-audio:latest"
KERAS_IMAGE = "retrain/trainer-keras:latest"


def _run_script(args: list[str], what: str, timeout: int) -> None:
    try:
        proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what} did not finish in {timeout} s", pytrace=False)
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        pytest.fail(f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}", pytrace=False)


@pytest.fixture(scope="session")
def docker_client():
    import docker

    # Start dockerd when it is not running (root + docker.io), as CI needs.
    subprocess.run(["bash", "-c", f"source '{LIB}' && ensure_dockerd"], cwd=REPO, timeout=120)
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except Exception as exc:  # noqa: BLE001
        pytest.fail(
            "the Docker tests need a reachable Docker Engine and are not skipped: "
            f"{exc}. Install docker.io and run dockerd as root (deploy/docker/lib.sh: ensure_dockerd).",
            pytrace=False,
        )
    return client


def _build(client, *names: str, timeout: int = 3600) -> None:
    _run_script(["bash", str(BUILD), *names], f"building the {', '.join(names)} image(s)", timeout)


@pytest.fixture(scope="session")
def test_image(docker_client) -> str:
    _build(docker_client, "test", timeout=900)
    return TEST_IMAGE


@pytest.fixture(scope="session")
def audio_image(docker_client) -> str:
    _build(docker_client, "audio")
    return AUDIO_IMAGE


@pytest.fixture(scope="session")
def keras_image(docker_client) -> str:
    _build(docker_client, "keras")
    return KERAS_IMAGE


@pytest.fixture
def worker_id(docker_client):
    wid = f"test-{uuid.uuid4().hex[:8]}"
    yield wid
    # Whatever a test left behind under its worker id goes.
    for c in docker_client.containers.list(all=True, filters={"label": [f"retrain.worker={wid}"]}):
        c.remove(force=True)


@pytest.fixture
def runner(docker_client, worker_id):
    from worker.runners.docker import DockerRunner

    return DockerRunner(worker_id=worker_id, client=docker_client)


def write_wav(path: Path, samples: np.ndarray, sr: int = 16000) -> None:
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())


def tone_dataset(root: Path, labels=("low", "high"), per_class: int = 12, sr: int = 16000, seed: int = 0) -> Path:
    """A tiny separable data set: each class a tone band with noise. Returns the CSV path."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "clips").mkdir(exist_ok=True)
    freqs = {label: 300.0 * (2.2**i) for i, label in enumerate(labels)}
    rows = ["audio,label"]
    t = np.arange(int(0.5 * sr)) / sr
    for label in labels:
        for i in range(per_class):
            f = freqs[label] * rng.uniform(0.9, 1.1)
            x = 0.4 * np.sin(2 * np.pi * f * t + rng.uniform(0, 6.28)) + 0.05 * rng.standard_normal(t.size)
            name = f"clips/{label}_{i}.wav"
            write_wav(root / name, x.astype(np.float32), sr)
            rows.append(f"{name},{label}")
    csv = root / "dataset.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


@pytest.fixture
def make_workspace(tmp_path):
    from worker.workspace import Workspace

    def make(name="ws", hyperparameters=None, job=None, dataset: str = "tiny") -> Workspace:
        ws = Workspace(tmp_path / name)
        train = ws.channel("train")
        if dataset == "tones":
            tone_dataset(train)
        else:
            train.mkdir(parents=True, exist_ok=True)
            (train / "dataset.csv").write_text("audio,label\na.wav,yes\nb.wav,no\n")
        ws.prepare(hyperparameters or {"epochs": 2, "lr": 0.01}, job or {"job_id": name, "task": "test"})
        return ws

    return make
