"""The MinIO-backed store: job uploads, job outcomes, model versions, aliases and lineage."""

from models_store.store import ModelStore, VersionInfo, make_store

__all__ = ["ModelStore", "VersionInfo", "make_store"]
