"""The MinIO-backed store: job uploads, job outcomes, model versions, aliases and lineage."""

from models_store.store import ModelStore, VersionInfo, make_store, store_unavailable

__all__ = ["ModelStore", "VersionInfo", "make_store", "store_unavailable"]
