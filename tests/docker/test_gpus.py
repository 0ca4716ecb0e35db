"""GPU discovery and allocation (no GPU and no Docker needed)."""

from __future__ import annotations

import threading
import time

import pytest

from worker import gpus
from worker.gpus import Gpu, GpuAllocator, discover_gpus, parse_nvidia_smi_list


def test_zero_gpus_always_succeeds_even_with_none():
    alloc = GpuAllocator([])
    assert alloc.acquire(0) == ()
    assert alloc.acquire(0, timeout=0) == ()
    with alloc.lease(0) as ids:
        assert ids == ()


def test_acquire_distinct_ids_and_release():
    alloc = GpuAllocator(["0", "1", "2"])
    a = alloc.acquire(2)
    b = alloc.acquire(1)
    assert len(set(a) | set(b)) == 3
    assert alloc.free_count() == 0
    alloc.release(a)
    assert alloc.free_count() == 2
    assert alloc.acquire(2) == tuple(sorted(a))


def test_waits_while_none_free_then_gets_the_released_one():
    alloc = GpuAllocator(["0"])
    first = alloc.acquire(1)
    got = {}

    def second():
        got["ids"] = alloc.acquire(1, timeout=10)
        got["at"] = time.monotonic()

    th = threading.Thread(target=second)
    th.start()
    time.sleep(0.3)
    assert "ids" not in got  # still waiting
    released = time.monotonic()
    alloc.release(first)
    th.join(5)
    assert got["ids"] == ("0",) and got["at"] >= released


def test_timeout_and_cancel_while_waiting():
    alloc = GpuAllocator(["0"])
    alloc.acquire(1)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        alloc.acquire(1, timeout=0.3)
    assert 0.25 < time.monotonic() - t0 < 2
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    with pytest.raises(InterruptedError):
        alloc.acquire(1, cancel=cancel)
    assert alloc.free_count() == 0  # nothing leaked, nothing invented


def test_impossible_and_invalid_requests():
    alloc = GpuAllocator(["0", "1"])
    with pytest.raises(ValueError):
        alloc.acquire(3)
    with pytest.raises(ValueError):
        alloc.acquire(-1)
    ids = alloc.acquire(1)
    alloc.release(ids)
    with pytest.raises(ValueError):
        alloc.release(ids)  # twice
    with pytest.raises(ValueError):
        alloc.release(["7"])
    with pytest.raises(ValueError):
        GpuAllocator(["0", "0"])


def test_first_come_first_served():
    """A waiting 2-GPU job is not starved by 1-GPU jobs that arrive after it."""
    alloc = GpuAllocator(["0", "1"])
    held = alloc.acquire(1)
    order = []
    big_waiting = threading.Event()

    def big():
        big_waiting.set()
        with alloc.lease(2, timeout=10):
            order.append("big")

    def small():
        with alloc.lease(1, timeout=10):
            order.append("small")

    tb = threading.Thread(target=big)
    tb.start()
    big_waiting.wait()
    time.sleep(0.2)
    ts = threading.Thread(target=small)
    ts.start()
    time.sleep(0.2)
    assert order == []  # one GPU is free, but the big job is ahead in the queue
    alloc.release(held)
    tb.join(5)
    ts.join(5)
    assert order == ["big", "small"]


def test_many_threads_never_share_a_gpu():
    alloc = GpuAllocator([str(i) for i in range(3)])
    in_use: set[str] = set()
    lock = threading.Lock()
    errors = []

    def job(n):
        for _ in range(20):
            with alloc.lease(n, timeout=10) as ids:
                with lock:
                    if in_use & set(ids):
                        errors.append(ids)
                    in_use.update(ids)
                time.sleep(0.001)
                with lock:
                    in_use.difference_update(ids)

    threads = [threading.Thread(target=job, args=(1 + i % 3,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert alloc.free_count() == 3


def test_discovery_order(monkeypatch):
    monkeypatch.setattr(gpus, "_from_nvml", lambda: [Gpu("0", "A"), Gpu("1", "B")])
    assert [g.id for g in discover_gpus()] == ["0", "1"]
    assert [g.id for g in discover_gpus("1")] == ["1"]  # configured wins
    assert discover_gpus("") == []  # configured: none
    monkeypatch.setattr(gpus, "_from_nvml", lambda: None)
    monkeypatch.setattr(gpus, "_from_nvidia_smi", lambda: [Gpu("0", "C")])
    assert [g.name for g in discover_gpus()] == ["C"]
    monkeypatch.setattr(gpus, "_from_nvidia_smi", lambda: None)
    assert discover_gpus() == []
    assert GpuAllocator(discover_gpus()).acquire(0) == ()


def test_parse_nvidia_smi():
    text = (
        "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-4f1c2d3e-aaaa-bbbb-cccc-111122223333)\n"
        "GPU 1: Tesla T4 (UUID: GPU-00000000-1111-2222-3333-444455556666)\n"
        "  MIG 1g.10gb Device 0: (UUID: MIG-xyz)\n"
    )
    got = parse_nvidia_smi_list(text)
    assert [(g.id, g.name) for g in got] == [("0", "NVIDIA H100 80GB HBM3"), ("1", "Tesla T4")]
    assert got[0].uuid.startswith("GPU-4f1c")


def test_discovery_on_this_machine_does_not_crash():
    found = discover_gpus()
    assert all(isinstance(g, Gpu) and g.id for g in found)
