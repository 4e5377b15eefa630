"""``cdm serve``: read ``deploy/serve.yaml``, override what the command line says, run the application
with Ray Serve and block until interrupted. ``serve run deploy/serve.yaml`` runs the same file.

Both start Serve's controller with the file's ``controller_options``, which install ``serving.failover`` in the
HTTP proxies (``cdm serve`` adds it when the file lacks it). On a cluster whose Serve controller already runs,
the options of the running controller stay: start that cluster's Serve with them once."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import yaml

from serving.config import BatchingConfig, ServeArgs
from serving.failover import controller_options
from workflows.config import ConfigError, build

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "serve.yaml"
DEPLOYMENT_KEYS = {
    "num_replicas",
    "max_ongoing_requests",
    "max_queued_requests",
    "user_config",
    "autoscaling_config",
    "ray_actor_options",
    "health_check_period_s",
    "health_check_timeout_s",
    "graceful_shutdown_timeout_s",
    "graceful_shutdown_wait_loop_s",
}


def load_serve_config(path: str | Path | None) -> dict:
    """The YAML as a dict with one application, checked enough to name what is wrong."""
    p = Path(path) if path else DEFAULT_CONFIG
    if not p.exists():
        raise FileNotFoundError(f"config: {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config: {p} is not valid YAML: {e}") from None
    apps = data.get("applications")
    if not isinstance(apps, list) or len(apps) != 1 or not isinstance(apps[0], dict):
        raise ConfigError(f"config: {p}: applications must list exactly one application")
    app = apps[0]
    for d in app.get("deployments") or []:
        unknown = set(d) - DEPLOYMENT_KEYS - {"name"}
        if unknown:
            raise ConfigError(f"applications[0].deployments.{sorted(unknown)[0]}: unknown deployment option")
        if "user_config" in d:
            build(BatchingConfig, d["user_config"])
    build(ServeArgs, app.get("args") or {})
    return data


def resolve_args(args: dict, model: str | None, tracking_uri: str | None, public_url: str) -> dict:
    """Make the args position-independent: absolute model folders (``model`` and ``models``), absolute sqlite
    tracking URI."""
    from workflows import lineage

    out = dict(args)
    if model:
        out["model"] = model
    m = out.get("model", "builtin")
    if m != "builtin" and not m.startswith("models:/"):
        out["model"] = _absolute(m)
    uris = [m]
    if isinstance(out.get("models"), dict):  # anything else: ServeArgs names the field below
        out["models"] = {k: _absolute(v) for k, v in out["models"].items()}
        uris += list(out["models"].values())
    if any(isinstance(u, str) and u.startswith("models:/") for u in uris) or tracking_uri:
        out["tracking_uri"] = lineage.tracking_uri(tracking_uri or out.get("tracking_uri"))
    out.setdefault("public_url", public_url)
    return build(ServeArgs, out).model_dump(mode="json")


def _absolute(uri):
    """A model folder as an absolute path (replicas run elsewhere); registry URIs and 'builtin' as they are."""
    if not isinstance(uri, str) or uri == "builtin" or uri.startswith("models:/"):
        return uri
    return str(Path(uri).expanduser().resolve())


def application(args: dict, deployments: list[dict] | None = None):
    from serving.app import ImageService

    dep = ImageService
    for d in deployments or []:
        if d.get("name", "ImageService") == "ImageService":
            dep = dep.options(**{k: v for k, v in d.items() if k != "name"})
    return dep.bind(args)


def serve_forever(
    model: str | None,
    config: str | Path | None,
    host: str | None,
    port: int | None,
    tracking_uri: str | None = None,
    block: bool = True,
) -> dict:
    import ray
    from ray import serve

    from workflows.progress import console

    data = load_serve_config(config)
    app = data["applications"][0]
    http = dict(data.get("http_options") or {})
    http["host"] = host or http.get("host", "127.0.0.1")
    http["port"] = int(port or http.get("port", 8000))
    url = f"http://{http['host']}:{http['port']}{app.get('route_prefix', '/').rstrip('/')}"
    args = resolve_args(app.get("args") or {}, model, tracking_uri, url)
    if not ray.is_initialized():
        addr = os.environ.get("RAY_ADDRESS")
        ray.init(address=addr) if addr else ray.init(include_dashboard=False)
    serve.start(http_options=http, controller_options=controller_options(data.get("controller_options")))
    console.print(f"\\[cdm] deploying {args['model']} as application '{app.get('name', 'cdm')}'")
    serve.run(
        application(args, app.get("deployments")),
        name=app.get("name", "cdm"),
        route_prefix=app.get("route_prefix", "/"),
        blocking=False,
    )
    console.print(f"\\[cdm] serving at {url}  (OpenAPI: {url}/docs, health: {url}/healthz); Ctrl-C stops")
    info = {"url": url, "model": args["model"], "application": app.get("name", "cdm")}
    if not block:
        return info

    def _stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)  # `kill PID` stops the service as Ctrl-C does
    try:
        while True:
            time.sleep(5)
    except KeyboardInterrupt:
        console.print("\\[cdm] shutting down")
        serve.shutdown()
    return info
