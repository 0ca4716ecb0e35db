"""POST /v1/jobs's body, read as it arrives.

Each uploaded file goes to the store (its object under the job's inputs/) and to a spool file
on this machine's disk at once, while the client is still sending: a big upload costs its
transfer once, not received, then checked, then sent again. The spool files are what the checks
read (api/submissions.py); a submission the checks refuse has its objects deleted again.

The body is parsed with python-multipart on the event loop (only slicing there); each file's
bytes are handed to a thread of its own (`_StoreWriter`) that writes the spool file and feeds
the store's multipart upload, a part (PART_SIZE) at a time. The hand-over is
bounded (a part and a little more per file), so a fast client waits for a slow store instead
of filling the API's memory.

Bounds, checked as the bytes arrive, each refusal naming its field: only the form's own fields,
each at most once; `spec` up to max_spec_bytes; each file up to max_upload_bytes; a part's
headers as python-multipart bounds them (8, of 4 KiB each).

An archive field (DIRECT_FIELDS) may instead be a text field holding the id of a direct upload
(api/routes/uploads.py): the file is then already in the store, and `fetch_upload` spools it for
the checks like a file that arrived in the form.
"""

import asyncio
import concurrent.futures
import re
import tempfile
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, BinaryIO

from fastapi import Request
from minio.error import S3Error
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from api.validation import InputError
from models_store import ModelStore

# The form of POST /v1/jobs: its text field and its files, as the OpenAPI schema describes them.
SPEC_FIELD = "spec"
SPEC_DESCRIPTION = 'JSON job spec, e.g. {"task": "audio_classification", "model_name": "keywords"}'
FILE_FIELDS = {
    "dataset": "CSV manifest: audio,label[,split]",
    "audio": "zip or tar(.gz) of the audio files the CSV names, or the id of a direct upload of it (POST /v1/uploads)",
    "model": "optional base model (file or archive)",
    "heldout": "with spec.promote: CSV of the held-out set (audio,label) both versions are scored on",
    "heldout_audio": "with spec.promote: archive of the clips the heldout CSV names (or a direct upload's id)",
}
DIRECT_FIELDS = ("audio", "heldout_audio")  # the big parts of a submission; a CSV is small, a model's kind is judged as it arrives
UPLOAD_ID = re.compile(r"[0-9a-f]{32}")
REQUIRED = (SPEC_FIELD, "dataset")
# Parts of the store's multipart upload: the SDK holds up to four (one read, three sending) and
# the hand-over one more, so a file in flight costs this process about 40 MiB.
PART_SIZE = 8 * 1024 * 1024
HEAD_BYTES = 512  # what a file's stored name is chosen from (its archive kind: jobs/archive.py sniffs this much)


def openapi_request_body() -> dict:
    """The form, for the OpenAPI schema (the route reads the body itself, so FastAPI cannot infer it)."""
    properties = {SPEC_FIELD: {"type": "string", "description": SPEC_DESCRIPTION}}
    properties |= {name: {"type": "string", "format": "binary", "description": text} for name, text in FILE_FIELDS.items()}
    schema = {"type": "object", "properties": properties, "required": list(REQUIRED)}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


@dataclass
class Upload:
    """One file of the form: stored under `key`, and spooled to disk (`file`, at its start) for
    the checks (api/submissions.py)."""

    filename: str
    file: BinaryIO
    size: int
    key: str
    etag: str | None = None  # a direct upload's: the content the checks read, the one the job must train on


@dataclass
class Form:
    spec: Any  # what `parse_spec` made of the spec field's text
    files: dict[str, Upload] = field(default_factory=dict)
    uploads: dict[str, str] = field(default_factory=dict)  # field -> the id of the direct upload it names


def fetch_upload(store: ModelStore, tenant: str, field: str, upload_id: str, max_bytes: int) -> Upload:
    """A direct upload of the caller's tenant, spooled to disk for the checks (another tenant's id
    is not found: the prefix is the caller's). Its object stays where it is: the job names it."""
    found = store.find_upload(tenant, upload_id)
    if found is None:
        raise InputError(field, f"no upload {upload_id!r} has arrived: POST /v1/uploads, then send the file with its form")
    key, size, etag = found
    filename = key.rsplit("/", 1)[-1]
    if size > max_bytes:
        raise InputError(field, f"is {size} bytes; the limit is {max_bytes}", file=filename, status=413)
    spool = tempfile.TemporaryFile()
    try:
        received = 0
        for chunk in store.stream(key, chunk_size=PART_SIZE, etag=etag):  # the content listed, or an error
            received += len(chunk)
            if received > size:
                raise InputError(field, f"is over the {size} bytes it was listed with", file=filename, status=409)
            spool.write(chunk)
        spool.seek(0)
    except S3Error as err:
        spool.close()
        if err.code == "PreconditionFailed":
            raise InputError(field, "was replaced while it was read; submit again", file=filename, status=409) from None
        raise
    except BaseException:
        spool.close()
        raise
    return Upload(filename, spool, received, key, etag)


class _StoreWriter(threading.Thread):
    """One file of the form: the bytes the event loop hands over (`write`) are written to a
    spool file and sent to the store as one object by this thread. The object's key is
    `key_for(head)` of the file's first HEAD_BYTES."""

    def __init__(self, store: ModelStore, key_for: Callable[[bytes], str], content_type: str):
        super().__init__(name="upload-to-store", daemon=True)
        self.store, self.key_for, self.content_type = store, key_for, content_type
        self.capacity = PART_SIZE + 1024 * 1024  # a part being sent, and the next one arriving
        self.spool = tempfile.TemporaryFile()
        self.size, self.key = 0, None
        self.done: concurrent.futures.Future = concurrent.futures.Future()
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._wanted = 0  # what the thread waits for: woken only when that much is there
        self._ended = self._aborted = False
        self._room: concurrent.futures.Future | None = None
        self._lock = threading.Condition()

    # -- the event loop's side
    async def write(self, data: bytes) -> None:
        while True:
            with self._lock:
                if self.done.done():  # the store failed (or this was aborted): say why
                    self.done.result()
                    raise RuntimeError("upload ended early")
                if self._buffered < self.capacity:
                    self._chunks.append(data)
                    self._buffered += len(data)
                    if self._buffered >= self._wanted:
                        self._lock.notify()
                    return
                room = self._room = concurrent.futures.Future()
            await asyncio.wrap_future(room)

    async def finish(self) -> None:
        """The file is whole: wait until its object is stored (the store's error is raised here)."""
        with self._lock:
            self._ended = True
            self._lock.notify()
        await asyncio.wrap_future(self.done)

    async def abort(self) -> None:
        """Stop the upload (the store drops a multipart upload begun) and wait for the thread,
        so no object appears after the caller deleted the job's inputs."""
        with self._lock:
            self._aborted = True
            self._lock.notify()
        try:
            await asyncio.wrap_future(self.done)
        except BaseException:
            pass
        self.spool.close()

    # -- this thread's side
    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes, blocking until that many arrived or the file ended (the store's
        SDK asks for a whole part; one join, not a bytes += per chunk)."""
        size = min(size, self.capacity) if size >= 0 else self.capacity  # never more than can arrive
        with self._lock:
            self._wanted = size
            while self._buffered < size and not self._ended and not self._aborted:
                self._lock.wait()
            if self._aborted:
                raise _Aborted()
            taken, wanted = [], size
            while self._chunks and wanted > 0:
                chunk = self._chunks.popleft()
                if len(chunk) > wanted:
                    chunk, rest = chunk[:wanted], chunk[wanted:]
                    self._chunks.appendleft(rest)
                taken.append(chunk)
                wanted -= len(chunk)
            self._buffered -= size - wanted
            if self._buffered < self.capacity:
                self._make_room()
        data = b"".join(taken)
        self.spool.write(data)
        self.size += len(data)
        return data

    def run(self) -> None:
        try:
            head = self.read(HEAD_BYTES)
            self.key = self.key_for(head)
            self.store.put_stream(self.key, _Prefixed(head, self), -1, self.content_type, part_size=PART_SIZE)
            self.spool.flush()
            self.spool.seek(0)
            self.done.set_result(None)
        except BaseException as err:
            self.done.set_exception(err)
        finally:
            with self._lock:
                self._make_room()

    def _make_room(self) -> None:
        """Wake the event loop's `write` waiting for room (called with the lock held)."""
        if self._room is not None and not self._room.done():  # done: that wait was cancelled
            self._room.set_result(None)
        self._room = None


class _Aborted(Exception):
    pass


class _Prefixed:
    """A file's first bytes (already read, to choose its key), then the rest."""

    def __init__(self, head: bytes, rest: _StoreWriter):
        self.head, self.rest = head, rest

    def read(self, size: int = -1) -> bytes:
        if self.head:
            head, self.head = self.head, b""
            return head + self.rest.read(size - len(head)) if size > len(head) else head
        return self.rest.read(size)


def _text(raw: bytes, limit: int = 100) -> str:
    """A name the client sent, as text a log line or an error message cannot be fooled by."""
    return raw[:limit].decode("utf-8", "replace").encode("unicode_escape").decode("ascii")


class _Part:
    def __init__(self):
        self.headers: list[tuple[bytes, bytes]] = []
        self.partial_name, self.partial_value = bytearray(), bytearray()
        self.name = self.filename = None
        self.text = bytearray()
        self.writer: _StoreWriter | None = None
        self.size = 0


async def receive_form(request: Request, store: ModelStore, key_for: Callable[[str, str, bytes], str],
                       max_spec_bytes: int, max_upload_bytes: int, parse_spec: Callable[[str], Any] = str) -> Form:
    """The form of POST /v1/jobs, its files stored under `key_for(field, filename, head)` as they
    arrive. The spec's text is handed to `parse_spec` as soon as it is whole (before any later
    file is read), so a bad spec is refused at once; its result is the form's `spec`. On any
    error every upload begun is stopped (the caller then deletes the job's prefix)."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or not options.get(b"boundary"):
        raise InputError("body", "send the job as multipart/form-data (the spec field and the files)")

    events: list[tuple[str, object]] = []
    current = _Part()

    # A header's name or value may come in pieces (chunk borders). python-multipart bounds them:
    # at most 8 headers a part, each at most 4 KiB (an error past that, refused below).
    def on_header_field(data, start, end):
        current.partial_name += data[start:end]

    def on_header_value(data, start, end):
        current.partial_value += data[start:end]

    def on_header_end():
        current.headers.append((bytes(current.partial_name).lower(), bytes(current.partial_value)))
        current.partial_name, current.partial_value = bytearray(), bytearray()

    def on_part_begin():
        nonlocal current
        current = _Part()

    def on_headers_finished():
        events.append(("begin", current))

    def on_part_data(data, start, end):
        # No copy of the request's immutable chunks: they are joined once, into a part.
        events.append(("data", (current, memoryview(data)[start:end] if isinstance(data, bytes) else bytes(data[start:end]))))

    def on_part_end():
        events.append(("end", current))

    parser = MultipartParser(options[b"boundary"], {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data, "on_part_end": on_part_end,
    })
    form = Form(spec=None)
    seen: set[str] = set()  # fields begun ...
    finished: set[str] = set()  # ... and ended
    writers: list[_StoreWriter] = []
    try:
        async for chunk in request.stream():
            try:
                parser.write(chunk)
            except FormParserError as err:
                raise InputError("body", f"not valid multipart/form-data ({err})") from None
            for kind, value in events:
                if kind == "begin":
                    _begin(value, seen, store, key_for, writers)
                elif kind == "data":
                    part, data = value
                    part.size += len(data)
                    if part.writer is not None:
                        if part.size > max_upload_bytes:
                            raise InputError(part.name, f"is over {max_upload_bytes} bytes; the limit is {max_upload_bytes}", file=part.filename, status=413)
                        await part.writer.write(data)
                    else:
                        if part.name != SPEC_FIELD and part.size > 64:
                            raise InputError(part.name, "must be a file, or the id of a direct upload (32 hex digits)")
                        if part.size > max_spec_bytes:
                            raise InputError(SPEC_FIELD, f"the spec is over the limit of {max_spec_bytes} bytes", status=413)
                        part.text += data
                else:  # end
                    part = value
                    finished.add(part.name)
                    if part.writer is not None:
                        await part.writer.finish()
                        w = part.writer
                        form.files[part.name] = Upload(part.filename, w.spool, w.size, w.key)
                    elif part.name != SPEC_FIELD:  # an archive field naming a direct upload
                        upload_id = bytes(part.text).strip().decode("ascii", "replace")
                        if not UPLOAD_ID.fullmatch(upload_id):
                            raise InputError(part.name, "must be a file, or the id of a direct upload (32 hex digits)")
                        form.uploads[part.name] = upload_id
                    else:
                        try:
                            text = part.text.decode("utf-8")
                        except UnicodeDecodeError as err:
                            raise InputError(SPEC_FIELD, f"is not UTF-8 text (byte {err.start} is invalid)") from None
                        form.spec = parse_spec(text)
            events.clear()
        try:
            parser.finalize()
        except FormParserError as err:
            raise InputError("body", f"not valid multipart/form-data ({err})") from None
        if finished != seen:
            raise InputError("body", "the request body ended inside a part")
        for name in REQUIRED:
            if name not in seen:
                raise InputError(name, "Field required")
        return form
    except BaseException:
        await asyncio.gather(*(w.abort() for w in writers))
        raise


def _begin(part: _Part, seen: set[str], store: ModelStore, key_for, writers: list[_StoreWriter]) -> None:
    disposition = next((value for name, value in part.headers if name == b"content-disposition"), b"")
    _, options = parse_options_header(disposition)
    raw_name = options.get(b"name")
    if raw_name is None:
        raise InputError("body", "a part has no name (Content-Disposition: form-data; name=...)")
    name = raw_name.decode("utf-8", "replace")
    if name != SPEC_FIELD and name not in FILE_FIELDS:
        raise InputError(_text(raw_name), f"is not a field of this form; the fields are {[SPEC_FIELD, *FILE_FIELDS]}")
    if name in seen:
        raise InputError(name, "is sent twice; send each field once")
    seen.add(name)
    part.name = name
    if name == SPEC_FIELD:  # a text field (or a spec.json file: read the same way)
        return
    filename = options.get(b"filename")
    if filename is None:
        if name in DIRECT_FIELDS:  # the id of a direct upload, read as text
            return
        raise InputError(name, "must be a file (a part with a filename)")
    part.filename = filename.decode("utf-8", "replace")[:255] or "upload"
    content_type = "text/csv" if name in ("dataset", "heldout") else "application/octet-stream"
    part.writer = _StoreWriter(store, partial(key_for, name, part.filename), content_type)
    writers.append(part.writer)
    part.writer.start()
