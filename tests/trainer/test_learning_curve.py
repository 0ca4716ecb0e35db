"""The CNN trainer's learning curve (`learning_curve=true`), run as the process runner runs it:
`train` in local mode in the trainer's environment, on spoken words whose test split is voices
never heard in training. Only the outputs are checked, as a user would read them: metrics.json,
the PNG, the model card, the progress lines. The curve fitting itself is also checked on points
from a known law (in the trainer environment, which has scipy).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.trainer.test_audio_trainer import ROOT, TRAINER_PYTHON, Workspace, progress_lines, sw

WORDS = ["yes", "no", "up", "down"]
HPS = {"epochs": "6", "batch_size": "16", "learning_rate": "0.003", "seed": "0", "patience": "6",
       "learning_curve": "true", "target_metric": "1.0"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def spoken_small(tmp_path_factory) -> Path:
    """4 words x 8 training voices x 2 repeats (train/validation left to the trainer) + 5 held-out voices as test."""
    out = tmp_path_factory.mktemp("spoken_lc")
    sw.make_dataset(out, WORDS, sw.TRAIN_VOICES, repeats=2, seed=2)
    sw.make_dataset(out, WORDS, sw.HELDOUT_VOICES, repeats=1, seed=2, split="test", append=True)
    return out


@pytest.fixture(scope="module")
def curve_job(spoken_small, tmp_path_factory):
    ws = Workspace(tmp_path_factory.mktemp("lc") / "ws", spoken_small, HPS)
    result = ws.run()
    assert result.returncode == 0, f"trainer failed:\n{result.stderr[-4000:]}"
    return ws, result


def test_three_points_with_increasing_sizes_on_the_same_test_split(curve_job):
    ws, _ = curve_job
    m = ws.metrics()
    lc = m["learning_curve"]
    points = lc["points"]
    assert [p["fraction"] for p in points] == [0.25, 0.5, 1.0]
    sizes = [p["train_size"] for p in points]
    assert sizes == sorted(set(sizes)) and sizes[-1] == m["train_size"]
    assert sizes[0] == pytest.approx(0.25 * m["train_size"], abs=len(WORDS))  # stratified: rounding per label
    assert lc["metric"] == "macro_f1" and lc["eval_split"] == "test" and lc["eval_size"] == m["test_size"] == 4 * 5
    assert points[-1]["metric"] == m["macro_f1"]  # the full point is the main run
    for p in points:
        assert 0.0 <= p["metric"] <= 1.0 and p["metric"] == p["macro_f1"]
        assert 1 <= p["best_epoch"] <= p["epochs_run"] <= 6


def test_predictions_are_metrics_and_the_fit_is_stated(curve_job):
    ws, _ = curve_job
    lc = ws.metrics()["learning_curve"]
    assert [(p["factor"], p["train_size"]) for p in lc["predictions"]] == [(2, 2 * lc["fit"]["n_full"]), (4, 4 * lc["fit"]["n_full"])]
    for value in (lc["predicted_at_2x"], lc["predicted_at_4x"]):
        assert isinstance(value, float) and 0.0 <= value <= 1.0
    assert lc["predicted_at_4x"] >= lc["predicted_at_2x"] - 1e-9  # the curve never falls with more data
    fit = lc["fit"]
    assert fit["method"] in ("inverse_power_law", "log_linear_fallback")
    if fit["method"] == "inverse_power_law":
        assert 0.0 <= fit["a"] <= 1.0 and fit["b"] >= 0 and fit["c"] > 0 and lc["asymptote"] == fit["a"]
    else:
        assert fit["fallback_reason"] and any("fallback" in n or "failed" in n for n in lc["notes"])


def test_target_above_the_asymptote_gives_null_with_a_note(curve_job):
    ws, _ = curve_job
    lc = ws.metrics()["learning_curve"]
    assert lc["target_metric"] == 1.0
    if lc["fit"]["method"] == "inverse_power_law":  # a <= 1 by its bounds: a target of 1.0 is never below it
        assert lc["target_train_size"] is None
        assert "asymptote" in lc["target_note"]


def test_plot_is_a_png_in_the_model_and_output_dirs_and_the_card_mentions_it(curve_job):
    ws, _ = curve_job
    for d in (ws.model, ws.root / "output/data"):
        png = d / "learning_curve.png"
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000
    card = (ws.model / "model_card.md").read_text()
    assert "How much more data would help" in card and "learning_curve.png" in card and "2x the data" in card


def test_progress_flows_through_the_sub_runs_labelled(curve_job):
    ws, result = curve_job
    lines = progress_lines(result.stdout)
    main = [p for p in lines if "phase" not in p]
    subs = [p for p in lines if "phase" in p]
    assert len(main) == ws.metrics()["epochs_run"]
    phases = sorted({p["phase"] for p in subs})
    assert len(phases) == 2 and all(p.startswith("learning curve ") for p in phases)
    assert "[learning curve 25%" in result.stderr and "[learning curve 50%" in result.stderr


FIT_CHECK = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from trainer_core.learning_curve import fit_curve, predict, size_for
sizes = [100, 200, 400]
law = lambda n: 0.9 - 0.3 * (n / 400) ** -0.7
fit = fit_curve(sizes, [law(n) for n in sizes], 400)
out = {"fit": fit, "at_4x": predict(fit, 1600), "law_4x": law(1600),
       "reach": size_for(fit, 0.85), "above": size_for(fit, 0.95),
       "two_points": fit_curve([10, 40], [0.5, 0.7], 40)}
print(json.dumps(out))
"""


def test_fit_recovers_a_known_law_and_falls_back_honestly():
    proc = subprocess.run([str(TRAINER_PYTHON), "-c", FIT_CHECK, str(ROOT / "trainer_images" / "audio")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    fit = out["fit"]
    assert fit["method"] == "inverse_power_law"
    assert (fit["a"], fit["b"], fit["c"]) == pytest.approx((0.9, 0.3, 0.7), abs=1e-3)
    assert out["at_4x"] == pytest.approx(out["law_4x"], abs=1e-3)
    n, note = out["reach"]
    assert n == pytest.approx(400 * (0.05 / 0.3) ** (-1 / 0.7), rel=0.01) and note is None
    n, note = out["above"]
    assert n is None and "asymptote" in note
    fallback = out["two_points"]
    assert fallback["method"] == "log_linear_fallback" and "failed" in fallback["fallback_reason"]
