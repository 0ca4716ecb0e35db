"""/v1/models: the model registry: names, versions, aliases, artifacts and side files.

Every name in a path is checked against its pattern before the store is asked (a model name is
MODEL_NAME_PATTERN, a version is a number of at most 9 digits or an alias name, an alias is
ALIAS_PATTERN): anything else is a 422 naming the part, never a key the store would look up."""

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, status

from api.auth import Reader, Role, Submitter, audit, require
from api.deps import SessionDep, TenantStoreDep
from api.routes.jobs import artifact_response, stream_response
from api.schemas import AliasIn, ModelOut
from jobs.spec import ALIAS_PATTERN, MODEL_NAME_PATTERN, VERSION_PATTERN, parse_version_ref
from models_store import VersionInfo

router = APIRouter(prefix="/v1/models", tags=["models"], dependencies=[Depends(require(Role.read))])

ModelName = Annotated[str, Path(pattern=MODEL_NAME_PATTERN, max_length=63, description="a model name")]
Version = Annotated[str, Path(pattern=VERSION_PATTERN, max_length=32, description="a version number, latest, or another alias")]
Alias = Annotated[str, Path(pattern=ALIAS_PATTERN, max_length=32, description="an alias name, e.g. production")]
FileName = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", max_length=128, description="a file of the version")]


def _version(store, name: str, version: str) -> VersionInfo:
    try:
        ref = parse_version_ref(version)  # the path pattern lets 0 through; versions start at 1
    except ValueError as err:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail={"field": "version", "error": str(err)}) from None
    info = store.find_version(name, ref)
    if info is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail={"field": "version", "error": f"model {name!r} has no version {version!r}"})
    return info


@router.get("", response_model=list[ModelOut])
def list_models(store: TenantStoreDep) -> list[ModelOut]:
    return [ModelOut(name=n, versions=len(store.list_versions(n)), aliases=store.aliases(n)) for n in store.list_models()]


@router.get("/{name}/versions", response_model=list[VersionInfo])
def list_versions(name: ModelName, store: TenantStoreDep) -> list[VersionInfo]:
    versions = store.list_versions(name)
    if not versions:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail={"field": "name", "error": f"no model {name!r}"})
    return versions


@router.get("/{name}/versions/{version}", response_model=VersionInfo)
def get_version(name: ModelName, version: Version, store: TenantStoreDep) -> VersionInfo:
    """`version` is a number or an alias such as latest or production."""
    return _version(store, name, version)


@router.get("/{name}/versions/{version}/artifact")
def version_artifact(name: ModelName, version: Version, caller: Reader, session: SessionDep, store: TenantStoreDep, redirect: bool = False):
    info = _version(store, name, version)
    audit(session, caller, "model.download", f"{name}/{info.version}")
    return artifact_response(store, name, info.version, redirect)


@router.get("/{name}/versions/{version}/files/{filename}")
def version_file(name: ModelName, version: Version, filename: FileName, store: TenantStoreDep):
    """metrics.json, the plots and the model card of a version."""
    info = _version(store, name, version)
    if filename not in info.files:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail={"field": "filename", "error": f"version has no file {filename!r}; it has {info.files}"})
    key = store.version_prefix(name, info.version) + filename
    media = "image/png" if filename.endswith(".png") else "application/json" if filename.endswith(".json") else "text/plain"
    return stream_response(store, key, media)


@router.put("/{name}/aliases/{alias}", response_model=ModelOut)
def set_alias(name: ModelName, alias: Alias, body: AliasIn, caller: Submitter, session: SessionDep, store: TenantStoreDep) -> ModelOut:
    """Point an alias (e.g. production) at a version. `latest` moves by itself with each new version."""
    if alias == "latest":
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail={"field": "alias", "error": "latest moves by itself to each new version; choose another alias"})
    try:
        store.set_alias(name, alias, body.version)
    except KeyError as err:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail={"field": "version", "error": str(err)}) from None
    audit(session, caller, "alias.set", f"{name}/{alias}", version=body.version)
    return ModelOut(name=name, versions=len(store.list_versions(name)), aliases=store.aliases(name))
