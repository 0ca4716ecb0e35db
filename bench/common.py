"""Shared by the benchmarks: where the running stack is, and a small spoken-word data set."""

import os
from pathlib import Path

from demo.spoken_words import DEFAULT_WORDS, TRAIN_VOICES, make_dataset, zip_clips

API = f"http://{os.environ.get('RETRAIN_API_HOST', '127.0.0.1')}:{os.environ.get('RETRAIN_API_PORT', '8000')}"
KAFKA = os.environ.get("RETRAIN_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
S3 = os.environ.get("RETRAIN_S3_ENDPOINT", "127.0.0.1:9000")
S3_KEYS = (os.environ.get("RETRAIN_S3_ACCESS_KEY", "retrain"), os.environ.get("RETRAIN_S3_SECRET_KEY", "retrain-secret"))


def api_headers() -> dict[str, str]:
    """The API key to send: RETRAIN_API_KEY, else the local stack's .run/admin.key (what `make up` wrote)."""
    key = os.environ.get("RETRAIN_API_KEY")
    if not key:
        path = Path(__file__).resolve().parent.parent / ".run" / "admin.key"
        key = path.read_text().strip() if path.is_file() else ""
    return {"Authorization": f"Bearer {key}"} if key else {}


def small_dataset(out: Path) -> tuple[Path, Path]:
    csv = make_dataset(out, DEFAULT_WORDS[:2], TRAIN_VOICES[:3], repeats=1)
    return csv, zip_clips(out, csv, out / "clips.zip")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
