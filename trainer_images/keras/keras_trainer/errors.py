class TrainerError(Exception):
    """A problem with the job's inputs that the user can fix; its message becomes the failure reason."""
