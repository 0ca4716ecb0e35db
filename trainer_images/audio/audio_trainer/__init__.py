"""The built-in audio-classification trainer: a small CNN on log-mel features, trained with
augmentation so it generalises to speakers it never heard, exported to ONNX with the feature
front end inside the graph.

It follows trainer_images/CONTRACT.md (SageMaker's training contract) and imports nothing from
the service. Entry point: `trainer_images/audio/train` -> `audio_trainer.main.main()`.
"""

FORMAT = "retrain-audio-cnn"  # config.json "format" of models this trainer writes and can continue
FORMAT_VERSION = 1
SAMPLE_RATE = 16_000
