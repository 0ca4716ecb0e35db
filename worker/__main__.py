"""`python -m worker`: one worker process."""

import logging

from jobs.settings import get_settings
from models_store import make_store
from worker.loop import Worker, install_signal_handlers
from worker.runners.process import ProcessRunner


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    runner = ProcessRunner(settings.trainer_python, settings.trainer_dir)
    worker = Worker(settings, make_store(settings), runner)
    install_signal_handlers(worker)
    worker.run()


if __name__ == "__main__":
    main()
