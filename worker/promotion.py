"""Champion / challenger: a job with `spec.promote` moves its alias to the new version only if
the new version beats the alias's current holder on the user's held-out set.

After the new version is published (it is a version whatever the decision), the worker runs the
audio image's scorer (job.json task `score`, trainer_images/audio/audio_trainer/score.py) in a
workspace of its own, through the same runner as training (the same sandbox), with three
channels: `heldout` (the uploaded CSV and the clips it names), `challenger` (the new model) and
`champion` (the alias holder's model.tar.gz, when there is one). Both are scored by that one code
path. Then:

- no holder: the new version takes the alias;
- the challenger's score is higher: the alias moves to it, by compare-and-swap on the alias
  (if the alias moved meanwhile, it is left where it is and the decision says so);
- otherwise the alias stays.

The decision (alias, metric, both scores, the holder, promoted or not and why) goes into the new
version's lineage (version.json `promotion`). A scoring failure never fails the job: its model
trained and was published; the decision records why no promotion happened.
"""

import logging
import shutil
import threading
from datetime import UTC, datetime

from jobs.archive import ArchiveLimits
from jobs.spec import JobMessage
from models_store import ModelStore, VersionInfo
from worker.events import BoundedLogFile
from worker.outputs import read_json_object
from worker.runners.base import Outcome as RunOutcome
from worker.runners.base import Runner, RunRequest
from worker.staging import StagingError, fetch_and_extract, stage_dataset
from worker.workspace import Workspace

log = logging.getLogger(__name__)

MAX_SCORES_BYTES = 64 * 1024


def decide_promotion(store: ModelStore, runner: Runner, message: JobMessage, version: VersionInfo, workspace: Workspace,
                     model_dir, limits: ArchiveLimits, cancel: threading.Event, log_path, deadline_s: int) -> dict:
    """Score, decide, move the alias (or not) and record the decision; returns it."""
    promote, name = message.spec.promote, version.model_name
    holder = store.aliases(name).get(promote.alias)
    decision = {"alias": promote.alias, "metric": promote.metric, "challenger_version": version.version,
                "champion_version": holder, "challenger_score": None, "champion_score": None,
                "promoted": False, "reason": "", "decided_at": datetime.now(UTC).isoformat()}
    if holder == version.version:  # a rerun of this job after it had already taken the alias
        return {**decision, "promoted": True, "reason": "already holds the alias"}
    try:
        scores = _score(store, runner, message, workspace, model_dir, holder, limits, cancel, log_path, deadline_s)
    except (ScoringError, StagingError) as err:
        decision["reason"] = f"not scored, so not promoted: {err}"
        store.record_promotion(name, version.version, decision)
        return decision
    challenger = scores["challenger"][promote.metric]
    champion = scores["champion"][promote.metric] if scores.get("champion") else None
    decision.update(challenger_score=challenger, champion_score=champion)
    if champion is not None and not challenger > champion:
        decision["reason"] = f"{promote.metric} {challenger:.4f} is not above v{holder}'s {champion:.4f}"
    elif store.move_alias_if(name, promote.alias, version.version, expected=holder):
        decision["promoted"] = True
        decision["reason"] = (f"{promote.metric} {challenger:.4f} beats v{holder}'s {champion:.4f}" if champion is not None
                              else f"{promote.alias} had no version")
    else:
        decision["reason"] = f"{promote.alias} moved away from v{holder} while the versions were scored; left as it is"
    store.record_promotion(name, version.version, decision)
    log.info("job %s: promotion to %s: %s", message.job_id, promote.alias, decision["reason"])
    return decision


class ScoringError(Exception):
    pass


def _score(store, runner, message, workspace: Workspace, model_dir, holder, limits, cancel, log_path, deadline_s) -> dict:
    score = Workspace(workspace.root / "score")
    shutil.rmtree(score.root, ignore_errors=True)
    score.prepare({}, {"task": "score", "job_id": message.job_id, "metric": message.spec.promote.metric})
    stage_dataset(store, message.inputs.heldout, message.inputs.heldout_audio, score.channel("heldout"), limits, message.inputs.etags)
    shutil.copytree(model_dir, score.channel("challenger"), symlinks=True)  # the worker's own link-free copy
    if holder is not None:
        fetch_and_extract(store, store.artifact_key(message.spec.model_name, holder), score.channel("champion"), limits)
    request = RunRequest(job_id=message.job_id, workspace=score, trainer="audio", image=None, deadline_s=deadline_s)
    output = BoundedLogFile(log_path, 1024 * 1024)
    result = runner.run(request, on_line=output.write_line, cancel=cancel)
    if result.outcome != RunOutcome.succeeded:
        raise ScoringError(result.reason or result.outcome.value)
    scores = read_json_object(score.output_data, "scores.json", MAX_SCORES_BYTES)  # never through a link
    metric = message.spec.promote.metric
    for side in ("challenger", "champion"):
        value = (scores or {}).get(side)
        if side == "champion" and holder is None:
            continue
        if not isinstance(value, dict) or not isinstance(value.get(metric), (int, float)):
            raise ScoringError(f"the scorer gave no {metric} for the {side}")
    return scores
