"""The dashboard at /ui/, in a real headless Chromium (Debian's, driven by playwright), on the real
service: what a person sees on the jobs, job, models, version-comparison and alias pages, with a
job trained, one followed live and cancelled, and a promotion. Screenshots of each page are kept
under the test's temporary folder (RETRAIN_UI_SCREENSHOTS to put them elsewhere)."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from demo.spoken_words import zip_clips
from tests.conftest import submit, wait_for

pytestmark = pytest.mark.e2e

SPEC = {"task": "audio_classification", "model_name": "ui-keywords", "hyperparameters": {"epochs": 3, "batch_size": 16, "seed": 0}}


@pytest.fixture(scope="module")
def trained(api, keyword_data, tmp_path_factory):
    """Two versions: v1 from scratch; v2 continued from v1, asking for `staging` (champion /
    challenger on the held-out voices; nothing holds staging yet, so it takes it)."""
    first = wait_for(api, submit(api, SPEC, keyword_data["csv"], keyword_data["zip"]).json()["id"])
    assert first["state"] == "succeeded", first["error"]
    spec = {**SPEC, "base": {"model": "ui-keywords", "version": first["model_version"]},
            "promote": {"alias": "staging", "metric": "accuracy"}}
    heldout_zip = zip_clips(keyword_data["heldout_dir"], keyword_data["heldout_csv"], tmp_path_factory.mktemp("ui") / "heldout.zip")
    response = api.post("/v1/jobs", data={"spec": json.dumps(spec)}, files={
        "dataset": ("words.csv", keyword_data["csv"].read_bytes()), "audio": ("clips.zip", keyword_data["zip"].read_bytes()),
        "heldout": ("heldout.csv", keyword_data["heldout_csv"].read_bytes()), "heldout_audio": ("heldout.zip", heldout_zip.read_bytes())})
    assert response.status_code == 202, response.text
    second = wait_for(api, response.json()["id"])
    assert second["state"] == "succeeded", second["error"]
    return first, second


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    assert executable, "Debian's chromium is installed by deploy/local/install.sh"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, service):
    """A page signed in with the local stack's admin key (as after the sign-in form)."""
    context = browser.new_context(base_url=service.api_url, viewport={"width": 1280, "height": 900})
    context.add_init_script(f"sessionStorage.setItem('retrain-key', {json.dumps(service.admin_key())})")
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("RETRAIN_UI_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_the_dashboard_asks_for_a_key_and_refuses_a_wrong_one(browser, service, trained, shots):
    context = browser.new_context(base_url=service.api_url)
    page = context.new_page()
    page.goto("/ui/")
    page.get_by_role("heading", name="Sign in").wait_for()
    page.fill("input[aria-label='API key']", "rtk_0000000000000000_" + "x" * 43)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_role("alert").filter(has_text="refused").wait_for()
    page.screenshot(path=shots / "sign-in.png")
    page.fill("input[aria-label='API key']", service.admin_key())
    page.get_by_role("button", name="Sign in").click()
    page.locator(f'#jobs tr[data-job="{trained[1]["id"]}"]').wait_for()
    context.close()


def test_jobs_page_lists_jobs_newest_first_and_filters_by_state(page, trained, shots):
    first, second = trained
    page.goto("/ui/")
    rows = page.locator("#jobs tbody tr")
    rows.first.wait_for()
    ids = [r.get_attribute("data-job") for r in rows.all()]
    assert ids.index(second["id"]) < ids.index(first["id"])  # the newest first
    assert page.locator(f'#jobs a:text-is("{second["id"]}")').is_visible()  # each row shows its id
    page.select_option("select[aria-label=state]", "succeeded")
    page.wait_for_url(re.compile(r"state=succeeded"))
    # The filtered list is rendered (not the moment between clearing the old one and drawing the new:
    # an empty table holds only succeeded rows too), and it holds the succeeded job.
    page.wait_for_function("() => { const s = [...document.querySelectorAll('#jobs tbody tr [data-state]')];"
                           " return s.length > 0 && s.every(e => e.dataset.state === 'succeeded'); }")
    page.locator(f'#jobs tr[data-job="{second["id"]}"]').wait_for()
    page.screenshot(path=shots / "jobs.png", full_page=True)


def test_a_finished_job_shows_curves_metrics_confusion_matrix_and_log(page, trained, keyword_data, shots):
    _, job = trained
    page.goto(f"/ui/#/jobs/{job['id']}")
    page.locator("h1 [data-state=succeeded]").wait_for()
    assert job["id"] in page.locator("h1").inner_text()
    assert "null" not in page.locator("main .cards").first.inner_text()  # no placeholder leaks into what a person reads
    charts = page.locator("#curves [data-metric]")
    charts.first.wait_for()
    assert charts.count() >= 2 and page.locator("#curves svg polyline").count() == charts.count()
    accuracy = page.locator('table.metrics tr[data-metric="accuracy"] td').inner_text()
    assert float(accuracy) == pytest.approx(job["metrics"]["accuracy"], abs=1e-3)
    matrix = page.locator("table.confusion")
    words = sorted({row.split(",")[1] for row in keyword_data["csv"].read_text().splitlines()[1:]})
    assert sorted(matrix.locator("tbody th").all_inner_texts()) == words  # one row per word, by name
    assert sum(int(n) for n in matrix.locator("tbody td").all_inner_texts()) == job["metrics"]["eval_size"]
    page.locator("#log").wait_for()
    page.wait_for_function("() => document.getElementById('log').textContent.includes('retrain-progress')")
    assert page.get_by_role("link", name=re.compile(r"ui-keywords v\d+")).is_visible()
    page.screenshot(path=shots / "job.png", full_page=True)


def test_a_running_job_is_followed_live_and_cancelled_from_its_page(page, api, keyword_data, shots):
    spec = {**SPEC, "model_name": "ui-live", "hyperparameters": {"epochs": 40, "patience": 40, "batch_size": 16}}
    job_id = submit(api, spec, keyword_data["csv"], keyword_data["zip"]).json()["id"]
    page.goto(f"/ui/#/jobs/{job_id}")
    # Epochs arrive over the event stream while the page is open: the curve grows by itself.
    page.wait_for_function("() => document.querySelectorAll('#curves svg circle').length >= 4", timeout=300_000)
    progress = page.locator("#progress").inner_text()
    page.wait_for_function(f"() => document.getElementById('progress').innerText !== {progress!r}", timeout=120_000)
    page.screenshot(path=shots / "job-live.png", full_page=True)
    page.get_by_role("button", name="Cancel").click()
    page.locator("h1 [data-state=cancelled]").wait_for(timeout=60_000)
    assert api.get(f"/v1/jobs/{job_id}").json()["state"] == "cancelled"


def test_models_versions_lineage_comparison_and_promotion(page, api, trained, shots):
    first, second = trained
    v1, v2 = first["model_version"], second["model_version"]
    page.goto("/ui/#/models")
    page.locator('#models tr[data-model="ui-keywords"] a').click()
    versions = page.locator("#versions tbody tr")
    versions.first.wait_for()
    assert page.locator(f'#versions tr[data-version="{v2}"]').inner_text().count(f"v{v1}") >= 1  # trained from v1
    assert "from scratch" in page.locator(f'#versions tr[data-version="{v1}"]').inner_text()
    # The champion / challenger decision, with its score on the held-out set, in the lineage.
    decision = page.locator(f'#versions tr[data-version="{v2}"] td.promotion').inner_text()
    assert decision.startswith("took staging: accuracy ") and "had no version" in decision, decision
    assert "staging" in page.locator(f'#versions tr[data-version="{v2}"]').inner_text()
    page.screenshot(path=shots / "model.png", full_page=True)

    page.check(f"input[aria-label='select version {v1}']")
    page.check(f"input[aria-label='select version {v2}']")
    page.get_by_role("button", name="Compare the two selected").click()
    page.locator("#comparison").wait_for()
    row = page.locator('#comparison tr[data-metric="accuracy"] td')
    assert [float(t) for t in row.all_inner_texts()] == pytest.approx([first["metrics"]["accuracy"], second["metrics"]["accuracy"]], abs=1e-3)
    assert page.locator("table.confusion").count() == 2
    page.screenshot(path=shots / "compare.png", full_page=True)

    page.goto("/ui/#/models/ui-keywords")
    page.locator("#versions").wait_for()
    page.fill("input[aria-label=alias]", "production")
    page.select_option("select[aria-label='version to promote']", str(v2))
    page.get_by_role("button", name="Promote").click()
    page.wait_for_function(f"() => document.getElementById('aliases').textContent.includes('production → v{v2}')")
    assert next(m for m in api.get("/v1/models").json() if m["name"] == "ui-keywords")["aliases"]["production"] == v2
    page.screenshot(path=shots / "promoted.png", full_page=True)
