"""What is served: resolve ``models:/<name>@<alias>`` (or ``/<version>``) or a local folder to a local
model folder plus its registry identity, and record on the model version where it is served.

Only :meth:`ServedModel.public` leaves the service (``GET /v1/models``, headers): registry name, version, alias,
run id and the teacher's name and content hash. The folder, the artifact URI and the tracking URI are the server's
own business (a path on its disk, a database location) and stay inside."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from workflows import lineage
from workflows.model_folder import check_model_folder, read_meta

_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>\d+))$")


@dataclass
class ServedModel:
    """Identity of the served weights; ``public()`` is what ``GET /v1/models`` and the response headers show."""

    name: str
    version: str
    alias: str | None
    run_id: str | None
    teacher: str | None  # as recorded: often the teacher folder's absolute path
    source: str  # internal: the artifact URI or folder
    folder: str  # internal: the local folder loaded
    tracking_uri: str | None = None  # internal
    teacher_hash: str | None = None
    extra: dict = field(default_factory=dict)

    def public(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "alias": self.alias,
            "run_id": self.run_id,
            "teacher": teacher_name(self.teacher),
            "teacher_hash": self.teacher_hash,
        }

    def names(self) -> list[str]:
        """Every ``model`` value a request may name this model by."""
        ok = {self.name, f"models:/{self.name}/{self.version}", f"{self.name}/{self.version}"}
        if self.alias:
            ok |= {f"{self.name}@{self.alias}", f"models:/{self.name}@{self.alias}"}
        return sorted(ok)


def teacher_name(ref: str | None) -> str | None:
    """A teacher reference without where it lies: a folder or URI -> its last part; a hub id ``org/name`` stays."""
    if not ref:
        return None
    ref = ref.rstrip("/\\")
    if "://" in ref or ref.startswith(("/", "~", ".")) or "\\" in ref or ref.count("/") > 1 or ":" in ref:
        return re.split(r"[/\\:]", ref)[-1] or None
    return ref


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    m = _URI.match(uri)
    if not m:
        raise ValueError(f"model: {uri!r} is not models:/<name>@<alias> or models:/<name>/<version>")
    return m["name"], m["alias"], m["version"]


def _cache_root(cache_dir: str | None) -> Path:
    return Path(cache_dir or os.environ.get("CDM_CACHE_DIR") or Path.home() / ".cache" / "cdm") / "served"


def resolve(model: str, tracking_uri: str | None = None, cache_dir: str | None = None) -> ServedModel:
    """Local folder or registry URI -> a loadable folder. Registry artifacts are downloaded once per version."""
    if not model.startswith("models:/"):
        from workflows.config import DEFAULT_TEACHER

        folder = check_model_folder(DEFAULT_TEACHER if model == "builtin" else Path(model).expanduser())
        meta = read_meta(folder)
        prov = meta.provenance or {}
        return ServedModel(
            name=folder.resolve().name,
            version="local",
            alias=None,
            run_id=prov.get("mlflow_run_id"),
            teacher=prov.get("teacher"),
            source=str(folder.resolve()),
            folder=str(folder.resolve()),
            teacher_hash=prov.get("teacher_hash"),
        )
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_model_uri(model)
    uri = lineage.tracking_uri(tracking_uri)
    c = lineage.client(uri)
    try:
        mv = c.get_model_version_by_alias(name, alias) if alias else c.get_model_version(name, version)
    except MlflowException as e:
        raise ValueError(f"model: {model} is not in the registry at {uri}: {e.message.splitlines()[0]}") from None
    dest = _cache_root(cache_dir) / name / str(mv.version)
    if not (dest / "transformer" / "config.json").exists():
        import mlflow.artifacts

        tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
        mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(tmp), tracking_uri=uri)
        inner = next((p.parent.parent for p in tmp.rglob("transformer/config.json")), None)
        if inner is None:
            raise ValueError(f"model: {model} (version {mv.version}) has no transformer/ in {mv.source}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            inner.rename(dest)
        except OSError:  # another replica on this node won the race
            pass
    check_model_folder(dest)
    return ServedModel(
        name=name,
        version=str(mv.version),
        alias=alias,
        run_id=mv.run_id,
        teacher=(mv.tags or {}).get("cdm.teacher"),
        source=mv.source,
        folder=str(dest),
        tracking_uri=uri,
        teacher_hash=(mv.tags or {}).get("cdm.teacher_hash"),
    )


def record_serving(model: ServedModel, app_name: str, where: str) -> None:
    """Tag the model version with where and since when it is served (``since`` kept across replicas)."""
    if model.version == "local" or not model.tracking_uri:
        return
    c = lineage.client(model.tracking_uri)
    mv = c.get_model_version(model.name, model.version)
    prefix = f"cdm.serving.{app_name}"
    tags = mv.tags or {}
    if tags.get(f"{prefix}.where") != where or f"{prefix}.since" not in tags:
        c.set_model_version_tag(
            model.name, model.version, f"{prefix}.since", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        )
    c.set_model_version_tag(model.name, model.version, f"{prefix}.where", where)
    if model.alias:
        c.set_model_version_tag(model.name, model.version, f"{prefix}.alias", model.alias)
