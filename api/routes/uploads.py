"""/v1/uploads: a file sent straight to the store, not through the API.

A client asks for an upload (its file's name and exact size) and gets a presigned POST form for
one object under its tenant's `uploads/` (models_store/store.py); it sends the file to MinIO with
that form, then names the upload's id in POST /v1/jobs where it would have sent the file
(api/intake.py). The bytes of a big archive thus cross one network hop and no Python process;
MinIO itself enforces the key, the size and the expiry. The API reads the file once, when the job
is submitted, to check it as it checks any upload (api/submissions.py). A job that is refused
leaves the upload in place, so a corrected submission can name it again.
"""

import uuid
from datetime import UTC, datetime, timedelta

from fastapi import APIRouter, Depends, status

from api.auth import Role, Submitter, audit, require
from api.deps import SessionDep, SettingsDep, TenantStoreDep
from api.schemas import UploadIn, UploadOut
from api.submissions import safe_name
from api.validation import InputError

router = APIRouter(prefix="/v1/uploads", tags=["uploads"], dependencies=[Depends(require(Role.read))])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=UploadOut)
def create_upload(body: UploadIn, caller: Submitter, session: SessionDep, store: TenantStoreDep, settings: SettingsDep) -> UploadOut:
    """A presigned form for one file of exactly `size` bytes, valid for RETRAIN_UPLOAD_URL_TTL_S."""
    if body.size > settings.max_upload_bytes:
        raise InputError("size", f"is {body.size} bytes; the limit is {settings.max_upload_bytes}", file=body.filename, status=413)
    upload_id = uuid.uuid4().hex
    key = store.upload_prefix(caller.tenant, upload_id) + safe_name(body.filename)
    ttl = timedelta(seconds=settings.upload_url_ttl_s)
    url, fields = store.presigned_upload(key, body.size, ttl)
    audit(session, caller, "upload.create", upload_id, filename=body.filename, size=body.size)
    return UploadOut(id=upload_id, url=url, fields=fields, size=body.size, expires_at=datetime.now(UTC) + ttl)
