"""Load and abuse the server the way a hostile or careless client would (all on loopback), and
print one JSON line per scenario:

- ``streams``: 64 concurrent greedy streaming clients; each answer compared with the same request
  sent alone (``equal_to_solo`` of ``clients``), errors, latency;
- ``burst``: 400 and 1000 concurrent requests: how many got 200 / 429 (past ``--max-queue``),
  latency, the server's RSS before and peak during;
- ``oversized``: 50 MB announced by Content-Length and 20 MB streamed without one: time to the
  413, a concurrent ``GET /v1/models`` latency, RSS after;
- ``abandoned``: 8 non-streaming requests whose clients leave after 0.5 s, then how long the
  slots take to free and how long a small request takes;
- ``hostile``: nested brackets, a lone surrogate, a 1000-prompt list, a bad ``stream``: statuses
  (no 5xx); the server's 5xx count from /metrics at the end;
- ``throughput`` (not in the default set): tokens/s of 1 stream and of ``--streams`` (8)
  concurrent streams (``--max-tokens`` each, EOS ignored), alternating ``--repeats`` times, one
  line per run, then the medians, their spread and the ratio.

It starts ``layercake serve`` on the embedded model (or ``--model``) unless ``--url`` names a
running server (then RSS is read only with ``--pid``). Needs httpx. Run it alone:

  flock /tmp/layercake-bench.lock python benchmarks/stress.py
  flock /tmp/layercake-bench.lock python benchmarks/stress.py --only throughput --max-tokens 64
  python benchmarks/stress.py --url http://127.0.0.1:8000 --pid 1234 --only burst
"""

from __future__ import annotations

import argparse
import asyncio
import json
import select
import socket
import statistics
import subprocess
import sys
import time

import httpx

SCENARIOS = ["streams", "burst", "oversized", "abandoned", "hostile", "throughput"]
WORDS = "the cake layer oven flour sugar butter egg milk cream berry apple lemon honey salt".split()


def rss_mb(pid: int | None, field: str = "VmRSS") -> float | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3)


def emit(row: dict) -> None:
    print(json.dumps(row), flush=True)


def start_server(a: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "layercake.cli", "serve", "--port", str(port)]
    cmd += ["--batch-size", str(a.batch_size), "--max-queue", str(a.max_queue)]
    cmd += ["--model", a.model] if a.model else []
    cmd += a.serve_args.split() if a.serve_args else []
    log = open(a.server_log, "w") if a.server_log else subprocess.DEVNULL  # noqa: SIM115
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900  # a compiled step is built before the server listens
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                up = round(time.time() - t0, 1)
                emit({"scenario": "start", "command": cmd[3:], "startup_s": up})
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start")


def prompt(i: int) -> str:
    return " ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(3 + i % 11))


async def streams(c: httpx.AsyncClient, url: str, n: int, max_tokens: int) -> dict:
    async def ask(i: int, stream: bool) -> tuple[str, float]:
        body = {"prompt": prompt(i), "max_tokens": max_tokens, "temperature": 0, "stream": stream}
        t0, text = time.perf_counter(), ""
        if not stream:
            r = await c.post(f"{url}/v1/completions", json=body)
            r.raise_for_status()
            return r.json()["choices"][0]["text"], time.perf_counter() - t0
        async with c.stream("POST", f"{url}/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise RuntimeError(chunk["error"]["message"])
                    text += chunk["choices"][0]["text"]
        return text, time.perf_counter() - t0

    solo = [(await ask(i, False))[0] for i in range(n)]
    t0 = time.perf_counter()
    got = await asyncio.gather(*(ask(i, True) for i in range(n)), return_exceptions=True)
    wall = time.perf_counter() - t0
    ok = [g for g in got if not isinstance(g, BaseException)]
    return {
        "scenario": "streams",
        "clients": n,
        "errors": n - len(ok),
        "equal_to_solo": sum(1 for g, s in zip(got, solo) if isinstance(g, tuple) and g[0] == s),
        "wall_s": round(wall, 2),
        "latency_p50_s": pct([t for _, t in ok], 0.5),
        "latency_max_s": pct([t for _, t in ok], 1.0),
    }


async def burst(c: httpx.AsyncClient, url: str, n: int, pid: int | None) -> dict:
    peak, rss0 = [0.0], rss_mb(pid)

    async def watch() -> None:
        while True:
            peak[0] = max(peak[0], rss_mb(pid) or 0.0)
            await asyncio.sleep(0.2)

    async def ask(i: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        try:
            r = await c.post(f"{url}/v1/completions", json={"prompt": prompt(i), "max_tokens": 8})
            return r.status_code, time.perf_counter() - t0
        except httpx.HTTPError:
            return -1, time.perf_counter() - t0

    w = asyncio.ensure_future(watch())
    t0 = time.perf_counter()
    got = await asyncio.gather(*(ask(i) for i in range(n)))
    wall = time.perf_counter() - t0
    w.cancel()
    codes: dict[str, int] = {}
    for s, _ in got:
        codes[str(s)] = codes.get(str(s), 0) + 1
    return {
        "scenario": "burst",
        "requests": n,
        "status": codes,
        "wall_s": round(wall, 2),
        "ok_latency_p50_s": pct([t for s, t in got if s == 200], 0.5),
        "ok_latency_max_s": pct([t for s, t in got if s == 200], 1.0),
        "rejected_latency_max_s": pct([t for s, t in got if s == 429], 1.0),
        "rss_before_mb": rss0,
        "rss_peak_mb": peak[0] or None,
    }


def reject_time(url: str, size: int, announce: bool) -> tuple[str, float]:
    """Send up to ``size`` bytes of body (with Content-Length, or chunked) until the server
    answers; its status line and the seconds it took."""
    host, port = url.removeprefix("http://").split(":")
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {size}\r\n" if announce else "Transfer-Encoding: chunked\r\n"
    piece = b"cake " * 200_000
    unit = piece if announce else b"%x\r\n%s\r\n" % (len(piece), piece)
    t0 = time.perf_counter()
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall((head + "\r\n").encode())
        s.setblocking(False)
        sent = off = 0
        while sent < size:
            readable, writable, _ = select.select([s], [s], [], 30)
            if readable or not writable:
                break
            try:
                n = s.send(unit[off : off + 65536])
            except BlockingIOError:
                continue
            except OSError:  # the server closed the connection after answering
                break
            sent, off = sent + n, (off + n) % len(unit)
        s.settimeout(30)
        try:
            line = s.recv(200).split(b"\r\n")[0].decode()
        except OSError as e:
            line = f"no answer ({e})"
    return line, time.perf_counter() - t0


async def oversized(c: httpx.AsyncClient, url: str, pid: int | None) -> dict:
    rows = {}
    for size, announce in ((50_000_000, True), (20_000_000, False)):
        job = asyncio.ensure_future(asyncio.to_thread(reject_time, url, size, announce))
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        await c.get(f"{url}/v1/models")
        models_s = time.perf_counter() - t0
        status, took = await job
        key = f"{size // 1_000_000}MB_{'length' if announce else 'chunked'}"
        rows[key] = {"status": status, "reject_s": round(took, 3), "models_s": round(models_s, 3)}
    return {"scenario": "oversized", **rows, "rss_after_mb": rss_mb(pid)}


async def abandoned(c: httpx.AsyncClient, url: str) -> dict:
    body = {"prompt": prompt(3), "max_tokens": 256, "temperature": 0, "ignore_eos": True}

    async def leave() -> None:
        try:
            await c.post(f"{url}/v1/completions", json=body, timeout=0.5)
        except httpx.TimeoutException:
            pass

    await asyncio.gather(*(leave() for _ in range(8)))
    t0 = time.perf_counter()
    while (await c.get(f"{url}/health")).json()["slots_in_use"] and time.perf_counter() - t0 < 60:
        await asyncio.sleep(0.05)
    freed = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = await c.post(f"{url}/v1/completions", json={"prompt": prompt(4), "max_tokens": 8})
    return {
        "scenario": "abandoned",
        "clients_gone": 8,
        "slots_freed_s": round(freed, 3),
        "next_request_status": r.status_code,
        "next_request_s": round(time.perf_counter() - t0, 3),
    }


async def hostile(c: httpx.AsyncClient, url: str) -> dict:
    cases = {
        "nested_100k": b"[" * 100_000,
        "surrogate": b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
        "prompts_1000": json.dumps({"prompt": ["cake"] * 1000, "max_tokens": 1}).encode(),
        "stream_yes": b'{"prompt": "cake", "stream": "yes"}',
        "stop_10000": json.dumps({"prompt": "cake", "stop": ["x"] * 10_000}).encode(),
        "unknown_model": b'{"model": "gpt-4o", "prompt": "cake"}',
        "tiny_temperature": b'{"prompt": "cake", "max_tokens": 4, "temperature": 1e-300}',
    }
    out = {}
    for name, raw in cases.items():
        path = "chat/completions" if b"messages" in raw else "completions"
        r = await c.post(f"{url}/v1/{path}", content=raw)
        out[name] = r.status_code
    metrics = (await c.get(f"{url}/metrics")).text
    fives = sum(
        int(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("layercake_requests_total") and 'status="5' in line
    )
    return {"scenario": "hostile", "status": out, "server_5xx_total": fives}


async def throughput(c: httpx.AsyncClient, url: str, a: argparse.Namespace) -> None:
    """1 stream vs ``a.streams`` concurrent ones, alternating: a line per run, then medians."""

    async def one(i: int) -> int:
        body = {
            "prompt": prompt(i),
            "max_tokens": a.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        n = 0
        async with c.stream("POST", f"{url}/v1/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: {") and '"usage"' in line:
                    n = (json.loads(line[6:]).get("usage") or {}).get("completion_tokens", n)
        return n

    async def run(n: int) -> dict:
        t0 = time.perf_counter()
        tokens = await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - t0
        return {
            "scenario": "throughput_run",
            "streams": n,
            "tokens": sum(tokens),
            "wall_s": round(wall, 3),
            "tok_s": round(sum(tokens) / wall, 2),
        }

    await run(a.streams)  # warm-up: every row of the engine's cache, allocator
    rates: dict[int, list[float]] = {1: [], a.streams: []}
    for _ in range(a.repeats):
        for n in (1, a.streams):  # alternate: drift in the machine hits both
            row = await run(n)
            emit(row)
            rates[n].append(row["tok_s"])
    one_s, many = rates[1], rates[a.streams]
    pairs = [m / o for o, m in zip(one_s, many)]
    emit({"scenario": "throughput", "streams": a.streams, "max_tokens": a.max_tokens,
          "repeats": a.repeats, "one_stream_tok_s_median": statistics.median(one_s),
          "one_stream_tok_s_runs": one_s, "many_streams_tok_s_median": statistics.median(many),
          "many_streams_tok_s_runs": many,
          "ratio_median": round(statistics.median(many) / statistics.median(one_s), 2),
          "ratio_range_paired": [round(min(pairs), 2), round(max(pairs), 2)]})  # fmt: skip


async def main_async(a: argparse.Namespace, url: str, pid: int | None) -> None:
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=600, limits=limits) as c:
        todo = a.only or SCENARIOS[:-1]
        if "streams" in todo:
            emit(await streams(c, url, a.clients, a.max_tokens))
        if "burst" in todo:
            for n in (400, 1000):
                emit(await burst(c, url, n, pid))
        if "oversized" in todo:
            emit(await oversized(c, url, pid))
        if "abandoned" in todo:
            emit(await abandoned(c, url))
        if "hostile" in todo:
            emit(await hostile(c, url))
        if a.only and "throughput" in todo:
            await throughput(c, url, a)
        health = (await c.get(f"{url}/health")).json()
    rss = {"rss_mb": rss_mb(pid), "peak_rss_mb": rss_mb(pid, "VmHWM")}
    emit({"scenario": "end", "health": health, **rss})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (default: start one)")
    p.add_argument("--pid", type=int, help="the running server's pid, for RSS")
    p.add_argument("--model", help="model for the started server (default: embedded)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--only", nargs="+", choices=SCENARIOS)
    p.add_argument("--streams", type=int, default=8, help="throughput: concurrent streams")
    p.add_argument("--repeats", type=int, default=3, help="throughput: alternations")
    p.add_argument("--serve-args", help="more flags for the started server, e.g. '--no-compile'")
    p.add_argument("--server-log", help="write the started server's stderr here")
    a = p.parse_args()
    proc = None
    if a.url:
        url, pid = a.url.rstrip("/"), a.pid
    else:
        proc, url = start_server(a)
        pid = proc.pid
    try:
        asyncio.run(main_async(a, url, pid))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
