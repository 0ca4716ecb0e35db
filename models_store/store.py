"""One bucket, laid out so a person can browse it:

    jobs/<job id>/inputs/dataset.csv | audio.<zip|tar.gz> | model.<ext>   what the client uploaded
    jobs/<job id>/outcome.json                                           how the job ended; written once, first writer wins
    jobs/<job id>/lease.json                                             which worker runs it now (renewed while it runs)
    jobs/<job id>/train.log                                              the trainer's output
    uploads/<tenant>/<upload id>/<file name>                             a file a client sent straight to MinIO
                                                                         (POST /v1/uploads); the jobs that name it read it
    models/<name>/versions/<N>/claim.json                                who took version N (first writer wins)
    models/<name>/versions/<N>/model.tar.gz                              the artifact (SageMaker's layout)
    models/<name>/versions/<N>/metrics.json, *.png, model_card.md        for people and dashboards
    models/<name>/versions/<N>/version.json                              lineage; written last = version complete
    models/<name>/aliases/<alias>.json                                   {"version": N}: latest, production, ...
    models/<name>/feature-cache/audio-<rate>.cache                       decoded audio of the model's last job
                                                                         (a built-in trainer's; its next job reuses it)

Model names are per tenant: the `models/` tree above is the local tenant's (and every model from
before tenants); tenant T's is the same tree under `tenants/T/models/`. `store.for_tenant(T)` is
the store seen by T: every model method of it works in T's tree; job objects are shared (a job
id belongs to one tenant, which the API checks).
"""

import io
import json
import tarfile
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
import re
from pathlib import Path
from typing import Any, BinaryIO

import urllib3
from minio import Minio
from minio.datatypes import PostPolicy
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, S3Error, ServerError
from pydantic import BaseModel

from jobs.lifecycle import Outcome
from jobs.settings import Settings

PART_SIZE = 16 * 1024 * 1024  # multipart chunk: bounds memory for uploads of unknown length
MAX_CONTROL_BYTES = 1024 * 1024  # outcome, lease, alias and version records are small JSON
VERSION_NUMBER = re.compile(r"[0-9]{1,9}")


# S3 error codes that mean "the store is not able to answer now", not "your request is wrong".
_UNAVAILABLE_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "XMinioServerNotInitialized",
                      "XMinioStorageFull", "XMinioReadQuorum", "XMinioWriteQuorum"}


def store_unavailable(err: BaseException) -> bool:
    """True when `err` says the store is down or overloaded (retry later, answer 503), as opposed
    to a refusal of this request."""
    if isinstance(err, S3Error):
        return err.code in _UNAVAILABLE_CODES
    return isinstance(err, (urllib3.exceptions.HTTPError, ServerError, InvalidResponseError, ConnectionError, TimeoutError))


class VersionInfo(BaseModel):
    """version.json: what a model version is and where it came from."""

    model_name: str
    version: int
    job_id: str
    created_at: datetime
    task: str
    dataset: str  # store key of the training CSV
    base_model: str | None = None
    base_version: int | None = None
    trainer: str | None = None  # built-in trainer (audio, keras) the version came out of
    image: str | None = None  # the image it was trained in; None when trained as a host process
    metrics: dict[str, Any] = {}
    files: list[str] = []
    # spec.promote's decision (worker/promotion.py): the alias, the metric, both held-out scores,
    # the version that held the alias, and whether this one took it.
    promotion: dict[str, Any] | None = None


def make_store(settings: Settings) -> "ModelStore":
    client = Minio(
        settings.s3_endpoint,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key,
        secure=settings.s3_secure,
    )
    scheme = "https" if settings.s3_secure else "http"
    return ModelStore(client, settings.s3_bucket, post_url=f"{scheme}://{settings.s3_endpoint}/{settings.s3_bucket}")


LOCAL_TENANT = "local"  # the local stack's tenant, whose models keep the layout from before tenants
TENANT_NAME = re.compile(r"[a-z][a-z0-9-]{0,63}")


class ModelStore:
    def __init__(self, client: Minio, bucket: str, models_root: str = "models/", post_url: str | None = None):
        self.client = client
        self.bucket = bucket
        self.models_root = models_root  # where this tenant's models are (see the layout above)
        self.post_url = post_url  # where a client POSTs a direct upload (the bucket's URL)

    def for_tenant(self, tenant: str) -> "ModelStore":
        """The store as `tenant` sees it: its own model names, versions and aliases."""
        if tenant == LOCAL_TENANT:
            return self if self.models_root == "models/" else ModelStore(self.client, self.bucket, post_url=self.post_url)
        if not TENANT_NAME.fullmatch(tenant):
            raise ValueError(f"not a tenant name: {tenant!r}")
        return ModelStore(self.client, self.bucket, f"tenants/{tenant}/models/", post_url=self.post_url)

    # ---- plumbing -------------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as err:  # another process made it first
                if err.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def ping(self) -> None:
        self.client.bucket_exists(self.bucket)

    def put_file(self, key: str, path: Path, content_type: str = "application/octet-stream") -> None:
        self.client.fput_object(self.bucket, key, str(path), content_type=content_type, part_size=PART_SIZE)

    def put_stream(self, key: str, stream: BinaryIO, length: int = -1, content_type: str = "application/octet-stream",
                   part_size: int = PART_SIZE) -> None:
        """Of unknown length (-1), the SDK holds up to four parts in memory (one read, three sending)."""
        self.client.put_object(self.bucket, key, stream, length, content_type=content_type, part_size=part_size)

    def put_json(self, key: str, value: Any) -> None:
        data = json.dumps(value, indent=2, default=str).encode()
        self.client.put_object(self.bucket, key, io.BytesIO(data), len(data), content_type="application/json")

    def get_json(self, key: str) -> Any | None:
        tagged = self.get_json_tagged(key)
        return tagged[0] if tagged is not None else None

    def exists(self, key: str) -> bool:
        try:
            self.client.stat_object(self.bucket, key)
            return True
        except S3Error as err:
            if err.code in ("NoSuchKey", "NoSuchObject"):
                return False
            raise

    def size(self, key: str) -> int:
        return self.client.stat_object(self.bucket, key).size

    def download(self, key: str, path: Path, etag: str | None = None) -> None:
        """The object into `path`; with `etag`, only that content of it (S3Error PreconditionFailed
        when the object was replaced since)."""
        self.client.fget_object(self.bucket, key, str(path), request_headers=_if_match(etag))

    def stream(self, key: str, chunk_size: int = 1024 * 1024, etag: str | None = None) -> Iterator[bytes]:
        response = self.client.get_object(self.bucket, key, request_headers=_if_match(etag))
        try:
            yield from response.stream(chunk_size)
        finally:
            response.close()
            response.release_conn()

    def presigned_url(self, key: str, expires: timedelta = timedelta(minutes=5)) -> str:
        """A download URL signed with this service's MinIO user. Short-lived: it is handed out as
        a redirect (`?redirect=true`) that the client follows at once, to the owning tenant only."""
        return self.client.presigned_get_object(self.bucket, key, expires=expires)

    def list_keys(self, prefix: str) -> list[str]:
        return [o.object_name for o in self.client.list_objects(self.bucket, prefix=prefix, recursive=True)]

    def delete_prefix(self, prefix: str) -> None:
        deletes = [DeleteObject(k) for k in self.list_keys(prefix)]
        for error in self.client.remove_objects(self.bucket, deletes):
            raise RuntimeError(f"could not delete {error.name}: {error.message}")

    def put_if_absent(self, key: str, value: Any) -> bool:
        """Write a small JSON object only if nothing is there yet (S3 conditional write,
        If-None-Match: *). True when this call created it. This is how two workers finishing jobs
        for the same model at once never take the same version number."""
        return self.put_if(key, value, etag=None) is not None

    def put_if(self, key: str, value: Any, etag: str | None) -> str | None:
        """Write a small JSON object only if the object is still the one with `etag` (If-Match),
        or, with etag None, only if there is none (If-None-Match: *). Returns the new object's
        ETag, or None when another writer came first."""
        data = json.dumps(value, default=str).encode()
        condition = {"If-None-Match": "*"} if etag is None else {"If-Match": etag}
        try:
            # The SDK's put_object does not pass conditional headers; its request method does.
            response = self.client._execute(
                "PUT", self.bucket, key, body=data,
                headers={**condition, "Content-Type": "application/json", "Content-Length": str(len(data))},
            )
            return response.headers.get("ETag") or "?"
        except S3Error as err:
            if err.code in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                return None
            raise

    def get_json_tagged(self, key: str) -> tuple[Any, str] | None:
        """A JSON object and its ETag (for a later `put_if`), or None when there is none."""
        try:
            response = self.client.get_object(self.bucket, key)
        except S3Error as err:
            if err.code == "NoSuchKey":
                return None
            raise
        try:
            return json.loads(response.read(MAX_CONTROL_BYTES)), response.headers.get("ETag", "")
        finally:
            response.close()
            response.release_conn()

    def delete(self, key: str) -> None:
        self.client.remove_object(self.bucket, key)

    # ---- direct uploads ---------------------------------------------------------------------

    @staticmethod
    def upload_prefix(tenant: str, upload_id: str) -> str:
        return f"uploads/{tenant}/{upload_id}/"

    def presigned_upload(self, key: str, size: int, expires: timedelta) -> tuple[str, dict[str, str]]:
        """The URL and form fields with which a client POSTs one file straight to MinIO (S3's POST
        policy, signed with this service's MinIO user): MinIO takes it only as `key`, only of
        exactly `size` bytes, only until `expires` from now."""
        if self.post_url is None:
            raise RuntimeError("this store was made without the bucket's URL (make_store sets it)")
        policy = PostPolicy(self.bucket, datetime.now(UTC) + expires)
        policy.add_equals_condition("key", key)
        policy.add_content_length_range_condition(size, size)
        return self.post_url, {"key": key, **self.client.presigned_post_policy(policy)}

    def find_upload(self, tenant: str, upload_id: str) -> tuple[str, int, str] | None:
        """(key, size, etag) of the file uploaded under that id, or None when nothing arrived there."""
        found = list(self.client.list_objects(self.bucket, prefix=self.upload_prefix(tenant, upload_id), recursive=True))
        return (found[0].object_name, found[0].size, found[0].etag) if len(found) == 1 else None

    # ---- jobs -----------------------------------------------------------------------------

    @staticmethod
    def job_prefix(job_id: str) -> str:
        return f"jobs/{job_id}/"

    def job_outcome(self, job_id: str) -> Outcome | None:
        raw = self.get_json(f"jobs/{job_id}/outcome.json")
        return Outcome.model_validate(raw) if raw is not None else None

    def record_job_outcome(self, job_id: str, outcome: Outcome | dict) -> Outcome:
        """Write the job's outcome unless it has one already (first writer wins: a cancel and a
        finishing run can race, a stale run never overwrites). Returns the job's outcome: this
        one, or the one that was there first."""
        outcome = outcome if isinstance(outcome, Outcome) else Outcome.model_validate(outcome)
        if self.put_if_absent(f"jobs/{job_id}/outcome.json", outcome.record()):
            return outcome
        return self.job_outcome(job_id)

    def publish_job_outputs(self, job_id: str, output_dir: Path) -> list[str]:
        """A job's result files that are not a model (a transcription's CSV and report)."""
        names = []
        for path in sorted(output_dir.glob("*")):
            if path.is_file():
                self.put_file(f"jobs/{job_id}/outputs/{path.name}", path, _content_type(path))
                names.append(path.name)
        return names

    # ---- models ---------------------------------------------------------------------------

    def version_prefix(self, name: str, version: int) -> str:
        return f"{self.models_root}{name}/versions/{version}/"

    def feature_cache_prefix(self, name: str) -> str:
        return f"{self.models_root}{name}/feature-cache/"

    def artifact_key(self, name: str, version: int) -> str:
        return self.version_prefix(name, version) + "model.tar.gz"

    def list_models(self) -> list[str]:
        objects = self.client.list_objects(self.bucket, prefix=self.models_root, recursive=False)
        return sorted(o.object_name.removeprefix(self.models_root).rstrip("/") for o in objects if o.is_dir)

    def _version_numbers(self, name: str) -> list[int]:
        prefix = f"{self.models_root}{name}/versions/"
        numbers = []
        for o in self.client.list_objects(self.bucket, prefix=prefix, recursive=False):
            tail = o.object_name.removeprefix(prefix).rstrip("/")
            if o.is_dir and tail.isdigit():
                numbers.append(int(tail))
        return sorted(numbers)

    def get_version(self, name: str, version: int) -> VersionInfo | None:
        raw = self.get_json(self.version_prefix(name, version) + "version.json")
        return VersionInfo.model_validate(raw) if raw else None

    def list_versions(self, name: str) -> list[VersionInfo]:
        """Complete versions only (version.json written), oldest first."""
        found = (self.get_version(name, n) for n in self._version_numbers(name))
        return [v for v in found if v is not None]

    def aliases(self, name: str) -> dict[str, int]:
        prefix = f"{self.models_root}{name}/aliases/"
        result = {}
        for key in self.list_keys(prefix):
            value = self.get_json(key)
            if value:
                result[key.removeprefix(prefix).removesuffix(".json")] = int(value["version"])
        return result

    def set_alias(self, name: str, alias: str, version: int) -> None:
        if self.get_version(name, version) is None:
            raise KeyError(f"model {name!r} has no version {version}")
        self.put_json(f"{self.models_root}{name}/aliases/{alias}.json", {"version": version, "updated_at": datetime.now(UTC)})

    def find_version(self, name: str, version: int | str) -> VersionInfo | None:
        """A version number or an alias ('latest', 'production', ...) -> that complete version."""
        if isinstance(version, int) or VERSION_NUMBER.fullmatch(str(version)):
            number = int(version)
        else:
            number = self.aliases(name).get(str(version))
            if number is None:
                return None
        return self.get_version(name, number)

    def publish_version(self, name: str, job_id: str, model_dir: Path, output_dir: Path, lineage: dict) -> VersionInfo:
        """Store a trained model as the next version of `name` and move `latest` to it.

        Idempotent per job: a job whose outcome was not recorded (worker killed after this call)
        finds the version it already claimed and reuses it, so a rerun never makes a second one.
        """
        version = self._claim_version(name, job_id)
        prefix = self.version_prefix(name, version)
        files = []
        with tempfile.TemporaryDirectory() as tmp:
            artifact = Path(tmp) / "model.tar.gz"
            with tarfile.open(artifact, "w:gz") as tar:
                for path in sorted(model_dir.rglob("*")):
                    tar.add(path, arcname=str(path.relative_to(model_dir)), recursive=False)
            self.put_file(prefix + "model.tar.gz", artifact, "application/gzip")
            files.append("model.tar.gz")
        # The browsable side files: metrics, plots and the model card, wherever the trainer put them.
        for folder in (output_dir, model_dir):
            for path in sorted(folder.glob("*")):
                if path.is_file() and path.suffix in (".json", ".png", ".md", ".csv", ".pdf") and path.name not in files:
                    if path.name in ("config.json", "labels.json") and folder == model_dir:
                        continue
                    self.put_file(prefix + path.name, path, _content_type(path))
                    files.append(path.name)
        metrics = {}
        if (output_dir / "metrics.json").is_file():
            metrics = json.loads((output_dir / "metrics.json").read_text())
        info = VersionInfo(
            model_name=name, version=version, job_id=job_id, created_at=datetime.now(UTC),
            metrics=metrics, files=files, **lineage,
        )
        self.put_json(prefix + "version.json", info.model_dump(mode="json"))  # the commit point
        self._advance_latest(name, version)
        return info

    def move_alias_if(self, name: str, alias: str, version: int, expected: int | None) -> bool:
        """Point `alias` at `version` only if it still points at `expected` (None: unset), a
        compare-and-swap on the alias object; False when it moved meanwhile."""
        key = f"{self.models_root}{name}/aliases/{alias}.json"
        current = self.get_json_tagged(key)
        holder = int(current[0]["version"]) if current and current[0] else None
        if holder != expected:
            return False
        return self.put_if(key, {"version": version, "updated_at": datetime.now(UTC)}, current[1] if current else None) is not None

    def record_promotion(self, name: str, version: int, decision: dict[str, Any]) -> None:
        """Add spec.promote's decision to the version's lineage (version.json)."""
        info = self.get_version(name, version)
        if info is None:
            raise KeyError(f"model {name!r} has no version {version}")
        self.put_json(self.version_prefix(name, version) + "version.json",
                      info.model_copy(update={"promotion": decision}).model_dump(mode="json"))

    def _advance_latest(self, name: str, version: int) -> None:
        """Move `latest` to `version` unless it already points at a newer one: two jobs that
        finish out of order never move it backwards (compare-and-swap on the alias object)."""
        key = f"{self.models_root}{name}/aliases/latest.json"
        while True:
            current = self.get_json_tagged(key)
            if current is not None and int(current[0].get("version", 0)) >= version:
                return
            if self.put_if(key, {"version": version, "updated_at": datetime.now(UTC)}, current[1] if current else None):
                return

    def _claim_version(self, name: str, job_id: str) -> int:
        numbers = self._version_numbers(name)
        for number in numbers:
            claim = self.get_json(self.version_prefix(name, number) + "claim.json")
            if claim and claim.get("job_id") == job_id:
                return number
        candidate = (numbers[-1] if numbers else 0) + 1
        while not self.put_if_absent(self.version_prefix(name, candidate) + "claim.json", {"job_id": job_id}):
            candidate += 1
        return candidate


def _if_match(etag: str | None) -> dict[str, str] | None:
    return {"If-Match": '"' + etag.strip('"') + '"'} if etag else None


def _content_type(path: Path) -> str:
    return {
        ".json": "application/json",
        ".png": "image/png",
        ".md": "text/markdown",
        ".csv": "text/csv",
        ".pdf": "application/pdf",
    }.get(path.suffix, "application/octet-stream")
