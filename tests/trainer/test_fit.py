"""The fit driver (trainer_core/fit.py) as the keyword CNN runs it: how long a run trains."""

from __future__ import annotations

import subprocess

from tests.trainer.test_audio_trainer import HPS, TRAINER_PYTHON, Workspace, progress_lines
from tests.trainer.test_contract import _tiny_data

SAME_WEIGHTS = """
import sys, torch
from safetensors.torch import load_file
checkpoint = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
weights = checkpoint[sys.argv[3]] or checkpoint["model"]  # best_model is empty when the last epoch was the best
shipped = load_file(sys.argv[2])
print(all(torch.equal(shipped[k], weights[k]) for k in shipped))
"""


def ships(ws: Workspace, which: str) -> bool:
    """Whether the model's weights are the last checkpoint's `which`: "model" (the final epoch's
    weights) or "best_model" (the best validation epoch's)."""
    checkpoint = next((ws.root / "checkpoints").glob("*.pt"))
    out = subprocess.run([str(TRAINER_PYTHON), "-c", SAME_WEIGHTS, str(checkpoint), str(ws.model / "model.safetensors"),
                          which], capture_output=True, text=True, check=True, timeout=120).stdout
    return out.strip() == "True"


def test_a_small_data_set_trains_for_min_steps_before_early_stopping_may_end_it(tmp_path):
    """A handful of clips makes one optimizer step per epoch: left to the default number of
    epochs and a short patience, the run used to stop after a few dozen steps, having learned
    nothing. Unless the user set `epochs`, the run is lengthened to min_steps, and early stopping
    waits for them; the model card says so."""
    hps = {"batch_size": "16", "learning_rate": "0.003", "seed": "0", "patience": "1", "min_steps": "150",
           "epochs": None, "keep": "best"}
    ws = Workspace(tmp_path / "ws", _tiny_data(tmp_path), {k: v for k, v in {**HPS, **hps}.items() if v is not None})
    result = ws.run()
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [p["step"] for p in progress_lines(result.stdout)]
    assert steps[-1] >= 150, steps  # patience 1 alone would have ended it within a few epochs
    metrics = ws.metrics()
    assert any("lengthened" in n and "min_steps=150" in n for n in metrics["notes"]), metrics["notes"]
    assert "min_steps=150" in (ws.model / "model_card.md").read_text()


def test_epochs_the_user_set_are_kept_and_the_card_says_what_they_cost(tmp_path):
    ws = Workspace(tmp_path / "ws", _tiny_data(tmp_path), {**HPS, "epochs": "2", "min_steps": "30"})
    result = ws.run()
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p["epoch"] for p in progress_lines(result.stdout)] == [1, 2]
    assert any("epochs=2 gives only" in n for n in ws.metrics()["notes"]), ws.metrics()["notes"]


def test_keep_last_runs_every_epoch_and_ships_the_final_weights(tmp_path):
    """The keyword CNN's default: no early stop, however impatient; the final weights are the model's
    (its validation split, spoken by the training speakers, saturates; its best epoch is noise)."""
    ws = Workspace(tmp_path / "ws", _tiny_data(tmp_path), {**HPS, "epochs": "8", "patience": "1", "min_steps": "0"})
    result = ws.run()
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p["epoch"] for p in progress_lines(result.stdout)] == list(range(1, 9))
    metrics = ws.metrics()
    assert metrics["kept_epoch"] == metrics["epochs_run"] == 8 and 1 <= metrics["best_epoch"] <= 8
    assert ships(ws, "model")
    if metrics["best_epoch"] != 8:
        assert not ships(ws, "best_model")
    card = (ws.model / "model_card.md").read_text()
    assert "the model holds the final weights, of epoch 8" in card or "weights of epoch 8, the final" in card


def test_keep_best_ships_the_best_validation_epoch(tmp_path):
    ws = Workspace(tmp_path / "ws", _tiny_data(tmp_path), {**HPS, "epochs": "8", "patience": "8", "keep": "best"})
    result = ws.run()
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = ws.metrics()
    assert metrics["kept_epoch"] == metrics["best_epoch"] and ships(ws, "best_model")
    val_loss = {p["epoch"]: p["metrics"]["val_loss"] for p in progress_lines(result.stdout)}
    assert val_loss[metrics["best_epoch"]] <= min(val_loss.values()) + 1e-4  # min_delta
    assert "best validation epoch" in (ws.model / "model_card.md").read_text()

