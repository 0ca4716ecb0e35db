"""Fine-tuning a Hugging Face audio classifier (wav2vec2, HuBERT, WavLM, AST, Whisper encoder, ...)
supplied as the base model, after the pattern of Hugging Face's
examples/pytorch/audio-classification/run_audio_classification.py, in plain PyTorch and offline.

Entry point: `trainer_images/audio/train` dispatches here when the model channel holds a Hugging
Face model directory (a config.json with `model_type`). Data loading, splitting, evaluation,
plots and progress lines are the built-in CNN trainer's (`audio_trainer`), so both methods read
the same CSVs, split them the same way and report the same metrics.
"""

METHOD = "hf-audio-classification"
