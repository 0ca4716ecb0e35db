"""Dispatch latency: from the API's 202 to the job running on a worker, over N small jobs.

Two clocks per job: `server` = the job record's started_at - created_at (API commit -> outbox ->
Kafka -> worker -> started event), and `client` = until a client polling GET /v1/jobs sees
`running` (adds the event consumer and the poll interval). Each job is cancelled once running, and
the next is submitted when the worker runs nothing again (its retrain_worker_jobs_running), so
each job meets an idle worker. Baseline, same run and broker: a bare Kafka produce -> consume
round trip, the floor any Kafka-based dispatch pays.

    make up && .venv/bin/python bench/dispatch_latency.py [--jobs 50]
"""

import argparse
import json
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import API, KAFKA, api_headers, percentile, small_dataset, table  # noqa: E402
from deploy.local.stack import Stack  # noqa: E402


def kafka_round_trips(n: int) -> list[float]:
    topic = f"bench-rtt-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": KAFKA})  # keep a reference until the topic exists
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result()
    producer = Producer({"bootstrap.servers": KAFKA, "enable.idempotence": True, "acks": "all", "linger.ms": 5})
    consumer = Consumer({"bootstrap.servers": KAFKA, "group.id": topic, "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    times = []
    while consumer.poll(0.2) is None and not consumer.assignment():
        pass
    for i in range(n):
        start = time.perf_counter()
        producer.produce(topic, value=str(i).encode())
        producer.flush()
        while True:
            message = consumer.poll(5)
            if message is not None and not message.error() and message.value() == str(i).encode():
                break
        times.append(time.perf_counter() - start)
    consumer.close()
    return times


def worker_running(metrics_url: str) -> float:
    """retrain_worker_jobs_running of one worker (its /metrics)."""
    for line in httpx.get(metrics_url, timeout=10).text.splitlines():
        if line.startswith("retrain_worker_jobs_running "):
            return float(line.split()[1])
    raise RuntimeError(f"{metrics_url} has no retrain_worker_jobs_running")


def dispatch(client: httpx.Client, csv: Path, clips: Path, n: int, trace: list | None = None,
             worker_metrics: str | None = None) -> tuple[list[float], list[float]]:
    """`trace`, when given, gets (job id, seconds until a client saw it running) per job.
    `worker_metrics` (a worker's /metrics URL): before each job, wait until that worker runs
    nothing, so each job is dispatched to a free worker. A cancelled job reads cancelled at once,
    but its worker may still be stopping its trainer (SIGTERM, up to 10 s): without the wait the
    next job would measure that stop, not its dispatch."""
    spec = {"task": "audio_classification", "model_name": "bench-dispatch", "hyperparameters": {"epochs": 1}}
    server, seen = [], []
    for _ in range(n):
        while worker_metrics is not None and worker_running(worker_metrics) > 0:
            time.sleep(0.01)
        response = client.post("/v1/jobs", data={"spec": json.dumps(spec)}, files={
            "dataset": ("d.csv", csv.read_bytes(), "text/csv"), "audio": ("c.zip", clips.read_bytes(), "application/zip")})
        accepted = time.perf_counter()
        job_id = response.raise_for_status().json()["id"]
        while True:
            job = client.get(f"/v1/jobs/{job_id}").json()
            if job["state"] != "queued":
                break
            time.sleep(0.01)
        seen.append(time.perf_counter() - accepted)
        if trace is not None:
            trace.append((job_id, seen[-1]))
        server.append((datetime.fromisoformat(job["started_at"]) - datetime.fromisoformat(job["created_at"])).total_seconds())
        client.post(f"/v1/jobs/{job_id}/cancel")
        while client.get(f"/v1/jobs/{job_id}").json()["state"] not in ("cancelled", "succeeded", "failed"):
            time.sleep(0.05)
    return server, seen


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, httpx.Client(base_url=API, headers=api_headers(), timeout=60) as client:
        csv, clips = small_dataset(Path(tmp))
        baseline = kafka_round_trips(args.jobs)
        server, seen = dispatch(client, csv, clips, args.jobs, worker_metrics=Stack.from_env().metrics_url())
    base50 = percentile(baseline, 50)
    rows = [
        ["kafka produce->consume (baseline)", percentile(baseline, 50) * 1000, percentile(baseline, 95) * 1000, 1.0],
        ["202 -> running (server clocks)", percentile(server, 50) * 1000, percentile(server, 95) * 1000, percentile(server, 50) / base50],
        ["202 -> running seen by a client", percentile(seen, 50) * 1000, percentile(seen, 95) * 1000, percentile(seen, 50) / base50],
    ]
    print(f"dispatch latency over {args.jobs} jobs (ms)")
    print(table(["path", "p50 ms", "p95 ms", "p50 / baseline"], rows))


if __name__ == "__main__":
    main()
