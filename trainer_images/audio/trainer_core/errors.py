"""The one exception type whose message is shown to the user as the job's failure reason."""


class TrainerError(Exception):
    """A problem the user can act on (bad data, bad base model, bad hyperparameter).

    The message becomes /opt/ml/output/failure verbatim, so it names the row, file or field.
    """
