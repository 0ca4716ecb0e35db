"""`retrain`: the service from a terminal, on the SDK (retrain/client.py).

    retrain submit words.csv --audio clips/ --task audio_classification --model-name keywords \\
        --hp epochs=20 --hp lr=0.001 --wait
    retrain watch JOB | retrain jobs [--state running] | retrain cancel JOB | retrain logs JOB
    retrain download JOB -o model/
    retrain models | retrain versions NAME | retrain promote NAME VERSION --alias production

The API URL and key: RETRAIN_API_URL / RETRAIN_API_KEY, or the config file (see the SDK).
Exit status: 0 done (with --wait / watch: the job succeeded), 1 the job failed or was
cancelled, 2 the API refused the request or could not be reached (one line on stderr).
"""

import argparse
import json
import sys
from typing import Any

from retrain.client import ApiError, Client


def parse_hp(items: list[str]) -> dict[str, Any]:
    """key=value pairs; a value that is JSON (5, 0.001, true, [1,2]) is taken as such, otherwise
    it is a string."""
    hyperparameters = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"retrain: --hp takes key=value, got {item!r}")
        try:
            hyperparameters[key] = json.loads(value)
        except ValueError:
            hyperparameters[key] = value
    return hyperparameters


def describe(event: dict) -> str:
    kind = event.get("type")
    if kind == "started":
        return f"started on {event.get('worker') or 'a worker'} (attempt {event.get('attempt', 1)})"
    if kind == "progress":
        parts = []
        if event.get("epoch") is not None:
            parts.append(f"epoch {event['epoch']}" + (f"/{event['epochs']}" if event.get("epochs") else ""))
        if event.get("phase"):
            parts.append(event["phase"])
        parts += [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted((event.get("metrics") or {}).items())]
        return "  ".join(parts) or "progress"
    if kind == "succeeded":
        return f"succeeded: {event.get('model_name', 'model')} version {event.get('model_version')}"
    return f"{kind}: {event.get('reason') or ''}".rstrip(": ")


class UploadBar:
    """Upload progress on stderr (tqdm when it is there and stderr is a terminal)."""

    def __init__(self):
        self.bar = None

    def __call__(self, sent: int, total: int) -> None:
        if self.bar is None:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            quiet = not sys.stderr.isatty()
            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="upload", disable=quiet) if tqdm else False
        if self.bar:
            self.bar.update(sent - self.bar.n)
            if sent >= total:
                self.bar.close()


def follow(client: Client, job_id: str) -> int:
    for event in client.events(job_id):
        print(describe(event), flush=True)
    job = client.job(job_id)
    if job["state"] == "succeeded":
        metrics = job.get("metrics") or {}
        shown = {k: metrics[k] for k in ("accuracy", "macro_f1", "wer", "cer") if k in metrics}
        if shown:
            print("metrics: " + "  ".join(f"{k}={v:.4g}" for k, v in shown.items()))
        return 0
    print(f"job {job_id} {job['state']}: {job.get('error') or ''}".rstrip(": "), file=sys.stderr)
    return 1


def table(rows: list[list[Any]], header: list[str]) -> None:
    cells = [header] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="retrain", description="Retrain audio models with the retrain service.")
    parser.add_argument("--api-url", help="the API (default: RETRAIN_API_URL, the config file, http://127.0.0.1:8000)")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("submit", help="upload a data set and start a job")
    p.add_argument("dataset", help="the CSV (audio,label or audio,text; optional split)")
    p.add_argument("--audio", help="a folder (zipped here: the files the CSV names) or a zip/tar archive")
    p.add_argument("--task", required=True, choices=["audio_classification", "asr", "transcribe"])
    p.add_argument("--model-name", required=True)
    p.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE", help="a hyperparameter (repeatable)")
    p.add_argument("--base", metavar="NAME[:VERSION]", help="start from a stored model version (or alias)")
    p.add_argument("--model", help="your current model to start from (safetensors / ONNX / .keras / an archive)")
    p.add_argument("--image", help="a trainer image of your own (allowed prefixes only)")
    p.add_argument("--promote", metavar="ALIAS[:METRIC]", help="move ALIAS (e.g. production) to the new version only if it "
                   "beats the holder on the held-out set (METRIC: macro_f1 by default, or accuracy, ...)")
    p.add_argument("--heldout", help="with --promote: the held-out CSV both versions are scored on")
    p.add_argument("--heldout-audio", help="with --promote: its clips, a folder or an archive")
    p.add_argument("--wait", action="store_true", help="follow the job; exit 0 only if it succeeded")

    for name, text in (("watch", "follow a job live until it ends"), ("cancel", "cancel a job"), ("logs", "a job's trainer log")):
        commands.add_parser(name, help=text).add_argument("job")
    p = commands.add_parser("jobs", help="list jobs, the newest first")
    p.add_argument("--state", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    p.add_argument("--limit", type=int, default=20)
    p = commands.add_parser("download", help="download a job's model, extracted")
    p.add_argument("job")
    p.add_argument("-o", "--output", required=True, help="folder to extract into")
    commands.add_parser("models", help="list models")
    commands.add_parser("versions", help="list a model's versions").add_argument("name")
    p = commands.add_parser("promote", help="point an alias at a version")
    p.add_argument("name")
    p.add_argument("version", type=int)
    p.add_argument("--alias", default="production")

    args = parser.parse_args(argv)
    try:
        with Client(url=args.api_url) as client:
            return run(client, args)
    except ApiError as err:
        print(f"retrain: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def run(client: Client, args: argparse.Namespace) -> int:
    if args.command == "submit":
        promote = None
        if args.promote:
            alias, _, metric = args.promote.partition(":")
            promote = {"alias": alias, "metric": metric or "macro_f1"}
        created = client.submit(args.dataset, task=args.task, model_name=args.model_name, audio=args.audio,
                                hyperparameters=parse_hp(args.hp), base=args.base, model=args.model, image=args.image,
                                promote=promote, heldout=args.heldout, heldout_audio=args.heldout_audio, on_upload=UploadBar())
        print(created["id"], flush=True)
        return follow(client, created["id"]) if args.wait else 0
    if args.command == "watch":
        return follow(client, args.job)
    if args.command == "cancel":
        print(client.cancel(args.job)["state"])
    elif args.command == "logs":
        sys.stdout.write(client.logs(args.job))
    elif args.command == "jobs":
        table([[j["id"], j["state"], j["task"], j["model_name"], j.get("model_version"), j["created_at"][:19]]
               for j in client.jobs(args.state, args.limit)], ["ID", "STATE", "TASK", "MODEL", "VERSION", "CREATED"])
    elif args.command == "download":
        print(client.download(args.job, args.output))
    elif args.command == "models":
        table([[m["name"], m["versions"], " ".join(f"{a}={v}" for a, v in sorted(m["aliases"].items()))] for m in client.models()],
              ["NAME", "VERSIONS", "ALIASES"])
    elif args.command == "versions":
        rows = []
        for v in client.versions(args.name):
            metrics = v.get("metrics") or {}
            score = next((f"{k}={metrics[k]:.4g}" for k in ("accuracy", "macro_f1", "wer") if isinstance(metrics.get(k), (int, float))), "")
            rows.append([v.get("version"), v.get("created_at", "")[:19], v.get("job_id"), v.get("base_version"), score])
        table(rows, ["VERSION", "CREATED", "JOB", "BASE", "METRIC"])
    elif args.command == "promote":
        model = client.promote(args.name, args.version, args.alias)
        print(f"{args.name}: {args.alias} -> {model['aliases'].get(args.alias)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
