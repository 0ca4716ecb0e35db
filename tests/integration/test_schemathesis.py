"""schemathesis against the API's own OpenAPI spec: whatever it generates (valid and invalid
paths, queries, bodies, multipart uploads), no answer is a 5xx.

The API runs in a real uvicorn (in a thread of this process) on the real Kafka and MinIO of the
`stack` fixture, with a database, bucket and topics of its own; the number of examples per
operation is bounded so the run stays within a couple of minutes on two cores. Three real jobs
are submitted first, so listings and cursors have rows to page through."""


import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings as hypothesis_settings
from schemathesis.checks import not_a_server_error

from api.main import create_app
from tests.conftest import admin_headers, isolated, served_api, trainable_csv
from tests.integration.test_api_faults import make_zip, tone

pytestmark = pytest.mark.integration

EXAMPLES = 100  # per operation and phase (about a minute in all on two cores)


@pytest.fixture(scope="module")
def api(settings, tmp_path_factory):
    """(base URL, an admin key's headers): the fuzzer reaches every operation past the key check."""
    app_settings = isolated(settings, tmp_path_factory, "fuzz", max_upload_bytes=1024 * 1024)
    headers = admin_headers(app_settings)
    with served_api(app_settings) as base:
        # A real job in the database, so listings and their cursors have something to page through.
        files = {
            "dataset": ("dataset.csv", trainable_csv([("low.wav", "low"), ("high.wav", "high")]).encode(), "text/csv"),
            "audio": ("audio.zip", make_zip({"low.wav": tone(220), "high.wav": tone(880)}), "application/zip"),
        }
        spec = '{"task": "audio_classification", "model_name": "fuzz"}'
        for _ in range(3):
            assert httpx.post(f"{base}/v1/jobs", data={"spec": spec}, files=files, headers=headers, timeout=60).status_code == 202
        yield base, headers


# The spec is the app's own (it does not depend on the settings): taken at import, so pytest
# collects one test per operation. (schemathesis' lazy from_fixture needs pytest internals that
# pytest 9.2 no longer has.)
schema = schemathesis.openapi.from_dict(create_app().openapi())


@schema.parametrize()
@hypothesis_settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                     suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, api):
    base, headers = api
    case.call_and_validate(base_url=base, headers=headers, checks=[not_a_server_error], timeout=60)
