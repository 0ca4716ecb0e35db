"""Champion / challenger on the real service: a job that asks to be promoted moves the alias only
if its new version scores higher than the alias's holder on the user's held-out set (voices never
in training), both scored by the same code; both scores are kept in the new version's lineage."""

import json

import pytest

from demo.spoken_words import zip_clips
from tests.conftest import submit, wait_for

pytestmark = pytest.mark.e2e

NAME = "promo-keywords"


def train(api, keyword_data, epochs: int, promote: dict | None = None, heldout=None) -> dict:
    spec = {"task": "audio_classification", "model_name": NAME,
            "hyperparameters": {"epochs": epochs, "patience": epochs, "batch_size": 16, "seed": 3}}
    if promote is None:
        response = submit(api, spec, keyword_data["csv"], keyword_data["zip"])
    else:
        files = {
            "dataset": ("words.csv", keyword_data["csv"].read_bytes(), "text/csv"),
            "audio": ("clips.zip", keyword_data["zip"].read_bytes(), "application/zip"),
            "heldout": ("heldout.csv", heldout[0].read_bytes(), "text/csv"),
            "heldout_audio": ("heldout.zip", heldout[1].read_bytes(), "application/zip"),
        }
        response = api.post("/v1/jobs", data={"spec": json.dumps({**spec, "promote": promote})}, files=files)
    assert response.status_code == 202, response.text
    job = wait_for(api, response.json()["id"], timeout=900)
    assert job["state"] == "succeeded", job["error"]
    return job


@pytest.fixture(scope="module")
def heldout(keyword_data, tmp_path_factory):
    csv = keyword_data["heldout_csv"]
    return csv, zip_clips(keyword_data["heldout_dir"], csv, tmp_path_factory.mktemp("heldout") / "heldout.zip")


def version(api, number: int) -> dict:
    return api.get(f"/v1/models/{NAME}/versions/{number}").raise_for_status().json()


def aliases(api) -> dict:
    return next(m for m in api.get("/v1/models").json() if m["name"] == NAME)["aliases"]


def test_the_alias_moves_only_to_a_version_that_scores_higher(api, keyword_data, heldout):
    weak = train(api, keyword_data, epochs=1)
    api.put(f"/v1/models/{NAME}/aliases/production", json={"version": weak["model_version"]}).raise_for_status()

    promote = {"alias": "production", "metric": "accuracy"}
    strong = train(api, keyword_data, epochs=14, promote=promote, heldout=heldout)
    decision = version(api, strong["model_version"])["promotion"]
    assert decision["promoted"] is True, decision
    assert decision["champion_version"] == weak["model_version"]
    assert decision["challenger_score"] > decision["champion_score"]
    assert aliases(api)["production"] == strong["model_version"]

    # A weaker challenger: a version all the same, but production stays where it is.
    weaker = train(api, keyword_data, epochs=1, promote=promote, heldout=heldout)
    decision = version(api, weaker["model_version"])["promotion"]
    assert decision["promoted"] is False and decision["champion_version"] == strong["model_version"], decision
    assert decision["challenger_score"] <= decision["champion_score"]
    assert aliases(api)["production"] == strong["model_version"]
    assert aliases(api)["latest"] == weaker["model_version"]


def test_a_promotion_needs_its_held_out_set(api, keyword_data):
    spec = {"task": "audio_classification", "model_name": NAME, "promote": {"alias": "production", "metric": "macro_f1"}}
    response = submit(api, spec, keyword_data["csv"], keyword_data["zip"])
    assert response.status_code == 422 and response.json()["detail"]["field"] == "heldout", response.text
    spec["promote"]["alias"] = "latest"
    response = submit(api, spec, keyword_data["csv"], keyword_data["zip"])
    assert response.status_code == 422 and response.json()["detail"]["field"] == "spec.promote.alias", response.text
    response = api.post("/v1/jobs", data={"spec": json.dumps({**spec, "promote": None})}, files={
        "dataset": ("d.csv", keyword_data["csv"].read_bytes()), "audio": ("a.zip", keyword_data["zip"].read_bytes()),
        "heldout": ("h.csv", b"audio,label\n")})
    assert response.status_code == 422 and response.json()["detail"]["field"] == "heldout", response.text
