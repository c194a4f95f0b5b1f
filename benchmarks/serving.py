"""Serving benchmark: TTFT, TPOT, ITL and throughput as vLLM's benchmark_serving reports them.

    python -m benchmarks.serving --model_path=DIR [--slots=16] [--num_prompts=32] [--max_tokens=64]
    python -m benchmarks.serving --base_url=http://127.0.0.1:8000 --model=NAME     # an already running server

Runs each concurrency level in --concurrency (default "1,16"): `num_prompts` streamed chat requests with at most
that many in flight, greedy, ignoring nothing (stop tokens end a request early; the token counts are measured).
Per request: TTFT = time to the first content chunk; TPOT = (latency - TTFT) / (output tokens - 1);
ITL = gaps between content chunks. Reports mean/median/p99 of each (ms), request and output-token throughput.
With --model_path the server is started in-process on a free port (uvicorn in a thread).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import threading
import time


def _pct(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def _summary(xs):
    return {"mean": statistics.fmean(xs) * 1e3 if xs else float("nan"), "median": _pct(xs, 50) * 1e3,
            "p99": _pct(xs, 99) * 1e3}


async def _one(client, model, prompt, max_tokens):
    t0 = time.perf_counter()
    ttft, last, itl, n_out = None, None, [], 0
    stream = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                  max_tokens=max_tokens, temperature=0.0, stream=True,
                                                  stream_options={"include_usage": True})
    async for ch in stream:
        now = time.perf_counter()
        if ch.choices and ch.choices[0].delta.content:
            if ttft is None:
                ttft = now - t0
            else:
                itl.append(now - last)
            last = now
        if ch.usage:
            n_out = ch.usage.completion_tokens
    latency = time.perf_counter() - t0
    return {"ttft": ttft if ttft is not None else latency, "latency": latency, "itl": itl, "n_out": n_out}


async def run_level(base_url, model, concurrency, num_prompts, max_tokens, api_key="x") -> dict:
    import openai  # pylint: disable=import-outside-toplevel
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=api_key, max_retries=0, timeout=600)
    sem = asyncio.Semaphore(concurrency)
    prompts = [f"Request {i}: write some Python." for i in range(num_prompts)]

    async def limited(p):
        async with sem:
            return await _one(client, model, p, max_tokens)
    # Compile outside the measurement: two warm-up rounds at this concurrency (prefill/decode buckets).
    for _ in range(2):
        await asyncio.gather(*[_one(client, model, f"warm up {i}", max_tokens) for i in range(concurrency)])
    t0 = time.perf_counter()
    res = await asyncio.gather(*[limited(p) for p in prompts])
    dur = time.perf_counter() - t0
    out_tokens = sum(r["n_out"] for r in res)
    tpot = [(r["latency"] - r["ttft"]) / (r["n_out"] - 1) for r in res if r["n_out"] > 1]
    return {"concurrency": concurrency, "num_prompts": num_prompts, "duration_s": dur,
            "request_throughput": num_prompts / dur, "output_throughput": out_tokens / dur,
            "total_output_tokens": out_tokens, "ttft_ms": _summary([r["ttft"] for r in res]),
            "tpot_ms": _summary(tpot), "itl_ms": _summary([x for r in res for x in r["itl"]])}


def _start_server(model_path, name, slots, steps_per_sync):
    import uvicorn  # pylint: disable=import-outside-toplevel

    import mosaicjax  # pylint: disable=import-outside-toplevel
    from mosaicjax.serving import create_app  # pylint: disable=import-outside-toplevel
    app = create_app({name: mosaicjax.load_lm(model_path, progress=False)}, slots=slots,
                     steps_per_sync=steps_per_sync)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_path", help="checkpoint to serve in-process")
    ap.add_argument("--base_url", help="an already running server")
    ap.add_argument("--model", default="bench")
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--steps_per_sync", type=int, default=1)
    ap.add_argument("--num_prompts", type=int, default=32)
    ap.add_argument("--max_tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,16")
    args = ap.parse_args(argv)
    server = None
    if args.base_url is None:
        if not args.model_path:
            ap.error("give --model_path or --base_url")
        base_url, server = _start_server(args.model_path, args.model, args.slots, args.steps_per_sync)
    else:
        base_url = args.base_url
    results = [asyncio.run(run_level(base_url, args.model, int(c), args.num_prompts, args.max_tokens))
               for c in args.concurrency.split(",")]
    for r in results:
        print(json.dumps(r))
    if len(results) >= 2:
        print(json.dumps({"throughput_ratio": results[-1]["output_throughput"] / results[0]["output_throughput"]}))
    if server is not None:
        server.should_exit = True
    return results


if __name__ == "__main__":
    main()
