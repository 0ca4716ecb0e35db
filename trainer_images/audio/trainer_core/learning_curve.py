"""How much more data would help: a learning curve from the job's own data, for every trainer.

With `learning_curve=true` the job, after its main training, trains the same recipe again on
subsets of the training split (25% and 50% by default; `learning_curve_fractions`), stratified
by label where there are labels: the same seed, the same validation split for early stopping,
the same test split for the metric, the same epochs and patience, and the same starting point (a
fresh model, or the base model's weights when the job continues from one). With the full run
that gives points (n, metric).

The metric (`learning_curve_metric`, a score in [0, 1] where higher is better: macro_f1 or
accuracy for a classifier, word_accuracy = 1 - WER or char_accuracy = 1 - CER, clipped at 0, for
speech recognition) is fitted against the training-set size n with a saturating inverse power law,

    m(n) = a - b * (n / n_full) ** (-c),   0 <= a <= 1, b >= 0, 0.05 <= c <= 3

(`a` is the asymptote: the metric this recipe would reach with unlimited data of the same kind;
`b` is how far the full run is below it). From the fit come the predicted metric at 2x and 4x the
training data and, for a `target_metric`, the training-set size predicted to reach it (null, with
a note, when the asymptote is below the target). When the fit fails, a straight line in log(n)
(clipped to [0, 1]) is used instead and the result says so: it does not saturate and tends to be
optimistic. Three points make a rough extrapolation; the result states the evaluation set's
standard error so a reader can judge differences between points.
"""

from __future__ import annotations

import math
import random
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import TrainerError
from .manifest import Clip
from .progress import log, phase

FORMULA = "m(n) = a - b * (n / n_full)^(-c)"


def parse_fractions(text: str) -> list[float]:
    try:
        values = sorted({float(v) for v in str(text).split(",") if v.strip()})
    except ValueError:
        values = []
    if not values or any(not 0 < v < 1 for v in values):
        raise TrainerError(
            f"hyperparameter learning_curve_fractions={text!r}: expected fractions between 0 and 1 "
            "(exclusive), comma separated, like '0.25,0.5'."
        )
    return values


def stratified_subset(clips: list[Clip], fraction: float, seed: int) -> list[Clip]:
    """round(fraction * n) clips of every label (at least 2, or all when a label has fewer); clips
    without labels (speech recognition) are one group.

    Every label is shuffled once with the job's seed, and a subset takes a prefix of that order,
    so the 25% subset lies inside the 50% one: the points differ only in how much data they see.
    """
    by_label: dict[str, list[Clip]] = defaultdict(list)
    for c in clips:
        by_label[c.label].append(c)
    subset: list[Clip] = []
    for label in sorted(by_label):
        group = sorted(by_label[label], key=lambda c: (c.source, c.row))
        random.Random(f"{seed}:learning_curve:{label}").shuffle(group)
        subset += group[: min(len(group), max(2, round(fraction * len(group))))]
    order = {id(c): i for i, c in enumerate(clips)}
    return sorted(subset, key=lambda c: order[id(c)])  # keep the training split's order


def _power_law(x: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
    return a - b * np.power(x, -c)


def fit_curve(sizes: list[int], values: list[float], n_full: int) -> dict:
    """Fit the inverse power law; fall back to a line in log(n) when the fit fails."""
    x = np.asarray(sizes, dtype=float) / n_full
    y = np.asarray(values, dtype=float)
    try:
        from scipy.optimize import curve_fit

        if len(x) < 3:
            raise RuntimeError(f"{len(x)} points are too few for three parameters")
        top = float(y.max())
        p0 = (min(1.0, top + 0.02), max(1e-3, top - float(y.min())), 0.5)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # OptimizeWarning: no covariance with as many points as parameters
            params, _ = curve_fit(_power_law, x, y, p0=p0, bounds=([0.0, 0.0, 0.05], [1.0, np.inf, 3.0]), maxfev=20000)
        a, b, c = (float(p) for p in params)
        if not all(math.isfinite(p) for p in (a, b, c)):
            raise RuntimeError("non-finite parameters")
        rmse = float(np.sqrt(np.mean((_power_law(x, a, b, c) - y) ** 2)))
        return {"method": "inverse_power_law", "formula": FORMULA, "n_full": n_full,
                "a": a, "b": b, "c": c, "rmse": rmse, "asymptote": a}
    except (RuntimeError, ValueError, ImportError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    # Fallback: m = p + q * ln(n / n_full), q >= 0, clipped to [0, 1] when used.
    if len(x) >= 2 and np.ptp(np.log(x)) > 0:
        q, p = np.polyfit(np.log(x), y, 1)
        q = max(0.0, float(q))
        p = float(np.mean(y) - q * np.mean(np.log(x)))
    else:
        p, q = float(y.mean()), 0.0
    rmse = float(np.sqrt(np.mean((np.clip(p + q * np.log(x), 0, 1) - y) ** 2)))
    return {"method": "log_linear_fallback", "formula": "m(n) = clip(p + q * ln(n / n_full), 0, 1)", "n_full": n_full,
            "p": p, "q": q, "rmse": rmse, "asymptote": None if q > 0 else min(1.0, max(0.0, p)),
            "fallback_reason": f"the saturating fit failed ({reason})"}


def predict(fit: dict, n: float) -> float:
    x = n / fit["n_full"]
    if fit["method"] == "inverse_power_law":
        value = _power_law(np.asarray(x), fit["a"], fit["b"], fit["c"])
    else:
        value = fit["p"] + fit["q"] * math.log(x)
    return float(min(1.0, max(0.0, float(value))))


def size_for(fit: dict, target: float) -> tuple[int | None, str | None]:
    """The training-set size the curve predicts reaches `target`, or (None, why not)."""
    n_full = fit["n_full"]
    if fit["method"] == "inverse_power_law":
        a, b, c = fit["a"], fit["b"], fit["c"]
        if b <= 1e-12:
            if a >= target:
                return n_full, "the fitted curve is flat and already at or above the target"
            return None, (f"the fitted curve is flat at {a:.4f}, below the target {target}: by this curve more data of "
                          "the same kind does not reach it")
        if target >= a:
            return None, (f"the fitted asymptote a={a:.4f} is at or below the target {target}: by this curve more data of the "
                          "same kind does not reach it (a larger model, other features or cleaner labels might)")
        return int(math.ceil(n_full * ((a - target) / b) ** (-1.0 / c))), None
    p, q = fit["p"], fit["q"]
    if q <= 0:
        if p >= target:
            return n_full, "the fitted line is flat and already at or above the target"
        return None, f"the fitted line is flat at {p:.4f}, below the target {target}: no size reaches it by this fit"
    return int(math.ceil(n_full * math.exp((target - p) / q))), (
        "from the log-linear fallback, which does not saturate: likely optimistic")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fit, points, metric = result["fit"], result["points"], result["metric"]
    n_full = fit["n_full"]
    sizes = [p["train_size"] for p in points]
    largest = 4 * n_full
    target_n = result.get("target_train_size")
    if target_n and target_n > largest:
        largest = min(target_n * 1.2, 64 * n_full)
    grid = np.geomspace(min(sizes) * 0.8, largest * 1.1, 200)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(grid, [predict(fit, n) for n in grid], color="C0",
            label=("fit: " + fit["formula"]) if fit["method"] == "inverse_power_law" else "fallback fit (log-linear)")
    n_eval = result["eval_size"] or 1
    se = [math.sqrt(max(p["metric"] * (1 - p["metric"]), 0.0) / n_eval) for p in points]  # binomial, rough for F1
    ax.errorbar(sizes, [p["metric"] for p in points], yerr=se, fmt="o", color="C0",
                capsize=3, label=f"measured ({result['eval_split']} split, {result['eval_size']} clips)")
    for pred, colour in zip(result["predictions"], ("C1", "C2")):
        ax.plot([pred["train_size"]], [pred["metric"]], marker="D", color=colour, linestyle="none",
                label=f"{pred['factor']}x data: {pred['metric']:.3f} (predicted)")
        ax.axvline(pred["train_size"], color=colour, linestyle=":", alpha=0.6)
    if fit["method"] == "inverse_power_law":
        ax.axhline(fit["a"], color="grey", linestyle="--", alpha=0.6, label=f"asymptote {fit['a']:.3f}")
    if result.get("target_metric") is not None:
        ax.axhline(result["target_metric"], color="C3", linestyle="-.", alpha=0.7, label=f"target {result['target_metric']}")
        if target_n:
            ax.plot([target_n], [result["target_metric"]], marker="*", markersize=12, color="C3", linestyle="none",
                    label=f"target reached at n={target_n}")
    ax.set_xscale("log")
    ax.set(xlabel="training clips (log scale)", ylabel=metric, ylim=(max(0.0, min(p["metric"] for p in points) - 0.15), 1.02),
           title=f"Learning curve: {metric} vs training-set size")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_learning_curve(
    *,
    train_clips: list[Clip],
    full_point: dict,
    fractions: list[float],
    metric: str,
    target: float | None,
    seed: int,
    eval_split: str,
    eval_size: int,
    train_and_score: Callable[[list[Clip], str], dict],
    plot_path: Path,
    full_stopped_early: bool = True,
) -> dict:
    """Train on each fraction (via `train_and_score(clips, tag)` -> {metric, ..., epochs_run,
    best_epoch}), fit, predict, plot. `full_point` is the main run's scores."""
    n_full = len(train_clips)
    points = []
    notes: list[str] = []
    for fraction in fractions:
        subset = stratified_subset(train_clips, fraction, seed)
        if len(subset) >= n_full:
            notes.append(f"the {fraction:.0%} subset would hold every clip (at least 2 per label): skipped")
            continue
        tag = f"learning curve {fraction:.0%} ({len(subset)} clips)"
        started = time.monotonic()
        with phase(tag):
            log(f"training on {len(subset)} of {n_full} training clips, stratified by label (seed {seed})")
            scores = train_and_score(subset, f"lc{round(fraction * 100)}")
            log(f"{eval_split}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float)))
        points.append({"fraction": fraction, "train_size": len(subset), "metric": scores[metric],
                       **{k: v for k, v in scores.items() if isinstance(v, int | float)},
                       "seconds": round(time.monotonic() - started, 1)})
    reported = set().union(*(p.keys() for p in points)) - {"fraction", "train_size", "metric", "seconds"}
    points.append({"fraction": 1.0, "train_size": n_full, "metric": full_point[metric],
                   **{k: full_point[k] for k in sorted(reported) if k in full_point}})

    fit = fit_curve([p["train_size"] for p in points], [p["metric"] for p in points], n_full)
    if fit["method"] != "inverse_power_law":
        notes.append(fit["fallback_reason"] + "; predictions come from a straight line in log(n), clipped to [0, 1], "
                     "which does not saturate and is likely optimistic")
    values = [p["metric"] for p in points]
    if any(b < a - 1e-9 for a, b in zip(values, values[1:])):
        notes.append("the metric does not rise monotonically with the data: the differences are within the noise of "
                     "the evaluation set or training, so read the predictions as rough")
    if values[-1] >= 1.0 - 1e-9:
        notes.append(f"{metric} is already 1.0 on the {eval_split} split: this evaluation set cannot show further gains")
    if not full_stopped_early:
        notes.append("the full run ended at the epoch limit, not by early stopping, and every subset ran the same "
                     "epochs with fewer steps: the small points may be undertrained, which overstates the gain from "
                     "more data; more epochs give a fairer curve")
    predictions = [{"factor": k, "train_size": k * n_full, "metric": predict(fit, k * n_full)} for k in (2, 4)]
    m_full = values[-1]
    se = math.sqrt(max(m_full * (1 - m_full), 0.0) / eval_size) if eval_size else None
    notes.append(f"three-point extrapolations are rough; the {eval_split} metric's binomial standard error at the full "
                 f"size is about {se:.3f}" if se is not None else "no evaluation clips")

    if se is not None and fit["rmse"] > 2 * max(se, 0.01):
        notes.append(f"the curve misses the points by {fit['rmse']:.3f} RMS, more than twice the evaluation noise: "
                     "the points do not follow a saturating law well, so the predictions are uncertain")
    result = {
        "metric": metric,
        "eval_split": eval_split,
        "eval_size": eval_size,
        "points": points,
        "fit": fit,
        "asymptote": fit["asymptote"],
        "predictions": predictions,
        "predicted_at_2x": predictions[0]["metric"],
        "predicted_at_4x": predictions[1]["metric"],
        "target_metric": target,
        "target_train_size": None,
        "target_note": None,
        "eval_standard_error": se,
        "notes": notes,
        "plot": plot_path.name,
    }
    if target is not None:
        n_target, why = size_for(fit, target)
        result["target_train_size"], result["target_note"] = n_target, why
        if n_target is not None:
            result["target_data_factor"] = round(n_target / n_full, 3)
    plot(result, plot_path)
    a = fit["asymptote"]
    log(f"learning curve ({fit['method']}): {metric} " + ", ".join(f"n={p['train_size']}: {p['metric']:.4f}" for p in points)
        + (f"; asymptote {a:.4f}" if a is not None else "; no asymptote (fallback line)") + f"; predicted at 2x {result['predicted_at_2x']:.4f}, at 4x {result['predicted_at_4x']:.4f}"
        + (f"; target {target}: n={result['target_train_size']}" if target is not None else ""))
    return result


def card_section(lc: dict | None) -> list[str]:
    """The model card's "how much more data would help" section (learning_curve=true)."""
    if not lc:
        return []
    fit, metric = lc["fit"], lc["metric"]
    lines = [
        "## How much more data would help",
        "",
        f"The same recipe was also trained on subsets of the training split (stratified by label where there "
        f"are labels); {metric} on the "
        f"{lc['eval_split']} split ({lc['eval_size']} clips):",
        "",
        "| training clips | share | " + metric + " |",
        "|---:|---:|---:|",
        *[f"| {p['train_size']} | {p['fraction']:.0%} | {p['metric']:.4f} |" for p in lc["points"]],
        "",
    ]
    if fit["method"] == "inverse_power_law":
        lines.append(f"Fit `{fit['formula']}`: a={fit['a']:.4f} (asymptote), b={fit['b']:.4f}, c={fit['c']:.3f}, "
                     f"n_full={fit['n_full']}, RMSE {fit['rmse']:.4f}.")
    else:
        lines.append(f"Fallback fit `{fit['formula']}` (p={fit['p']:.4f}, q={fit['q']:.4f}): {fit['fallback_reason']}.")
    lines += ["", *[f"- predicted {metric} with {p['factor']}x the data ({p['train_size']} clips): {p['metric']:.4f}"
                    for p in lc["predictions"]]]
    if lc.get("target_metric") is not None:
        n = lc.get("target_train_size")
        lines.append(f"- target {metric} {lc['target_metric']}: "
                     + (f"about {n} training clips ({lc.get('target_data_factor')}x)" if n is not None else "not reached")
                     + (f" ({lc['target_note']})" if lc.get("target_note") else ""))
    lines += [*[f"- {n}" for n in lc.get("notes", [])], "", f"Plot: `{lc['plot']}`.", ""]
    return lines
