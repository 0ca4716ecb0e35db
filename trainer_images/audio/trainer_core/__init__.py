"""What every trainer of the audio image stands on: the container contract (args.py: paths and
hyperparameters in; contract.py: the ending, failure and SIGTERM; progress.py: what the worker
reads), and one fit driver (fit.py). The methods (audio_trainer, hf_audio, speech) import from
here, never from each other's private modules."""
