"""The API and the workers reach MinIO as users of their own whose policy allows their bucket's
objects only, never with the root credentials (which only the stack and MinIO hold)."""

import io
from pathlib import Path

import pytest
from minio import Minio
from minio.error import S3Error

pytestmark = pytest.mark.e2e


def _environ(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(p.decode(errors="replace").split("=", 1) for p in pairs if b"=" in p)


@pytest.mark.parametrize("name", ["api", "worker"])
def test_a_service_uses_its_own_minio_user_limited_to_its_bucket(service, name):
    env = _environ(service.pid(name))
    access, secret = env["RETRAIN_S3_ACCESS_KEY"], env["RETRAIN_S3_SECRET_KEY"]
    assert access != service.s3_access_key and service.s3_secret_key not in env.values()
    bucket = env.get("RETRAIN_S3_BUCKET", "retrain")
    user = Minio(service.s3_endpoint, access_key=access, secret_key=secret, secure=False)
    user.put_object(bucket, f"least-privilege/{name}.txt", io.BytesIO(b"ok"), 2)  # its bucket: yes
    assert user.get_object(bucket, f"least-privilege/{name}.txt").read() == b"ok"
    user.remove_object(bucket, f"least-privilege/{name}.txt")
    root = Minio(service.s3_endpoint, access_key=service.s3_access_key, secret_key=service.s3_secret_key, secure=False)
    other = f"not-{name}s-bucket"
    if not root.bucket_exists(other):
        root.make_bucket(other)
    for refused in (lambda: user.put_object(other, "x", io.BytesIO(b"x"), 1), lambda: user.make_bucket(f"{other}-2"),
                    lambda: list(user.list_objects(other))):
        with pytest.raises(S3Error) as err:
            refused()
        assert err.value.code == "AccessDenied"
