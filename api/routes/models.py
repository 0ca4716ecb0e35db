"""/v1/models: the model registry: names, versions, aliases, artifacts and side files."""

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import StreamingResponse

from api.deps import StoreDep
from api.routes.jobs import artifact_response
from api.schemas import AliasIn, ModelOut
from models_store import VersionInfo

router = APIRouter(prefix="/v1/models", tags=["models"])


def _version(store, name: str, version: str) -> VersionInfo:
    info = store.find_version(name, version)
    if info is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail={"field": "version", "error": f"model {name!r} has no version {version!r}"})
    return info


@router.get("", response_model=list[ModelOut])
def list_models(store: StoreDep) -> list[ModelOut]:
    return [ModelOut(name=n, versions=len(store.list_versions(n)), aliases=store.aliases(n)) for n in store.list_models()]


@router.get("/{name}/versions", response_model=list[VersionInfo])
def list_versions(name: str, store: StoreDep) -> list[VersionInfo]:
    versions = store.list_versions(name)
    if not versions:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail={"field": "name", "error": f"no model {name!r}"})
    return versions


@router.get("/{name}/versions/{version}", response_model=VersionInfo)
def get_version(name: str, version: str, store: StoreDep) -> VersionInfo:
    """`version` is a number or an alias such as latest or production."""
    return _version(store, name, version)


@router.get("/{name}/versions/{version}/artifact")
def version_artifact(name: str, version: str, store: StoreDep, redirect: bool = False):
    info = _version(store, name, version)
    return artifact_response(store, name, info.version, redirect)


@router.get("/{name}/versions/{version}/files/{filename}")
def version_file(name: str, version: str, filename: str, store: StoreDep):
    """metrics.json, the plots and the model card of a version."""
    info = _version(store, name, version)
    if filename not in info.files:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail={"field": "filename", "error": f"version has no file {filename!r}; it has {info.files}"})
    key = store.version_prefix(name, info.version) + filename
    media = "image/png" if filename.endswith(".png") else "application/json" if filename.endswith(".json") else "text/plain"
    return StreamingResponse(store.stream(key), media_type=media)


@router.put("/{name}/aliases/{alias}", response_model=ModelOut)
def set_alias(name: str, alias: str, body: AliasIn, store: StoreDep) -> ModelOut:
    """Point an alias (e.g. production) at a version. `latest` moves by itself with each new version."""
    try:
        store.set_alias(name, alias, body.version)
    except KeyError as err:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail={"field": "version", "error": str(err)}) from None
    return ModelOut(name=name, versions=len(store.list_versions(name)), aliases=store.aliases(name))
