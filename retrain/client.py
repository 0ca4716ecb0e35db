"""The Python SDK of the retrain service: everything the REST API does, as methods.

    from retrain.client import Client

    client = Client()  # RETRAIN_API_URL / RETRAIN_API_KEY, or the config file
    job = client.submit("words.csv", audio="clips/", task="audio_classification",
                        model_name="keywords", hyperparameters={"epochs": 20})
    for event in client.events(job["id"]):  # live: started, progress ..., then the final one
        print(event["type"], event.get("epoch"), event.get("metrics"))
    client.download(job["id"], "model/")

Where the API URL and key come from, first found wins: the arguments, the environment
(`RETRAIN_API_URL`, `RETRAIN_API_KEY`), the config file (`RETRAIN_CONFIG`, else
`~/.config/retrain/config.toml`, keys `api_url` and `api_key`), then http://127.0.0.1:8000 and,
run from the repository, the local stack's `.run/admin.key`.

A refusal of the API raises `ApiError`, whose text is the one line a user needs: the file, the
row and the field at fault, and why.
"""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
FINAL = {"succeeded", "failed", "cancelled"}


class ApiError(Exception):
    """The API refused a request (4xx/5xx), or could not be reached (status None)."""

    def __init__(self, status: int | None, message: str, field: str | None = None, file: str | None = None, row: int | None = None):
        self.status, self.message, self.field, self.file, self.row = status, message, field, file, row
        where = ", ".join(part for part in (file, f"row {row}" if row is not None else None, f"field {field}" if field else None) if part)
        super().__init__(f"{where}: {message}" if where else message)

    @classmethod
    def from_response(cls, response: httpx.Response) -> ApiError:
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = None
        if isinstance(detail, dict):
            return cls(response.status_code, str(detail.get("error", response.reason_phrase)), detail.get("field"),
                       detail.get("file"), detail.get("row"))
        if isinstance(detail, list) and detail and isinstance(detail[0], dict):  # FastAPI's own shape
            first = detail[0]
            return cls(response.status_code, str(first.get("msg")), ".".join(str(p) for p in first.get("loc", [])[1:]) or None)
        return cls(response.status_code, f"{response.status_code} {response.reason_phrase}: {response.text[:200]}")


@dataclass(frozen=True)
class Config:
    url: str
    key: str | None

    @classmethod
    def load(cls, url: str | None = None, key: str | None = None) -> Config:
        path = Path(os.environ.get("RETRAIN_CONFIG") or Path.home() / ".config" / "retrain" / "config.toml")
        stored: dict[str, Any] = {}
        if path.is_file():
            with path.open("rb") as fp:
                stored = tomllib.load(fp)
        url = url or os.environ.get("RETRAIN_API_URL") or stored.get("api_url") or DEFAULT_URL
        key = key or os.environ.get("RETRAIN_API_KEY") or stored.get("api_key") or _local_stack_key()
        return cls(url.rstrip("/"), key)


def _local_stack_key() -> str | None:
    """The admin key `make up` writes for the local stack (.run/admin.key, from the repository root)."""
    path = Path(".run") / "admin.key"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


class Client:
    def __init__(self, url: str | None = None, key: str | None = None, timeout: float = 60.0):
        self.config = Config.load(url, key)
        headers = {"Authorization": f"Bearer {self.config.key}"} if self.config.key else {}
        self.http = httpx.Client(base_url=self.config.url, headers=headers, timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.http.close()

    # ---- jobs ---------------------------------------------------------------------------------

    def submit(
        self, dataset: str | Path, *, task: str, model_name: str, audio: str | Path | None = None,
        hyperparameters: dict[str, Any] | None = None, base: str | None = None, model: str | Path | None = None,
        image: str | None = None, promote: dict | None = None, heldout: str | Path | None = None,
        heldout_audio: str | Path | None = None, on_upload: Callable[[int, int], None] | None = None,
    ) -> dict:
        """Submit a job; returns the API's answer ({"id", "state", "status_url"}). `audio` is a
        folder (the files the CSV names are zipped here) or a zip/tar archive; `base` is
        NAME or NAME:VERSION (a number or an alias) of a stored model; `on_upload(sent, total)`
        follows the upload. `promote` ({"alias": "production", "metric": "macro_f1"}) moves the
        alias to the new version only if it beats the holder on `heldout` (CSV) + `heldout_audio`."""
        spec: dict[str, Any] = {"task": task, "model_name": model_name, "hyperparameters": hyperparameters or {}}
        if base:
            name, _, version = base.partition(":")
            spec["base"] = {"model": name, "version": int(version) if version.isdigit() else (version or "latest")}
        if image:
            spec["image"] = image
        if promote:
            spec["promote"] = promote
        dataset = Path(dataset)
        with tempfile.TemporaryDirectory(prefix="retrain-upload-") as tmp:
            paths = {"dataset": dataset}
            if audio is not None:
                audio = Path(audio)
                paths["audio"] = zip_folder(dataset, audio, Path(tmp) / f"{audio.name or 'audio'}.zip") if audio.is_dir() else audio
            if model is not None:
                paths["model"] = Path(model)
            if heldout is not None:
                paths["heldout"] = Path(heldout)
                if heldout_audio is not None:
                    held = Path(heldout_audio)
                    paths["heldout_audio"] = zip_folder(paths["heldout"], held, Path(tmp) / "heldout.zip") if held.is_dir() else held
            sizes = {field: path.stat().st_size for field, path in paths.items()}
            progress = _Progress(sum(sizes.values()), on_upload)
            files = {}
            try:
                for field, path in paths.items():
                    files[field] = (path.name, _Counted(path.open("rb"), progress), "application/octet-stream")
                response = self._send("POST", "/v1/jobs", data={"spec": json.dumps(spec)}, files=files)
            finally:
                for _, fileobj, _ in files.values():
                    fileobj.close()
        return response.json()

    def job(self, job_id: str) -> dict:
        return self._send("GET", f"/v1/jobs/{job_id}").json()

    def jobs(self, state: str | None = None, limit: int = 50) -> Iterator[dict]:
        """Jobs, the newest first, page after page."""
        params: dict[str, Any] = {"limit": min(limit, 100)}
        if state:
            params["state"] = state
        seen = 0
        while seen < limit:
            page = self._send("GET", "/v1/jobs", params=params).json()
            for job in page["items"][: limit - seen]:
                seen += 1
                yield job
            if not page.get("next_cursor") or not page["items"]:
                return
            params["cursor"] = page["next_cursor"]

    def cancel(self, job_id: str) -> dict:
        return self._send("POST", f"/v1/jobs/{job_id}/cancel").json()

    def logs(self, job_id: str) -> str:
        return self._send("GET", f"/v1/jobs/{job_id}/logs").text

    def events(self, job_id: str, last_event_id: str | None = None, retries: int = 20) -> Iterator[dict]:
        """The job's events (Server-Sent Events), past ones first, until the final one. A dropped
        connection is resumed from the last event received (Last-Event-ID), `retries` times."""
        failures = 0
        while True:
            headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
            try:
                with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=httpx.Timeout(60, read=120)) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise ApiError.from_response(response)
                    for event_id, event in parse_sse(response.iter_lines()):
                        failures = 0
                        last_event_id = event_id or last_event_id
                        yield event
                        if event.get("type") in FINAL:
                            return
                return  # closed by the server without a final event: the job has no more
            except (httpx.TransportError, httpx.RemoteProtocolError) as err:
                failures += 1
                if failures > retries:
                    raise ApiError(None, f"lost the event stream of job {job_id}: {err}") from None
                time.sleep(min(2 ** failures * 0.25, 10))

    def wait(self, job_id: str, on_event: Callable[[dict], None] | None = None) -> dict:
        """Follow the job until it ends; returns the final job record."""
        for event in self.events(job_id):
            if on_event:
                on_event(event)
        return self.job(job_id)

    def download(self, job_id: str, dest: str | Path) -> Path:
        """The job's model (model.tar.gz), extracted under `dest`."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile() as tmp:
            with self.http.stream("GET", f"/v1/jobs/{job_id}/artifact") as response:
                if response.status_code >= 400:
                    response.read()
                    raise ApiError.from_response(response)
                for chunk in response.iter_bytes():
                    tmp.write(chunk)
            tmp.seek(0)
            with tarfile.open(fileobj=tmp, mode="r:gz") as tar:
                tar.extractall(dest, filter="data")  # regular files and folders under dest only
        return dest

    # ---- models -------------------------------------------------------------------------------

    def models(self) -> list[dict]:
        return self._send("GET", "/v1/models").json()

    def versions(self, name: str) -> list[dict]:
        return self._send("GET", f"/v1/models/{name}/versions").json()

    def promote(self, name: str, version: int, alias: str = "production") -> dict:
        return self._send("PUT", f"/v1/models/{name}/aliases/{alias}", json={"version": version}).json()

    # ---- plumbing -----------------------------------------------------------------------------

    def _send(self, method: str, url: str, **kwargs) -> httpx.Response:
        try:
            response = self.http.request(method, url, **kwargs)
        except httpx.TransportError as err:
            raise ApiError(None, f"cannot reach the API at {self.config.url} ({err})") from None
        if response.status_code >= 400:
            raise ApiError.from_response(response)
        return response


def parse_sse(lines) -> Iterator[tuple[str | None, dict]]:
    """(id, JSON data) of each Server-Sent Events message; comments and other fields are skipped."""
    event_id, data = None, []
    for line in lines:
        if line == "":
            if data:
                yield event_id, json.loads("\n".join(data))
            event_id, data = None, []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "id":
                event_id = value
            elif name == "data":
                data.append(value)
    if data:
        yield event_id, json.loads("\n".join(data))


def zip_folder(dataset: Path, folder: Path, out: Path) -> Path:
    """The files of `folder` that the CSV's `audio` column names, in a zip (stored, not
    compressed: audio barely compresses). A file the CSV names that is not there is refused
    here, with its row, before anything is uploaded."""
    import csv

    with dataset.open(newline="", encoding="utf-8-sig") as fp:
        reader = csv.DictReader(fp)
        names: dict[str, int] = {}
        for number, row in enumerate(reader, start=2):
            name = (row.get("audio") or "").strip()
            if name:
                names.setdefault(name, number)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, number in names.items():
            path = folder / name
            if not path.is_file():
                raise ApiError(None, f"{name!r} is not in {str(folder)!r}", field="audio", file=dataset.name, row=number)
            archive.write(path, name)
    return out


class _Progress:
    def __init__(self, total: int, callback: Callable[[int, int], None] | None):
        self.total, self.sent, self.callback = total, 0, callback

    def add(self, n: int) -> None:
        self.sent += n
        if self.callback:
            self.callback(self.sent, self.total)


class _Counted:
    """A file whose reads count toward the upload's progress (httpx reads it in chunks)."""

    def __init__(self, fileobj: BinaryIO, progress: _Progress):
        self.fileobj, self.progress = fileobj, progress

    def read(self, size: int = -1) -> bytes:
        chunk = self.fileobj.read(size)
        self.progress.add(len(chunk))
        return chunk

    def __getattr__(self, name):  # seek, tell, fileno, close: the file's own
        return getattr(self.fileobj, name)

    def __iter__(self):
        while chunk := self.read(64 * 1024):
            yield chunk
