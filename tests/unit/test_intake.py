"""api/intake.py on its own: a form read in chunks of any size (a header split between chunks, a
file larger than a store part) gives back each file whole, spooled and stored as the same
bytes, under the key its first bytes chose. The store here is a dict: the real one is in
tests/integration/test_hostile_requests.py and test_bad_input.py."""

import asyncio
import os

import pytest

from api import intake
from api.validation import InputError


class DictStore:
    def __init__(self):
        self.objects: dict[str, bytes] = {}

    def put_stream(self, key, stream, length, content_type, part_size=0):
        parts = []
        while data := stream.read(part_size + 1):  # the way the SDK asks: a part (and one byte) at a time
            parts.append(data)
        self.objects[key] = b"".join(parts)


class Request:
    def __init__(self, body: bytes, chunk: int, boundary: str = "xYz"):
        self.body, self.chunk = body, chunk
        self.headers = {"content-type": f"multipart/form-data; boundary={boundary}"}

    async def stream(self):
        for start in range(0, len(self.body), self.chunk):
            yield self.body[start:start + self.chunk]


def body(*parts: tuple[str, str | None, bytes]) -> bytes:
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--xYz\r\nContent-Disposition: {disposition}\r\nContent-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
    return out + b"--xYz--\r\n"


def key_for(field: str, filename: str, head: bytes) -> str:
    return f"{field}/{filename}/{'zip' if head.startswith(b'PK') else 'other'}"


def receive(request, store, **kw):
    return asyncio.run(intake.receive_form(request, store, key_for, max_spec_bytes=1000, max_upload_bytes=64 * 1024**2, **kw))


@pytest.mark.parametrize("chunk, size", [(7, 100_000), (65536, intake.PART_SIZE * 2 + 12345), (1 << 20, intake.PART_SIZE * 2 + 12345)])
def test_every_file_comes_back_whole_in_chunks_of_any_size(chunk, size):
    archive = b"PK\x03\x04" + os.urandom(size)  # up to three store parts
    store = DictStore()
    form = receive(Request(body(("spec", None, b'{"task": "x"}'), ("dataset", "d.csv", b"audio,label\n"), ("audio", "a.zip", archive)), chunk), store)
    assert form.spec == '{"task": "x"}'
    audio = form.files["audio"]
    assert (audio.key, audio.size, audio.filename) == ("audio/a.zip/zip", len(archive), "a.zip")
    assert audio.file.read() == archive == store.objects["audio/a.zip/zip"]
    assert form.files["dataset"].file.read() == b"audio,label\n" == store.objects["dataset/d.csv/other"]


def test_the_spec_is_handed_over_before_the_files_are_read():
    seen = []

    def on_spec(text):
        seen.append(text)
        raise InputError("spec", "refused")

    store = DictStore()
    with pytest.raises(InputError):
        receive(Request(body(("spec", None, b"{}"), ("dataset", "d.csv", b"x" * 100_000)), 512), store, parse_spec=on_spec)
    assert seen == ["{}"] and store.objects == {}


def test_a_spec_that_is_not_utf8_is_refused():
    with pytest.raises(InputError) as refused:
        receive(Request(body(("spec", None, b'{"task": "caf\xe9"}'), ("dataset", "d.csv", b"a")), 64), DictStore())
    assert refused.value.field == "spec" and "UTF-8" in refused.value.message


def test_a_file_over_the_limit_is_refused_as_it_arrives():
    store = DictStore()
    request = Request(body(("spec", None, b"{}"), ("dataset", "d.csv", b"x" * 3000)), 256)
    with pytest.raises(InputError) as refused:
        asyncio.run(intake.receive_form(request, store, key_for, max_spec_bytes=1000, max_upload_bytes=2048))
    assert (refused.value.field, refused.value.status, refused.value.file) == ("dataset", 413, "d.csv")
    assert store.objects == {}  # the upload was stopped before its only part was sent


def test_the_schema_lists_the_form():
    schema = intake.openapi_request_body()["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(schema["properties"]) == {"spec", *intake.FILE_FIELDS} and schema["required"] == ["spec", "dataset"]


def test_keep_is_checked_at_the_door():
    """`keep` (which weights a trainer ships) is one of two words; anything else is refused naming it."""
    from api.submissions import parse_spec

    spec = parse_spec('{"task": "audio_classification", "model_name": "kws", "hyperparameters": {"keep": "last"}}')
    assert spec.hyperparameters.for_trainer() == {"keep": "last"}
    with pytest.raises(InputError) as refused:
        parse_spec('{"task": "audio_classification", "model_name": "kws", "hyperparameters": {"keep": "average"}}')
    assert refused.value.field == "spec.hyperparameters.keep", refused.value
