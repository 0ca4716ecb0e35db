"""Task `transcribe`: a stored ASR model and a CSV of audio or video files in, transcripts out.

1. Load the model from the model channel: a Hugging Face CTC directory (as the `asr` task saves it),
   read as data only (safetensors, no remote code), wrapped in the standard ASR pipeline.
2. Read dataset.csv (column `audio`; any other columns are ignored) and transcribe every row in
   order. Each file is decoded with ffmpeg when needed (video: the audio track); long recordings go
   through the pipeline in 20 s windows with overlapping strides, whose CTC outputs are stitched.
3. Write $SM_OUTPUT_DATA_DIR/transcripts.csv (audio,text,seconds), report.pdf (one section per file,
   a header with the model's lineage and the counts) and metrics.json; a progress line per file.

A file that cannot be decoded is named in the log and the report and gets an empty transcript; the
job fails only when no file could be transcribed.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainer_core.args import Paths, read_arguments
from trainer_core.audio import decode
from trainer_core.contract import run_main
from trainer_core.errors import TrainerError
from trainer_core.manifest import read_manifest, resolve
from trainer_core.model_dir import check_model_dir, find_model_dir
from trainer_core.progress import emit_progress, log

from . import SAMPLE_RATE

FONT_DIRS = [Path("/usr/share/fonts/truetype/dejavu"), Path("/usr/share/fonts/dejavu")]


@dataclass
class TranscribeArguments:
    chunk_seconds: float = field(default=20.0, metadata={"help": "window for long recordings (0 = whole file at once)"})
    stride_seconds: float = field(default=3.0, metadata={"help": "overlap on each side of a window"})
    batch_size: int = field(default=4, metadata={"help": "windows per forward pass"})

    def validate(self) -> None:
        if self.chunk_seconds < 0 or self.stride_seconds < 0 or self.batch_size < 1:
            raise TrainerError("Invalid hyperparameter: chunk_seconds and stride_seconds must be >= 0, batch_size >= 1.")
        if self.chunk_seconds and 2 * self.stride_seconds >= self.chunk_seconds:
            raise TrainerError("Invalid hyperparameter: stride_seconds must be less than half of chunk_seconds.")


@dataclass
class Row:
    audio: str
    text: str = ""
    seconds: float = 0.0
    error: str = ""


def load_pipeline(model_dir: Path, device: str):
    from transformers import AutoModelForCTC, AutoProcessor, pipeline

    check_model_dir(model_dir)
    kwargs = {"local_files_only": True, "trust_remote_code": False}
    try:
        model = AutoModelForCTC.from_pretrained(str(model_dir), use_safetensors=True, **kwargs)
        processor = AutoProcessor.from_pretrained(str(model_dir), **kwargs)
    except Exception as e:  # noqa: BLE001 - any load failure is the user's model, not our bug
        raise TrainerError(f"The model in the model channel cannot be loaded as a CTC speech recogniser "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:300]}). A transcribe job needs a model "
                           "made by an `asr` job, or a Hugging Face CTC directory with its processor.") from None
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "feature_extractor"):
        raise TrainerError("The model directory has no tokenizer/feature extractor (vocab.json, preprocessor_config.json).")
    model.eval()
    return pipeline("automatic-speech-recognition", model=model, tokenizer=processor.tokenizer,
                    feature_extractor=processor.feature_extractor, device=device), model.config


def lineage_lines(config, job: dict) -> list[str]:
    info = getattr(config, "retrain", None) or {}
    lines = []
    base = job.get("base") or {}
    if base:
        version = job.get("base_version") or base.get("version")
        lines.append(f"Model: {base.get('model')} version {version}")
    else:
        lines.append("Model: uploaded with the job")
    for step in info.get("lineage", []):
        lines.append(f"  trained by job {step.get('job_id')} as {step.get('model_name')} on {step.get('train_size')} clips"
                     + (f", from {json.dumps(step.get('base'))}" if step.get("base") else ", from scratch"))
    lines.append(f"Architecture: {config.model_type}, vocabulary of {config.vocab_size}")
    return lines


def write_pdf(path: Path, rows: list[Row], header: list[str], title: str) -> None:
    from fpdf import FPDF

    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(True, margin=15)
    font = "helvetica"
    regular = next((d / "DejaVuSans.ttf" for d in FONT_DIRS if (d / "DejaVuSans.ttf").is_file()), None)
    bold = next((d / "DejaVuSans-Bold.ttf" for d in FONT_DIRS if (d / "DejaVuSans-Bold.ttf").is_file()), None)
    if regular and bold:
        # A Unicode font, so transcripts in any script print; the core fonts are Latin-1 only.
        pdf.add_font("dejavu", "", str(regular))
        pdf.add_font("dejavu", "B", str(bold))
        font = "dejavu"

    def text(s: str) -> str:
        return s if font == "dejavu" else s.encode("latin-1", "replace").decode("latin-1")

    pdf.set_title(title)
    pdf.add_page()
    pdf.set_font(font, "B", 16)
    pdf.multi_cell(0, 9, text(title), new_x="LMARGIN", new_y="NEXT")
    pdf.set_font(font, "", 10)
    for line in header:
        pdf.multi_cell(0, 5.5, text(line), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(4)
    for i, row in enumerate(rows, 1):
        pdf.set_font(font, "B", 12)
        pdf.multi_cell(0, 7, text(f"{i}. {row.audio}  ({row.seconds:.1f} s)"), new_x="LMARGIN", new_y="NEXT")
        pdf.set_font(font, "", 11)
        body = row.text if not row.error else f"[not transcribed: {row.error}]"
        pdf.multi_cell(0, 6, text(body or "[no speech recognised]"), new_x="LMARGIN", new_y="NEXT")
        pdf.ln(3)
    pdf.output(str(path))


def run(paths: Paths) -> dict:
    import torch

    started = time.monotonic()
    args = read_arguments(TranscribeArguments, paths,
                          quiet=frozenset({"epochs", "learning_rate", "seed", "patience"}))  # the service's defaults
    job = paths.job()
    if paths.num_cpus and not torch.cuda.is_available():
        torch.set_num_threads(max(1, paths.num_cpus))
    device = "cuda:0" if torch.cuda.is_available() and paths.num_gpus != 0 else "cpu"

    # 1. The model.
    model_dir = find_model_dir(paths.base_model_dir)
    if model_dir is None:
        raise TrainerError("A transcribe job needs an ASR model in the model channel: name a stored version in "
                           "base, or upload a model directory archive.")
    asr, config = load_pipeline(model_dir, device)
    log(f"model {config.model_type} from {model_dir} on {device}")

    # 2. Every row, in order.
    utts = read_manifest(paths.train_dir, "train", None)
    rows: list[Row] = []
    audio_seconds = 0.0
    for i, utt in enumerate(utts, 1):
        row = Row(utt.path)
        t0 = time.monotonic()
        try:
            audio = decode(resolve(paths.train_dir, utt))
            row.seconds = round(len(audio) / SAMPLE_RATE, 2)
            call = {}
            if args.chunk_seconds and row.seconds > args.chunk_seconds:
                call = {"chunk_length_s": args.chunk_seconds, "stride_length_s": args.stride_seconds,
                        "batch_size": args.batch_size}
            row.text = " ".join(asr({"raw": audio, "sampling_rate": SAMPLE_RATE}, **call)["text"].split())
            audio_seconds += row.seconds
        except TrainerError as e:
            row.error = str(e)
        except Exception as e:  # noqa: BLE001 - one bad file is reported, the others still transcribed
            row.error = f"{type(e).__name__}: {e}"
        if row.error:
            log(f"{utt.where}: {row.error}")
        rows.append(row)
        emit_progress(1, 1, i, {"files_done": i, "files_total": len(utts), "audio_seconds": round(audio_seconds, 1)})
        log(f"[{i}/{len(utts)}] {utt.path} ({row.seconds:.1f} s, {time.monotonic() - t0:.1f}s): {row.text[:80]!r}")

    failed = [r for r in rows if r.error]
    if len(failed) == len(rows):
        raise TrainerError(f"None of the {len(rows)} files could be transcribed; first: {failed[0].audio}: {failed[0].error}")

    # 3. Outputs.
    out = paths.output_data_dir
    out.mkdir(parents=True, exist_ok=True)
    with (out / "transcripts.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["audio", "text", "seconds"])
        for r in rows:
            writer.writerow([r.audio, r.text, f"{r.seconds:.2f}"])
    elapsed = time.monotonic() - started
    header = [
        *lineage_lines(config, job),
        f"Job: {job.get('job_id', '-')}",
        f"Files: {len(rows)} ({len(rows) - len(failed)} transcribed, {len(failed)} failed), "
        f"{audio_seconds:.1f} s of audio, {elapsed:.1f} s to transcribe",
    ]
    write_pdf(out / "report.pdf", rows, header, f"Transcripts: {job.get('model_name') or 'transcription job'}")
    metrics = {"files": len(rows), "failed_files": len(failed), "audio_seconds": round(audio_seconds, 1),
               "seconds": round(elapsed, 1), "real_time_factor": round(elapsed / audio_seconds, 4) if audio_seconds else None,
               "failures": [{"audio": r.audio, "error": r.error} for r in failed]}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log(f"done: {len(rows)} files, {audio_seconds:.1f} s of audio in {elapsed:.1f}s -> {sorted(p.name for p in out.iterdir())}")
    return metrics


def main() -> int:
    return run_main(run, "transcription")


__all__ = ["main", "run"]
