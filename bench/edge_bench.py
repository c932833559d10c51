"""The edge (issue 23): keyed latency during a flood of unauthenticated 4 MiB bodies, and what the
edge costs on the normal path, side by side in one run on one Ray cluster.

Two apps of the same checkpoint (raylm's tiny test model, so that the engine's time does not hide
the request path's: one replica each) run at once:
`edge` (raylm's default: the gate in a light ingress deployment, the LLM replica behind it by
handle) and `in-replica` (serve.edge.enabled=false: the gate inside the LLM replica, the design
before the edge). Keyed clients (4 loops of 8-token completions) measure latency p50/p99 for
DURATION_S in each scenario:

- quiet: no flood;
- ideal edge: the flood goes to a bare asyncio server that answers 401 after the headers without
  reading the body (what the load generator itself costs on 2 cores), keyed requests to raylm;
- flood: the flood and the keyed requests go to the same raylm app (by HAProxy, the default);
- flood, Python proxy: the same, both through Serve's Python proxy.

The flood: 16 connections from another process, each sending requests with a 4 MiB body and no
key, one after the other. The goal: keyed p99 during the flood <= 1.3x the ideal edge's, no 503
for keyed clients. Clients reach both apps on serve.port, raylm's default path: Ray Serve's
HAProxy ingress (serve.ingress=haproxy), which forwards to the app's ingress replica on its own
port. Overhead: serve_bench's measurements (TTFT at c=1 streamed, 32 x 32-token requests at c=32)
for both apps by each way in: HAProxy, Ray Serve's Python proxy (HAProxy keeps one behind it as
its fallback, on its own port: the default path before this issue) and the ingress replica's own
port. The goal: the default path (edge, HAProxy) costs <= 10% at c=32 against the path before the
edge (gate in the replica, Python proxy).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import stage_main, start_ray  # noqa: E402
from report import ratio  # noqa: E402
from serve_bench import KEY, PORT, _http, serve_config  # noqa: E402

IDEAL_PORT = 8312
FLOOD_CONNECTIONS, FLOOD_BODY_BYTES, CHUNK = 16, 4 * 2**20, 64 * 2**10
KEYED_CLIENTS = 4


# ------------------------------------------------------------------ the ideal edge and the flood


async def _ideal_edge(ready) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", IDEAL_PORT)
    ready.set()
    async with server:
        await server.serve_forever()


def ideal_edge(ready) -> None:
    asyncio.run(_ideal_edge(ready))


async def _flood(port: int, path: str, stop_at: float, counts: dict) -> None:
    head = (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"content-length: {FLOOD_BODY_BYTES}\r\n\r\n").encode()
    chunk = b"x" * CHUNK

    async def one_connection() -> None:
        while time.time() < stop_at:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(head)
                status_task = asyncio.ensure_future(reader.readline())
                status_task.add_done_callback(lambda t: t.cancelled() or t.exception())  # reset: counted as 0
                sent = 0
                while sent < FLOOD_BODY_BYTES and not status_task.done():
                    writer.write(chunk)
                    await writer.drain()
                    sent += CHUNK
                line = await asyncio.wait_for(status_task, 30)
                status = int(line.split()[1]) if line.startswith(b"HTTP/") else 0
            except (ConnectionError, asyncio.TimeoutError, OSError, ValueError, IndexError):
                status = 0
            counts[status] = counts.get(status, 0) + 1
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                pass

    await asyncio.gather(*(one_connection() for _ in range(FLOOD_CONNECTIONS)))


def flood(port: int, path: str, duration_s: float, out) -> None:
    counts: dict = {}
    asyncio.run(_flood(port, path, time.time() + duration_s, counts))
    out.put(counts)


# ------------------------------------------------------------------ keyed clients


async def keyed(url: str, duration_s: float) -> dict:
    import aiohttp

    body = {"model": "raylm", "prompt": "First Citizen:", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    lat, statuses = [], []
    stop_at = time.perf_counter() + duration_s

    async def loop(session) -> None:
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            async with session.post(f"{url}/v1/completions", json=body,
                                    headers={"Authorization": f"Bearer {KEY}"}) as resp:
                await resp.read()
                statuses.append(resp.status)
            lat.append(time.perf_counter() - t)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(loop(session) for _ in range(KEYED_CLIENTS)))
    lat.sort()
    return {"requests": len(lat), "p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * lat[int(0.99 * (len(lat) - 1))],
            "non_200": sorted(s for s in statuses if s != 200)[:20], "n_503": statuses.count(503)}


def scenario(url: str, flood_target, duration_s: float) -> dict:
    """Keyed latency at `url` while the flood hits `flood_target` ((port, path) or None)."""
    proc, out = None, mp.Queue()
    if flood_target:
        proc = mp.Process(target=flood, args=(*flood_target, duration_s + 3, out), daemon=True)
        proc.start()
        time.sleep(3)  # the flood is running before the keyed clients start
    result = asyncio.run(keyed(url, duration_s))
    if proc:
        result["flood_responses"] = out.get(timeout=120)
        proc.join(30)
    return result


# ------------------------------------------------------------------ the stage


def _setup(args) -> tuple:
    """The tiny checkpoint, a key file, the ideal edge (started) and a Ray cluster started as raylm
    starts one (serve.ingress's default: HAProxy on serve.port, raylm's HAProxy rules on)."""
    from raylm.serve.tiny import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(os.path.join(args.workdir, "tiny"))
    key_file = os.path.join(args.workdir, "keys")
    Path(key_file).write_text(KEY + "\n")
    ready = mp.Event()
    ideal = mp.Process(target=ideal_edge, args=(ready,), daemon=True)
    ideal.start()
    ready.wait(30)
    start_ray(num_cpus=4)
    return ckpt, key_file, ideal


FLOOD_RUNS = 3  # issue 35: keyed p99 under the flood <= 1.5x the ideal edge's in each of 3 runs


def run_flood_only(args) -> dict:
    """RAYLM_BENCH_EDGE_ONLY=flood: the default app alone (edge, by HAProxy, raylm's HAProxy rules
    on), FLOOD_RUNS pairs of (ideal edge, flood at raylm), each pair side by side."""
    from ray import serve

    from raylm.serve.app import deploy

    duration_s = 12 if args.quick else 20
    ckpt, key_file, ideal = _setup(args)
    cfg = serve_config([f"serve.port={PORT}", f"serve.api_key_file={key_file}", "serve.api_key_env=RAYLM_BENCH_NO_SUCH_VAR",
                        "serve.autoscaling.min_replicas=1", "serve.autoscaling.max_replicas=1", "serve.app_name=edge",
                        "serve.route_prefix=/edge"])
    url = deploy(cfg, ckpt)
    scenario(url, None, 5)  # warm-up
    runs = []
    for i in range(FLOOD_RUNS):
        pair = {"ideal edge": scenario(url, (IDEAL_PORT, "/v1/completions"), duration_s),
                "flood": scenario(url, (PORT, "/edge/v1/completions"), duration_s)}
        pair["ratio"] = ratio(pair["flood"]["p99_ms"], pair["ideal edge"]["p99_ms"])
        print(f"run {i + 1}", pair, flush=True)
        runs.append(pair)
    serve.shutdown()
    ideal.terminate()
    rows = [[i + 1, sc, r[sc]["requests"], r[sc]["p50_ms"], r[sc]["p99_ms"], r[sc]["n_503"],
             str(r[sc].get("flood_responses", "")), r["ratio"] if sc == "flood" else ""]
            for i, r in enumerate(runs) for sc in ("ideal edge", "flood")]
    ratios = [r["ratio"] for r in runs]
    return {
        "title": "15. Floods stay outside: keyed p99 under a flood, 3 runs against the ideal edge (issue 35)",
        "note": run_flood_only.__doc__ + " " + __doc__.split("\n\n", 1)[1].split("\n\n")[0].strip(),
        "tables": [{"name": f"keyed clients ({KEYED_CLIENTS} loops of 8-token completions, {duration_s} s each)",
                    "columns": ["run", "flood aimed at", "requests", "p50 ms", "p99 ms", "503s",
                                "flood responses by status", "p99 vs ideal edge"],
                    "rows": rows}],
        "goals": [{"goal": "keyed p99 under a 16-connection flood of keyless 4 MiB bodies <= 1.5x the ideal edge's, "
                           f"in each of {FLOOD_RUNS} runs",
                   "value": ", ".join(f"{x:.2f}x" for x in ratios), "met": all(x <= 1.5 for x in ratios)},
                  {"goal": "no 503 for keyed clients during the flood",
                   "value": str(sum(r["flood"]["n_503"] for r in runs)),
                   "met": all(r["flood"]["n_503"] == 0 for r in runs)}],
        "raw": {"runs": runs},
    }


def run(args) -> dict:
    if os.environ.get("RAYLM_BENCH_EDGE_ONLY") == "flood":
        return run_flood_only(args)
    from ray import serve

    from raylm.serve.app import deploy, direct_urls

    duration_s = 12 if args.quick else 25
    ckpt, key_file, ideal = _setup(args)
    python_proxy = int(os.environ["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"])  # HAProxy's fallback: Serve's own proxy
    urls, direct = {}, {}
    for name, edge in (("edge", "true"), ("in-replica", "false")):
        app = name.replace("-", "")
        cfg = serve_config([f"serve.port={PORT}", f"serve.api_key_file={key_file}", f"serve.edge.enabled={edge}",
                            "serve.api_key_env=RAYLM_BENCH_NO_SUCH_VAR", "serve.autoscaling.min_replicas=1",
                            "serve.autoscaling.max_replicas=1", f"serve.app_name={app}",
                            f"serve.route_prefix=/{app}"])
        urls[name] = deploy(cfg, ckpt)[0]
        (direct[name],) = direct_urls(cfg.serve)  # the ingress replica's own port: the edge's, or the LLM replica's
    res: dict = {}
    for name, url in urls.items():
        prefix = "/" + name.replace("-", "")
        res[name] = {"quiet": scenario(url, None, duration_s),
                     "ideal edge": scenario(url, (IDEAL_PORT, "/v1/completions"), duration_s),
                     "flood": scenario(url, (PORT, f"{prefix}/v1/completions"), duration_s),
                     # keyed clients and the flood both through Serve's Python proxy (HAProxy's fallback)
                     "flood, Python proxy": scenario(url.replace(f":{PORT}/", f":{python_proxy}/"),
                                                     (python_proxy, f"{prefix}/v1/completions"), duration_s)}
        print(name, res[name], flush=True)
    rounds = 3 if args.quick else 5
    ways = {name: (("HAProxy", urls[name]), ("Python proxy", urls[name].replace(f":{PORT}/", f":{python_proxy}/")),
                   ("own port", direct[name])) for name in urls}
    overhead = {f"{name}, {way}": asyncio.run(_http(url, rounds)) for name in urls for way, url in ways[name]}
    print("overhead", overhead, flush=True)
    serve.shutdown()
    ideal.terminate()

    rows = []
    for name in urls:
        for sc in ("quiet", "ideal edge", "flood", "flood, Python proxy"):
            r = res[name][sc]
            rows.append([name, sc, r["requests"], r["p50_ms"], r["p99_ms"], r["n_503"],
                         str(r.get("flood_responses", ""))])
    flood_ratio = {n: ratio(res[n]["flood"]["p99_ms"], res[n]["ideal edge"]["p99_ms"]) for n in urls}
    e, d = overhead["edge, HAProxy"], overhead["in-replica, Python proxy"]
    e_py = overhead["edge, Python proxy"]
    goals = [
        {"goal": "keyed p99 during a 16-connection flood of unauthenticated 4 MiB bodies <= 1.3x the ideal edge's",
         "value": f"{flood_ratio['edge']:.2f}x (edge by HAProxy; by Serve's Python proxy "
                  f"{ratio(res['edge']['flood, Python proxy']['p99_ms'], res['edge']['ideal edge']['p99_ms']):.2f}x; "
                  f"gate in the replica by HAProxy {flood_ratio['in-replica']:.2f}x)",
         "met": flood_ratio["edge"] <= 1.3},
        {"goal": "no 503 for keyed clients during the flood",
         "value": f"{res['edge']['flood']['n_503']} (edge)", "met": res["edge"]["flood"]["n_503"] == 0},
        {"goal": "the default path (edge, HAProxy ingress) costs <= 10% throughput at c=32 against the path "
                 "before the edge (gate in the replica, Serve's Python proxy)",
         "value": f"{ratio(e['c32_tokens_per_s'], d['c32_tokens_per_s']):.2f}x ({e['c32_tokens_per_s']:.0f} vs "
                  f"{d['c32_tokens_per_s']:.0f} tokens/s; the edge through the Python proxy: "
                  f"{ratio(e_py['c32_tokens_per_s'], d['c32_tokens_per_s']):.2f}x)",
         "met": ratio(e["c32_tokens_per_s"], d["c32_tokens_per_s"]) >= 0.9},
    ]
    return {
        "title": "13. The edge: keyed latency under a flood, and its cost (issue 23)",
        "note": __doc__.split("\n\n", 1)[1].strip(),
        "tables": [
            {"name": f"keyed clients ({KEYED_CLIENTS} loops of 8-token completions, {duration_s} s each)",
             "columns": ["app", "scenario", "requests", "p50 ms", "p99 ms", "503s", "flood responses by status"],
             "rows": rows},
            {"name": "normal path (serve_bench's measurements) by each way in",
             "columns": ["app, way in", "TTFT c=1 ms", "1-token ms", "c=32 tokens/s",
                         "vs in-replica by Python proxy"],
             "rows": [[n, o["ttft_ms"], o["one_token_alone_ms"], o["c32_tokens_per_s"],
                       ratio(o["c32_tokens_per_s"], d["c32_tokens_per_s"])] for n, o in overhead.items()]},
        ],
        "goals": goals,
        "raw": {"scenarios": res, "overhead": overhead},
    }


if __name__ == "__main__":
    stage_main(run)
