"""The peer of ``benchmarks/serve_load.py``: the server a team would write instead of a Ray Serve deployment.

One process, plain FastAPI + uvicorn, the same sampler (``serving.generator.Generator``: encode, 4-step sample, PNG,
base64) behind the same OpenAI route, one request at a time (a lock: the model is not shared between requests).

    python benchmarks/peer_server.py --model workflows/assets/teacher-tiny --port 8123
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
import threading
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydantic import BaseModel, Field  # noqa: E402


class Body(BaseModel):  # module level: FastAPI resolves the (postponed) annotation of the route by name
    prompt: str = Field(min_length=1, max_length=512)
    n: int = Field(1, ge=1, le=8)
    seed: int = Field(0, ge=0)
    response_format: str = "b64_json"


def build(folder: str):
    import torch
    from fastapi import FastAPI, HTTPException

    from serving.generator import Generator, Job
    from workflows.images import png_bytes

    torch.set_num_threads(1)
    gen = Generator(folder)
    lock = threading.Lock()
    app = FastAPI(title="peer: plain FastAPI + uvicorn, one request at a time")

    @app.get("/healthz")
    def healthz():
        return {"ok": True}

    @app.post("/v1/images/generations")
    def images(body: Body):  # a plain def: FastAPI runs it in its thread pool; the lock serialises the model
        if not body.prompt.strip():
            raise HTTPException(400, "prompt is empty")
        with lock:
            (imgs,) = gen.run([Job([body.prompt], body.n, body.seed, 4)])
        return {"created": 0, "data": [{"b64_json": base64.b64encode(png_bytes(im)).decode()} for im in imgs]}

    return app


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model folder")
    ap.add_argument("--port", type=int, required=True)
    a = ap.parse_args()
    uvicorn.run(build(a.model), host="127.0.0.1", port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
