"""Load and soak benchmark of ``moecache serve`` through the official OpenAI client over real HTTP.

Starts ``moecache serve`` (the arguments after ``--`` go to it; default: the embedded model) on a
free port of 127.0.0.1, then

* load: ``--concurrency`` streaming completions sent at once (seed i, ``--max-tokens``), repeated
  ``--repeats`` times. Checks: every response ends with a finish reason and [DONE], and its text
  equals the same request answered alone without streaming (no token lost, repeated or mixed with
  another request's); the server's completion-token count grows by exactly the sum of the answers'
  usage. Figures per repeat: latency and time-to-first-token percentiles (p50/p90/p99) and
  completion tokens/s over the wall time of the burst; reported as the median of the repeats with
  their range;
* soak: ``--soak`` requests in a row (streaming and not, completions and chat, alternating), the
  server's resident memory (RSS) sampled every ``--soak-every`` requests. Check: RSS after the first
  sample grows by less than ``--soak-max-growth-mib``.

Writes ``eval/results/serve_load/<name>.json`` (figures, checks, machine, date, command) and prints a
summary. Exits 1 when a check fails.

    .venv/bin/python eval/serve_load.py --concurrency 50 --max-tokens 32 --soak 300 --name tiny_code_cpu \\
        -- --model ../shared/data/models/qwen3moe-tiny-code --device cpu --cache-slots 48
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _metric(base: str, name: str) -> float:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base + "/metrics", timeout=60).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and not s.labels:
                return s.value
    raise KeyError(name)


async def _burst(client, model: str, n: int, max_tokens: int, seed0: int) -> list[dict]:
    async def one(i: int) -> dict:
        t0 = time.perf_counter()
        first = None
        text, finish, usage, done = "", None, None, False
        stream = await client.completions.create(model=model, prompt=f"# request {i}\ndef f{i}(", max_tokens=max_tokens,
                                                 temperature=0.8, seed=seed0 + i, stream=True,
                                                 stream_options={"include_usage": True})
        async for ev in stream:
            if ev.choices:
                if ev.choices[0].text and first is None:
                    first = time.perf_counter() - t0
                text += ev.choices[0].text
                finish = ev.choices[0].finish_reason or finish
            if ev.usage is not None:
                usage = ev.usage.completion_tokens
        done = True
        return {"i": i, "latency_s": time.perf_counter() - t0, "ttft_s": first, "text": text, "finish": finish,
                "tokens": usage, "done": done}

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def _solo(client, model: str, n: int, max_tokens: int, seed0: int) -> list[str]:
    out = []
    for i in range(n):
        r = await client.completions.create(model=model, prompt=f"# request {i}\ndef f{i}(", max_tokens=max_tokens,
                                            temperature=0.8, seed=seed0 + i)
        out.append(r.choices[0].text)
    return out


async def _soak(client, model: str, n: int, every: int, proc) -> list[dict]:
    samples = []
    for i in range(n):
        if i % every == 0:
            samples.append({"request": i, "rss_mib": proc.memory_info().rss / 2**20})
        kind = i % 3
        if kind == 0:
            await client.completions.create(model=model, prompt=f"x = {i}", max_tokens=8, seed=i)
        elif kind == 1:
            s = await client.completions.create(model=model, prompt=f"y = {i}", max_tokens=8, seed=i, stream=True)
            async for _ in s:
                pass
        else:
            await client.chat.completions.create(model=model, messages=[{"role": "user", "content": f"z{i}"}],
                                                 max_tokens=8, seed=i)
    samples.append({"request": n, "rss_mib": proc.memory_info().rss / 2**20})
    return samples


async def _phases(args, base: str, model: str, proc) -> tuple[list[dict], dict, list[dict]]:
    """The load repeats then the soak, on one event loop (the async client belongs to it)."""
    import openai

    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key=os.environ.get("MOECACHE_API_KEY", "none"),
                                max_retries=0, timeout=3600)
    repeats, checks = [], {"all_completed": True, "equal_to_solo": True, "token_counts_match": True}
    for r in range(args.repeats):
        seed0 = 1000 * r
        before = _metric(base, "moecache_completion_tokens_total")
        t0 = time.perf_counter()
        res = await _burst(client, model, args.concurrency, args.max_tokens, seed0)
        wall = time.perf_counter() - t0
        after = _metric(base, "moecache_completion_tokens_total")
        solo = await _solo(client, model, args.concurrency, args.max_tokens, seed0)
        tokens = sum(x["tokens"] or 0 for x in res)
        completed = all(x["done"] and x["finish"] in ("stop", "length") for x in res)
        equal = [x["text"] == s for x, s in zip(res, solo)]
        checks["all_completed"] &= completed
        checks["equal_to_solo"] &= all(equal)
        checks["token_counts_match"] &= (after - before) == tokens
        lat = [x["latency_s"] for x in res]
        ttft = [x["ttft_s"] for x in res if x["ttft_s"] is not None]
        repeats.append({"wall_s": wall, "completion_tokens": tokens, "tokens_per_s": tokens / wall,
                        "latency_p50_s": _pct(lat, .5), "latency_p90_s": _pct(lat, .9),
                        "latency_p99_s": _pct(lat, .99), "ttft_p50_s": _pct(ttft, .5),
                        "ttft_p90_s": _pct(ttft, .9), "ttft_p99_s": _pct(ttft, .99),
                        "responses_equal_to_solo": sum(equal), "responses": len(res),
                        "load_avg_after": os.getloadavg()})
        print(f"repeat {r}: {tokens} tokens in {wall:.1f} s ({tokens / wall:.1f} tokens/s), latency p50 "
              f"{repeats[-1]['latency_p50_s']:.2f} s p99 {repeats[-1]['latency_p99_s']:.2f} s, "
              f"{sum(equal)}/{len(res)} equal to solo", flush=True)
    soak = await _soak(client, model, args.soak, args.soak_every, proc) if args.soak else []
    await client.close()
    return repeats, checks, soak


def main() -> int:
    argv = sys.argv[1:]
    serve_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--soak", type=int, default=300)
    ap.add_argument("--soak-every", type=int, default=25)
    ap.add_argument("--soak-max-growth-mib", type=float, default=32.0)
    ap.add_argument("--name", default="default")
    ap.add_argument("--startup-timeout", type=float, default=600)
    args = ap.parse_args(own)

    import httpx
    import psutil

    port = _free_port()
    cmd = [sys.executable, "-m", "moecache", "serve", "--port", str(port), "--log-level", "warning",
           "--max-queue", str(max(64, args.concurrency)), *serve_args]
    print("server:", shlex.join(cmd), flush=True)
    server = subprocess.Popen(cmd, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + args.startup_timeout
        while True:
            if server.poll() is not None:
                print("the server exited", file=sys.stderr)
                return 1
            try:
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                print("the server did not come up", file=sys.stderr)
                return 1
            time.sleep(0.5)
        model = httpx.get(base + "/v1/models").json()["data"][0]["id"]
        proc = psutil.Process(server.pid)
        repeats, checks, soak = asyncio.run(_phases(args, base, model, proc))
        growth = (soak[-1]["rss_mib"] - soak[1]["rss_mib"]) if len(soak) > 2 else 0.0
        if soak:
            checks["soak_memory_flat"] = growth < args.soak_max_growth_mib
            print(f"soak: {args.soak} requests, RSS {soak[1]['rss_mib']:.1f} -> {soak[-1]['rss_mib']:.1f} MiB "
                  f"(growth {growth:.1f} MiB after the first sample)", flush=True)
        summary = {k: {"median": statistics.median(x[k] for x in repeats), "min": min(x[k] for x in repeats),
                       "max": max(x[k] for x in repeats)}
                   for k in ("tokens_per_s", "latency_p50_s", "latency_p90_s", "latency_p99_s", "ttft_p50_s",
                             "ttft_p99_s")}
        import torch

        result = {
            "what": f"moecache serve: {args.concurrency} concurrent streaming completions x {args.repeats} repeats, "
                    f"{args.max_tokens} tokens each (temperature 0.8, seeded), then a {args.soak}-request soak",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join([sys.executable.replace(str(ROOT) + "/", ""), *sys.argv]),
            "server_command": shlex.join(cmd[1:]),
            "machine": {"platform": platform.platform(), "python": platform.python_version(),
                        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                        "load_avg_at_end": os.getloadavg()},
            "model": model, "checks": checks, "summary": summary, "repeats": repeats,
            "soak": {"requests": args.soak, "rss_samples": soak, "growth_mib": growth,
                     "max_growth_mib": args.soak_max_growth_mib},
        }
        from moecache.atomic import write_json_atomic

        out = ROOT / "eval" / "results" / "serve_load" / f"{args.name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(str(out), result)
        print("checks:", checks)
        print(f"tokens/s median {summary['tokens_per_s']['median']:.1f} "
              f"[{summary['tokens_per_s']['min']:.1f}, {summary['tokens_per_s']['max']:.1f}]; latency p50 "
              f"{summary['latency_p50_s']['median']:.2f} s, p99 {summary['latency_p99_s']['median']:.2f} s")
        print(f"wrote {out}")
        return 0 if all(checks.values()) else 1
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
