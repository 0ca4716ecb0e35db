"""The Grafana dashboard in deploy/grafana graphs only metrics the API and the workers export."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

from api.db import Database
from api.event_stream import StreamSlots
from api.metrics import ApiMetrics
from worker.gpus import GpuAllocator
from worker.metrics import WorkerMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "retrain-dashboard.json"


def exported(tmp_path) -> set[str]:
    state = SimpleNamespace(db=Database(f"sqlite:///{tmp_path}/api.db"), event_streams=StreamSlots(1))
    registries = [ApiMetrics(state).registry, WorkerMetrics(2, GpuAllocator(["0"])).registry]
    return {sample.name for registry in registries for family in registry.collect() for sample in family.samples} | {
        family.name for registry in registries for family in registry.collect()}


def test_every_panel_queries_exported_metrics(tmp_path):
    names = exported(tmp_path)
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert len(panels) >= 10
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            for metric in re.findall(r"\bretrain_[a-z_]+", target["expr"]):
                # A labelled family without samples yet (lag, GPUs) is known by its family name.
                assert metric in names or re.sub(r"_(bucket|count|sum|total)$", "", metric) in names, (panel["title"], metric)
