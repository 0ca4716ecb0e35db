"""Speech recognition in the audio image: CTC fine-tuning (`asr`) and transcription jobs
(`transcribe`), following trainer_images/CONTRACT.md.

Entry points (dispatched by trainer_images/audio/train from job.json's task):
    speech.asr.main()         task asr: CSV audio,text -> a wav2vec2-style CTC model directory
    speech.transcribe.main()  task transcribe: CSV audio + an ASR model -> transcripts.csv, report.pdf

The artifacts are plain Hugging Face directories (config, safetensors weights, feature extractor,
tokenizer) that `transformers.pipeline("automatic-speech-recognition", model=DIR)` loads; nothing
of this package is needed to use them.
"""

SAMPLE_RATE = 16_000
FORMAT = "retrain-asr-ctc"  # recorded in config.json (`retrain` key) with the model's lineage
