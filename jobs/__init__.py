"""What the API and the worker share: the job spec, job states, the event schema and settings.

`api` and `worker` never import each other; both import this package. Trainer images import
nothing from the service: they see only the container contract (see worker/workspace.py).
"""
