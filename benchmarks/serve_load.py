"""Serving load benchmark: closed-loop HTTP load against the Ray Serve service, batching on and off,
and the same sampler called in-process as the ceiling.

    python benchmarks/serve_load.py                       # built-in teacher at 4 steps, 15 s per cell
    python benchmarks/serve_load.py --model runs/<job>/student --duration 30

Each cell runs ``concurrency`` clients that each send one request (OpenAI route, n=1, b64 PNG), wait for
the answer and send the next, for ``--duration`` seconds after a warm-up. The service is configured from
``deploy/serve.yaml`` (autoscaling, queue limits); batching off = ``user_config.max_batch_size: 1``,
applied to the running replicas. Writes ``benchmarks/results/serving.{json,md}``.

On a shared VM the machine's speed drifts by 10-30 % over the minutes between the peer's cells and Serve's, and a
comparison with one side measured at one end of the run reads that drift as serving overhead. So the c=1 target
reads **paired rounds** (``--paired-rounds``, default 6): with Serve (batching on) and the peer both up, short
c=1 cells alternate between them, the order flipped every round, and the target is the median of the rounds'
Serve p50 / peer p50. The peer's lowest-concurrency cell is also measured before the Serve cells and again after
Ray is shut down (the bracket; the target's reading with ``--paired-rounds 0``), which also says how much Ray's
idle processes slow the peer in the paired rounds. The in-process batch-1 call is timed at both ends as well, so
the result file says how far the machine drifted during the run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PROMPTS = [
    "a photo of a sneaker",
    "a t-shirt",
    "a pair of trousers",
    "an ankle boot",
    "a handbag",
    "a dress",
    "a coat",
    "a sandal",
    "a shirt",
    "a pullover",
]


def machine() -> str:
    import torch

    return (
        f"{platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    )


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def inprocess(folder: str, batches: list[int], seconds: float) -> list[dict]:
    """The replica's own work (encode, padded 4-step sample, PNG, base64) without HTTP or Serve."""
    import torch

    from serving.generator import Generator, Job
    from workflows.images import png_bytes

    torch.set_num_threads(1)
    gen = Generator(folder)
    rows = []
    for b in batches:
        jobs = [Job([PROMPTS[i % len(PROMPTS)]], 1, i, 4) for i in range(b)]
        for _ in range(2):
            gen.run(jobs)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or n < 3:
            out = gen.run(jobs)
            [base64.b64encode(png_bytes(im[0])) for im in out]
            n += 1
        ms = (time.perf_counter() - t0) / n * 1000
        rows.append({"batch": b, "images_per_s": round(b / ms * 1000, 2), "ms_per_call": round(ms, 2)})
        print(f"in-process batch {b}: {ms:.1f} ms/call, {b / ms * 1000:.1f} images/s", flush=True)
    return rows


async def _closed_loop(url: str, concurrency: int, duration: float, warmup: float) -> dict:
    import aiohttp

    lat: list[float] = []
    codes: dict[int, int] = {}
    ok_total = [0]  # every 200 of the cell, warm-up included (the denominator of the server's CPU per image)
    batches: list[int] = []
    sample_ms: list[float] = []
    t_start = time.perf_counter()
    t_measure = t_start + warmup
    t_end = t_measure + duration

    async def client(k: int, session):
        i = k
        while time.perf_counter() < t_end:
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "n": 1, "seed": i, "response_format": "b64_json"}
            t0 = time.perf_counter()
            try:
                async with session.post(f"{url}/v1/images/generations", json=body) as r:
                    await r.read()
                    status, bs = r.status, r.headers.get("X-CDM-Batch-Size")
                    st = r.headers.get("Server-Timing", "")
            except aiohttp.ClientError:
                status, bs, st = 599, None, ""
            t1 = time.perf_counter()
            ok_total[0] += status == 200
            if t_measure <= t1 <= t_end:  # completions inside the window (a start-and-end rule undercounts
                # requests whose latency is a sizeable part of the window)
                lat.append((t1 - t0) * 1000)
                codes[status] = codes.get(status, 0) + 1
                if bs:
                    batches.append(int(bs))
                # Server-Timing: "queue;dur=X, sample;dur=Y" (the replica's batcher wait and its sampler time)
                timing = dict(p.strip().split(";dur=") for p in st.split(",") if ";dur=" in p)
                if "sample" in timing:
                    sample_ms.append(float(timing["sample"]))
            i += concurrency

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(client(k, session) for k in range(concurrency)))
    ok = codes.get(200, 0)
    return {
        "images_per_s": round(ok / duration, 2),
        "p50_ms": round(pct(lat, 50), 2),
        "p95_ms": round(pct(lat, 95), 2),
        "p99_ms": round(pct(lat, 99), 2),
        "errors_5xx": sum(v for k, v in codes.items() if 500 <= k < 600),
        "errors_other": sum(v for k, v in codes.items() if k != 200 and not 500 <= k < 600),
        "requests": sum(codes.values()),
        "mean_batch": round(statistics.mean(batches), 2) if batches else None,
        "mean_sample_ms": round(statistics.mean(sample_ms), 2) if sample_ms else None,
        "ok_total": ok_total[0],
    }


def free_port() -> int:
    """A loopback port nobody listens on now (for the service and for the peer)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_cpu_s() -> float:
    """CPU seconds the machine spent outside this process (the load generator): the server's, whatever its
    processes (uvicorn; or Serve's proxy, replicas, controller, raylet and GCS)."""
    import psutil

    t = psutil.cpu_times()
    busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
    own = psutil.Process().cpu_times()
    return busy - own.user - own.system


def measured(url: str, c: int, duration: float, warmup: float) -> dict:
    """One closed-loop cell and the server's CPU seconds per image over it."""
    cpu0 = server_cpu_s()
    res = asyncio.run(_closed_loop(url, c, duration, warmup))
    res["server_cpu_s_per_image"] = round((server_cpu_s() - cpu0) / max(1, res["ok_total"]), 4)
    return res


@contextlib.contextmanager
def peer_server(folder: str):
    """The plain FastAPI + uvicorn server of ``benchmarks/peer_server.py`` on a free loopback port: yields its URL."""
    import subprocess
    import urllib.request

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "peer_server.py"), "--model", str(folder), "--port", str(port)]
    )
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("the peer server did not start") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def peer(folder: str, conc: list[int], duration: float, warmup: float) -> list[dict]:
    """The peer server, same load generator, same cells."""
    with peer_server(folder) as url:
        rows = []
        for c in conc:
            row = {"concurrency": c, **measured(url, c, duration, warmup)}
            rows.append(row)
            print("peer " + json.dumps(row), flush=True)
        return rows


def paired(serve_url: str, folder: str, c: int, rounds: int, duration: float, warmup: float) -> list[dict]:
    """Alternating c-cells on the peer and on Serve (batching on), both servers up, the order flipped every round
    (peer first in even rounds, Serve first in odd ones): the two sides of each round are seconds apart, so the
    machine's drift over the minutes of the run cancels in the round's ratio. The idle side still runs while the
    other is measured (Ray's controller, proxy and raylet when the peer is measured; an idle uvicorn the other
    way): the peer's cells here are set against its cell with Ray shut down in the result."""
    out = []
    with peer_server(folder) as peer_url:
        for r in range(rounds):
            sides = [("peer", peer_url), ("serve", serve_url)]
            res = {}
            for name, url in sides if r % 2 == 0 else sides[::-1]:
                res[name] = measured(url, c, duration, warmup)
            row = {
                "round": r,
                "first": "peer" if r % 2 == 0 else "serve",
                "serve_p50_ms": res["serve"]["p50_ms"],
                "peer_p50_ms": res["peer"]["p50_ms"],
                "ratio": round(res["serve"]["p50_ms"] / res["peer"]["p50_ms"], 3),
                "errors_5xx": res["serve"]["errors_5xx"] + res["peer"]["errors_5xx"],
            }
            out.append(row)
            print("paired " + json.dumps(row), flush=True)
    return out


def paired_md(pairs: list[dict], c: int, seconds: float, peer_alone_ms: float) -> list[str]:
    """The paired rounds as markdown lines (none when there were no rounds)."""
    if not pairs:
        return []
    peer_ms = statistics.median(p["peer_p50_ms"] for p in pairs)
    return [
        "",
        f"Paired c={c} rounds ({seconds:.0f} s cells after 1 s warm-up, peer and Serve both up, the order flipped "
        "every round):",
        "",
        "| round | first | Serve p50 ms | peer p50 ms | ratio | 5xx |",
        "|---|---|---|---|---|---|",
        *[
            f"| {p['round']} | {p['first']} | {p['serve_p50_ms']} | {p['peer_p50_ms']} | {p['ratio']} | "
            f"{p['errors_5xx']} |"
            for p in pairs
        ],
        "",
        f"Median ratio {statistics.median(p['ratio'] for p in pairs):.3f} (range "
        f"{min(p['ratio'] for p in pairs)}-{max(p['ratio'] for p in pairs)}). The peer's median p50 in these rounds, "
        f"with Ray idle beside it, {peer_ms:.2f} ms; alone, Ray shut down, {peer_alone_ms} ms.",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin", help="model folder, models:/ URI or 'builtin'")
    ap.add_argument("--config", default=str(ROOT / "deploy" / "serve.yaml"))
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--max-batch-size", type=int, default=32, help="batching-on max_batch_size")
    ap.add_argument(
        "--batch-wait", type=float, default=None, help="batching-on batch_wait_timeout_s (default: the config's)"
    )
    ap.add_argument(
        "--paired-rounds",
        type=int,
        default=6,
        help="rounds of alternating lowest-concurrency cells, peer and Serve both up (0: none; the c=1 target then "
        "uses the bracket)",
    )
    ap.add_argument("--paired-duration", type=float, default=8.0, help="seconds per paired cell (after 1 s warm-up)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = ap.parse_args()

    import ray
    from ray import serve

    from serving.launch import application, load_serve_config, resolve_args
    from serving.source import resolve

    conc = [int(c) for c in a.concurrency.split(",")]
    cfg = load_serve_config(a.config)
    app_cfg = cfg["applications"][0]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = resolve_args(app_cfg.get("args") or {}, a.model, None, url)
    folder = resolve(args["model"], args.get("tracking_uri")).folder

    ceiling = inprocess(folder, sorted(set([1, 8, 32] + conc)), seconds=min(5.0, a.duration))
    peer_rows = peer(folder, conc, a.duration, a.warmup)

    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    from serving.failover import controller_options

    # the service as deployed: its proxies run the failover of deploy/serve.yaml
    serve.start(
        http_options={"host": "127.0.0.1", "port": port},
        controller_options=controller_options(cfg.get("controller_options")),
    )
    deployments = [dict(d) for d in app_cfg.get("deployments") or []]
    dep = deployments[0] if deployments else {"name": "ImageService"}
    wait = a.batch_wait if a.batch_wait is not None else (dep.get("user_config") or {}).get("batch_wait_timeout_s", 0.0)
    dep["max_ongoing_requests"] = max(dep.get("max_ongoing_requests", 32), a.max_batch_size)

    replica_log: list[tuple[float, int]] = []
    stop = threading.Event()
    t_zero = time.time()

    def watch():
        while not stop.is_set():
            try:
                st = serve.status().applications["cdm"].deployments["ImageService"].replica_states
                replica_log.append((round(time.time() - t_zero, 1), int(st.get("RUNNING", 0))))
            except Exception:
                pass
            time.sleep(1.0)

    rows: list[dict] = []
    pairs: list[dict] = []
    for batching in (True, False):
        dep["user_config"] = {
            "max_batch_size": a.max_batch_size if batching else 1,
            "batch_wait_timeout_s": wait if batching else 0.0,
        }
        serve.run(application(args, [dep]), name="cdm", route_prefix="/", blocking=False)
        while serve.status().applications["cdm"].status != "RUNNING":
            time.sleep(0.5)
        if not replica_log:
            threading.Thread(target=watch, daemon=True).start()
        for c in conc:
            res = measured(url, c, a.duration, a.warmup)
            row = {"concurrency": c, "batching": batching, **res}
            rows.append(row)
            print(json.dumps(row), flush=True)
        if batching and a.paired_rounds > 0:
            pairs = paired(url, folder, min(conc), a.paired_rounds, a.paired_duration, 1.0)
    stop.set()
    serve.shutdown()
    ray.shutdown()
    # the other side of the bracket: the peer's c=1 cell and the in-process batch-1 call again, Ray gone
    peer_after = peer(folder, [min(conc)], a.duration, a.warmup)[0]
    ceiling_after = inprocess(folder, [1], seconds=min(5.0, a.duration))[0]

    by_b = {r["batch"]: r for r in ceiling}
    c1 = next(r for r in rows if r["concurrency"] == min(conc) and r["batching"])
    c1_off = next(r for r in rows if r["concurrency"] == min(conc) and not r["batching"])
    cmax = next(r for r in rows if r["concurrency"] == max(conc) and r["batching"])
    ceil_max = by_b[max(conc)]
    by_c = {r["concurrency"]: r for r in peer_rows}
    peer_c1 = [by_c[min(conc)]["p50_ms"], peer_after["p50_ms"]]
    targets = {  # against the peer, same load generator, same machine (issue 18)
        "c32_serve_over_peer_throughput": round(cmax["images_per_s"] / max(by_c[max(conc)]["images_per_s"], 1e-9), 3),
        "c1_serve_p50_over_peer": round(c1["p50_ms"] / statistics.mean(peer_c1), 3),  # the bracket's mean
        "c1_serve_p50_over_peer_before": round(c1["p50_ms"] / peer_c1[0], 3),
        "c1_serve_p50_over_peer_after": round(c1["p50_ms"] / peer_c1[1], 3),
        # the paired rounds: the median of each round's Serve p50 / peer p50 (seconds apart, both servers up)
        "c1_paired_ratio_median": round(statistics.median(p["ratio"] for p in pairs), 3) if pairs else None,
        "c1_paired_ratio_range": [min(p["ratio"] for p in pairs), max(p["ratio"] for p in pairs)] if pairs else None,
        "zero_5xx": all(r["errors_5xx"] == 0 for r in rows + peer_rows + [peer_after] + pairs),
        "c32_serve_fraction_of_inprocess": round(cmax["images_per_s"] / ceil_max["images_per_s"], 3),
        "c1_p50_over_inprocess": round(c1["p50_ms"] / by_b[1]["ms_per_call"], 3),
        "c1_p50_over_inprocess_batching_off": round(c1_off["p50_ms"] / by_b[1]["ms_per_call"], 3),
    }
    # the c=1 target reads the paired rounds when there are any (drift cancels within a round), else the bracket
    c1_ratio = targets["c1_paired_ratio_median"] if pairs else targets["c1_serve_p50_over_peer"]
    targets["c1_target_reads"] = "c1_paired_ratio_median" if pairs else "c1_serve_p50_over_peer"
    targets["met"] = bool(targets["c32_serve_over_peer_throughput"] >= 3.0 and c1_ratio <= 1.25 and targets["zero_5xx"])

    def cpu_per_image(rs):
        return round(statistics.mean(r["server_cpu_s_per_image"] for r in rs), 4)

    out = {
        "machine": machine(),
        "command": "python " + " ".join(sys.argv),
        "model": args["model"],
        "duration_s": a.duration,
        "max_batch_size": a.max_batch_size,
        "batch_wait_timeout_s": wait,
        "rows": rows,
        "inprocess": ceiling,
        "peer_c1_after": {
            k: peer_after[k] for k in ("concurrency", "images_per_s", "p50_ms", "p95_ms", "p99_ms", "errors_5xx")
        },
        "drift": {  # the machine's speed at the run's two ends: the in-process batch-1 call, ms
            "inprocess_batch1_ms_start": by_b[1]["ms_per_call"],
            "inprocess_batch1_ms_end": ceiling_after["ms_per_call"],
            "peer_c1_p50_ms_before_after": peer_c1,
        },
        "peer": [
            {
                k: r[k]
                for k in (
                    "concurrency",
                    "images_per_s",
                    "p50_ms",
                    "p95_ms",
                    "p99_ms",
                    "errors_5xx",
                    "server_cpu_s_per_image",
                )
            }
            for r in peer_rows
        ],
        "server_cpu_s_per_image": {
            "serve": cpu_per_image([r for r in rows if r["batching"]]),
            "serve_batching_off": cpu_per_image([r for r in rows if not r["batching"]]),
            "peer": cpu_per_image(peer_rows),
        },
        "max_replicas_seen": max((n for _, n in replica_log), default=0),
        "replicas_over_time": replica_log,
        "paired_c1": pairs,
        "targets": targets,
    }
    od = Path(a.out)
    od.mkdir(parents=True, exist_ok=True)
    (od / "serving.json").write_text(json.dumps(out, indent=2) + "\n")
    md = [
        f"# Serving load ({out['machine']})",
        "",
        f"`{out['command']}`; model `{out['model']}` at 4 steps; "
        f"{a.duration:.0f} s per cell after {a.warmup:.0f} s warm-up; closed loop, OpenAI route, n=1.",
        "",
        "| concurrency | batching | images/s | p50 ms | p95 ms | p99 ms | mean batch | sample ms/batch | 5xx | other | "
        "server CPU s/image |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['concurrency']} | {'on' if r['batching'] else 'off'} | {r['images_per_s']} | {r['p50_ms']} | "
            f"{r['p95_ms']} | {r['p99_ms']} | {r['mean_batch']} | {r['mean_sample_ms']} | {r['errors_5xx']} | "
            f"{r['errors_other']} | {r['server_cpu_s_per_image']} |"
        )
    md += [
        "",
        "In-process ceiling (the replica's work: encode, 4-step sample, PNG, base64; no HTTP):",
        "",
        "| batch | images/s | ms per call |",
        "|---|---|---|",
    ]
    md += [f"| {r['batch']} | {r['images_per_s']} | {r['ms_per_call']} |" for r in ceiling]
    md += [
        "",
        f"Max replicas seen: {out['max_replicas_seen']}.",
        "",
        "Peer: a plain FastAPI + uvicorn server in one process (`benchmarks/peer_server.py`), the same sampler, one "
        "request at a time, the same load generator:",
        "",
        "| concurrency | images/s | p50 ms | p95 ms | p99 ms | 5xx | server CPU s/image |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {r['concurrency']} | {r['images_per_s']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | "
            f"{r['errors_5xx']} | {r['server_cpu_s_per_image']} |"
            for r in peer_rows
        ],
        "",
        f"The peer's c={min(conc)} cell again after Serve's cells, Ray shut down: p50 {peer_after['p50_ms']} ms "
        f"(before: {peer_c1[0]} ms), {peer_after['images_per_s']} images/s, {peer_after['errors_5xx']} 5xx. "
        f"In-process batch 1 at the run's start {by_b[1]['ms_per_call']} ms, at its end "
        f"{ceiling_after['ms_per_call']} ms (the machine's drift during the run).",
        *paired_md(pairs, min(conc), a.paired_duration, peer_after["p50_ms"]),
        "",
        f"Server CPU seconds per image (everything outside the load generator, mean over the cells): Serve with "
        f"batching {out['server_cpu_s_per_image']['serve']}, "
        f"without {out['server_cpu_s_per_image']['serve_batching_off']}, "
        f"peer {out['server_cpu_s_per_image']['peer']}.",
        "",
        f"Targets (against the peer): c={max(conc)} Serve throughput / peer = "
        f"{targets['c32_serve_over_peer_throughput']} "
        f"(target >= 3); c={min(conc)} Serve p50 / peer p50 (target <= 1.25, read from "
        f"{targets['c1_target_reads']}): paired rounds' median {targets['c1_paired_ratio_median']}, "
        f"against the mean of the peer's cells before and after Serve's {targets['c1_serve_p50_over_peer']}, "
        f"{targets['c1_serve_p50_over_peer_before']} against the one before, "
        f"{targets['c1_serve_p50_over_peer_after']} against the one after); "
        f"zero 5xx: {targets['zero_5xx']}. All met: {targets['met']}. Ratio to the in-process ceiling at "
        f"c={max(conc)}: {targets['c32_serve_fraction_of_inprocess']}; c={min(conc)} p50 / in-process batch 1: "
        f"{targets['c1_p50_over_inprocess']} (batching off {targets['c1_p50_over_inprocess_batching_off']}).",
    ]
    (od / "serving.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
