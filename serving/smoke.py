"""``cdm pipeline``'s serve stage (``workflows.pipeline`` gets it from the CLI, as workflows never imports
serving): deploy ``models:/<name>@<alias>`` with Ray Serve (``deploy/serve.yaml``), wait
for it, send one request through the HTTP API and check that the version that answered is the one promoted."""

from __future__ import annotations

import base64
import socket
import time
from pathlib import Path

from workflows.progress import console

SMOKE_PROMPT = "a photo of a sneaker"
READY_TIMEOUT_S = 300


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_port(configured: int) -> int:
    """The configured port when it is free, else one the OS hands out (said on the console)."""
    if _port_free(configured):
        return configured
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    console.print(f"\\[pipeline] port {configured} is in use; serving on {port}")
    return port


def wait_running(app: str, timeout: float = READY_TIMEOUT_S) -> None:
    from ray import serve

    deadline = time.time() + timeout
    status = None
    while time.time() < deadline:
        st = serve.status().applications.get(app)
        status = st.status if st else None
        if status == "RUNNING":
            return
        if status == "DEPLOY_FAILED":
            raise RuntimeError(f"serve: application '{app}' failed to deploy: {st.message[:500]}")
        time.sleep(1.0)
    raise TimeoutError(f"serve: application '{app}' not running after {timeout:.0f} s (status {status})")


def smoke_request(url: str, version: str, out_png: Path) -> dict:
    """One OpenAI-style request; the served version must be ``version``. Writes the image to ``out_png``."""
    import requests

    body = {"prompt": SMOKE_PROMPT, "n": 1, "seed": 0, "response_format": "b64_json"}
    t0 = time.time()
    r = requests.post(f"{url}/v1/images/generations", json=body, timeout=120)
    latency = time.time() - t0
    if r.status_code != 200:
        raise RuntimeError(f"serve: smoke request got HTTP {r.status_code}: {r.text[:300]}")
    served = r.headers.get("X-CDM-Model-Version")
    if served != str(version):
        raise RuntimeError(f"serve: the smoke request was answered by version {served}, expected {version}")
    out_png.write_bytes(base64.b64decode(r.json()["data"][0]["b64_json"]))
    return {
        "url": url,
        "status": r.status_code,
        "latency_s": round(latency, 3),
        "model": r.headers.get("X-CDM-Model"),
        "served_version": served,
        "image": str(out_png),
        "request": body,
    }


def serve_and_smoke(
    summary: dict, alias: str, folder: Path, serve_config, port: int | None, keep_serving: bool
) -> dict:
    from ray import serve

    from serving.launch import load_serve_config, serve_forever

    data = load_serve_config(serve_config)
    app = data["applications"][0].get("name", "cdm")
    port = port or pick_port(int((data.get("http_options") or {}).get("port", 8000)))
    model = f"models:/{summary['model']}@{alias}"
    info = serve_forever(model, serve_config, "127.0.0.1", port, summary["tracking_uri"], block=False)
    try:
        wait_running(app)
        smoke = smoke_request(info["url"], summary["version"], folder / "smoke.png")
    except BaseException:
        serve.shutdown()  # a failed smoke test leaves no service behind
        raise
    console.print(
        f"\\[pipeline] smoke request: HTTP 200 from {smoke['model']} version {smoke['served_version']} "
        f"in {smoke['latency_s']:.2f} s ({info['url']})"
    )
    if not keep_serving:
        serve.shutdown()
        console.print("\\[pipeline] service stopped (--keep-serving keeps it up)")
    return {"version": str(summary["version"]), "served_model": model, "kept_serving": keep_serving, **smoke}


def block_until_interrupted() -> None:
    import signal

    from ray import serve

    def _stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    console.print("\\[pipeline] serving until Ctrl-C")
    try:
        while True:
            time.sleep(5)
    except KeyboardInterrupt:
        console.print("\\[pipeline] shutting down the service")
        serve.shutdown()
