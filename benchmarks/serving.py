"""Serving benchmark: TTFT, TPOT, ITL and throughput as vLLM's benchmark_serving reports them, plus the
single-stream decode rate of transformers' generate on the same checkpoint.

    python -m benchmarks.serving                                   # everything below, on the default checkpoint
    python -m benchmarks.serving --model_path=DIR [--quantize=int8] [--dtype=bfloat16] [--no_transformers]
    python -m benchmarks.serving --base_url=http://127.0.0.1:8000 --model=NAME     # an already running server

Default checkpoint: benchmarks/decode.py's small DBRX (d_model 256, 8 heads / 2 kv, 4 layers, 8 experts top-2,
ffn 512, vocab 4096, random std-0.02 weights) with max_seq_len 256 (as benchmarks/decode.py: the power of two that fits prompt + new tokens), a byte-level BPE tokenizer trained on the
Python standard library and a ChatML template, written once as a Hugging Face folder (transformers'
save_pretrained) under --workdir.

The server is `python -m mosaicjax.serve` in a subprocess (its own process, as a deployment; it warms up before
/health says ready), the client is httpx in this process, reading the SSE lines itself (as vLLM's benchmark does
with aiohttp; the openai SDK's per-chunk parsing would compete with the server for the same 2 cores). Each concurrency level runs
`num_prompts` streamed chat requests with at most that many in flight, greedy, `ignore_eos` (every request
generates exactly --max_tokens tokens), after one untimed warm-up round at that concurrency. Per request:
TTFT = time to the first content chunk; TPOT = (latency - TTFT) / (output tokens - 1); ITL = gaps between
content chunks. Reported: mean / median / p99 of each (ms), request and output-token throughput, and
single-stream decode tokens/s = 1000 / mean TPOT at concurrency 1.

transformers: after the server has exited, DbrxForCausalLM.from_pretrained(the same folder) runs greedy generate
at batch 1 on the same prompt token ids (the server's chat template, from /tokenize) for max_tokens new tokens
(min_new_tokens = max_new_tokens, no EOS), float32, SDPA, torch threads = CPU count; its decode tokens/s is
(n - 1) / (t_last_token - t_first_token), stamped by a streamer -- the same definition as TPOT.

Ratios printed: single-stream decode mosaicjax / transformers (target >= 2), and output-token throughput at the
highest concurrency / concurrency 1 (target >= 6 at 16 streams).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

if __package__ in (None, ''):  # `python benchmarks/serving.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")
SPECIALS = ['<|endoftext|>', '<|pad|>', '<|im_start|>', '<|im_end|>']
PROMPT = ("Write a Python function that parses a CSV file of sensor readings (timestamp, sensor id, value), "
          "drops malformed rows, resamples every sensor to one reading per minute with linear interpolation, "
          "and returns a dict from sensor id to a list of (minute, value) pairs. Explain each step briefly.")


# ------------------------------------------------------------------------------------------------ checkpoint
def build_checkpoint(folder: str, seed: int = 0) -> str:
    """The default benchmark checkpoint (see the module docstring); reused when already there."""
    if os.path.exists(os.path.join(folder, 'config.json')):
        return folder
    import glob  # pylint: disable=import-outside-toplevel

    import numpy as np  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel

    from benchmarks import dbrx_config  # pylint: disable=import-outside-toplevel
    from benchmarks import decode as decode_bench  # pylint: disable=import-outside-toplevel
    from mosaicjax.checkpoints import hf_dbrx  # pylint: disable=import-outside-toplevel
    cfg = dbrx_config(decode_bench.DEFAULTS, max_seq_len=256)
    os.makedirs(folder, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    stdlib = os.path.dirname(os.__file__)
    files = sorted(glob.glob(os.path.join(stdlib, '*.py')))[:200]
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train(files, trainer)
    tok.save(os.path.join(folder, 'tokenizer.json'))
    with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
        json.dump({'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': '<|endoftext|>',
                   'eos_token': '<|endoftext|>', 'pad_token': '<|pad|>', 'unk_token': '<|endoftext|>',
                   'model_max_length': cfg.max_seq_len, 'chat_template': CHATML}, f, indent=1)
    hf_cfg = transformers.DbrxConfig(**cfg.to_hf_dict())
    model = transformers.DbrxForCausalLM(hf_cfg).eval()
    rng = np.random.default_rng(seed)
    sd = {k: torch.from_numpy(np.ones(s, np.float32) if 'norm' in k else rng.normal(0, 0.02, s).astype(np.float32))
          for k, s in hf_dbrx.hf_shapes(cfg).items()}
    model.load_state_dict(sd, strict=True)
    model.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------ client side
def _pct(xs, q):
    if not xs:
        return float('nan')
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def _summary(xs):
    return {'mean': statistics.fmean(xs) * 1e3 if xs else float('nan'), 'median': _pct(xs, 50) * 1e3,
            'p99': _pct(xs, 99) * 1e3}


async def _one(client, model, prompt, max_tokens, ignore_eos=True):
    """One streamed chat request: raw SSE lines parsed with json (as vLLM's benchmark_serving does with aiohttp),
    so the client's own cost stays small next to the server's."""
    body = {'model': model, 'messages': [{'role': 'user', 'content': prompt}], 'max_tokens': max_tokens,
            'temperature': 0.0, 'stream': True, 'stream_options': {'include_usage': True}, 'ignore_eos': ignore_eos}
    t0 = time.perf_counter()
    ttft, last, itl, n_out = None, None, [], 0
    async with client.stream('POST', '/v1/chat/completions', json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith('data: ') or line == 'data: [DONE]':
                continue
            now = time.perf_counter()
            ch = json.loads(line[6:])
            if 'error' in ch:
                raise RuntimeError(ch['error'])
            if ch['choices'] and ch['choices'][0]['delta'].get('content'):
                if ttft is None:
                    ttft = now - t0
                else:
                    itl.append(now - last)
                last = now
            if ch.get('usage'):
                n_out = ch['usage']['completion_tokens']
    latency = time.perf_counter() - t0
    return {'ttft': ttft if ttft is not None else latency, 'latency': latency, 'itl': itl, 'n_out': n_out}


async def run_level(base_url, model, concurrency, num_prompts, max_tokens, api_key='x') -> dict:
    try:
        import httpx  # pylint: disable=import-outside-toplevel
    except ImportError:  # openai >= 3 ships its HTTP client as httpx2 (the same API)
        import httpx2 as httpx  # pylint: disable=import-outside-toplevel
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    client = httpx.AsyncClient(base_url=base_url, headers={'Authorization': f'Bearer {api_key}'}, timeout=600,
                               limits=limits)
    sem = asyncio.Semaphore(concurrency)

    async def limited(i):
        async with sem:
            return await _one(client, model, f'{i}. {PROMPT}', max_tokens)
    # Untimed: one round at this concurrency (connections, and programs a server without warm-up compiles).
    await asyncio.gather(*[_one(client, model, f'warm-up {i}. {PROMPT}', max_tokens) for i in range(concurrency)])
    t0 = time.perf_counter()
    res = await asyncio.gather(*[limited(i) for i in range(num_prompts)])
    dur = time.perf_counter() - t0
    await client.aclose()
    out_tokens = sum(r['n_out'] for r in res)
    tpot = [(r['latency'] - r['ttft']) / (r['n_out'] - 1) for r in res if r['n_out'] > 1]
    return {'concurrency': concurrency, 'num_prompts': num_prompts, 'duration_s': dur,
            'request_throughput': num_prompts / dur, 'output_throughput': out_tokens / dur,
            'total_output_tokens': out_tokens, 'ttft_ms': _summary([r['ttft'] for r in res]),
            'tpot_ms': _summary(tpot), 'itl_ms': _summary([x for r in res for x in r['itl']])}


# ------------------------------------------------------------------------------------------------ server side
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start_server(model_path, name, args, log_path):
    port = _free_port()
    cmd = [sys.executable, '-m', 'mosaicjax.serve', f'--model={name}={model_path}', f'--port={port}',
           f'--slots={args.slots}', f'--steps_per_sync={args.steps_per_sync}', f'--quantize={args.quantize}',
           f'--dtype={args.dtype}', '--drain_timeout=10']
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get('PYTHONPATH', ''))
    log = open(log_path, 'w')  # pylint: disable=consider-using-with
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)  # pylint: disable=consider-using-with
    base = f'http://127.0.0.1:{port}'
    deadline = time.time() + 900
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f'server exited ({proc.returncode}); see {log_path}')
        try:
            with urllib.request.urlopen(base + '/health', timeout=5) as r:
                if r.status == 200:
                    return proc, base
        except OSError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise RuntimeError(f'server not ready; see {log_path}')
        time.sleep(0.25)


def stop_server(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def prompt_ids(base_url, model) -> list[int]:
    body = json.dumps({'model': model, 'messages': [{'role': 'user', 'content': f'0. {PROMPT}'}]}).encode()
    req = urllib.request.Request(base_url + '/tokenize', data=body, method='POST',
                                 headers={'Content-Type': 'application/json'})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())['tokens']


# ------------------------------------------------------------------------------------------------ transformers
def run_transformers(model_path, ids, max_tokens, threads) -> dict:
    import torch  # pylint: disable=import-outside-toplevel
    from benchmarks.decode import TokenClock  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(threads)
    model = transformers.DbrxForCausalLM.from_pretrained(model_path, attn_implementation='sdpa',
                                                         dtype=torch.float32).eval()
    x = torch.tensor([ids])

    def generate(n, streamer=None):
        with torch.inference_mode():
            return model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                  pad_token_id=0, streamer=streamer)
    generate(4)  # warm-up
    runs = []
    for _ in range(3):
        clock = TokenClock()
        t0 = time.perf_counter()
        generate(max_tokens, clock)
        t_end = time.perf_counter()
        t_first, t_last = clock.times[1], clock.times[-1]
        runs.append({'ttft_ms': (t_first - t0) * 1e3, 'tpot_ms': (t_last - t_first) / (max_tokens - 1) * 1e3,
                     'e2e_s': t_end - t0})
    best = min(runs, key=lambda r: r['tpot_ms'])  # least disturbed by other load
    best['decode_tokens_per_s'] = 1e3 / best['tpot_ms']
    best['threads'] = threads
    return best


# ------------------------------------------------------------------------------------------------ main
def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float('nan')


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--model_path', help='checkpoint to serve (default: build the benchmark checkpoint)')
    ap.add_argument('--workdir', default='/tmp/mosaicjax_bench', help='where the default checkpoint is built')
    ap.add_argument('--base_url', help='an already running server (no transformers comparison)')
    ap.add_argument('--model', default='bench')
    ap.add_argument('--slots', type=int, default=16)
    ap.add_argument('--steps_per_sync', type=int, default=1)
    ap.add_argument('--quantize', default='none')
    ap.add_argument('--dtype', default='float32')
    ap.add_argument('--num_prompts', default='8,32', help='prompts per level (one value, or one per level)')
    ap.add_argument('--max_tokens', type=int, default=128)
    ap.add_argument('--concurrency', default='1,16')
    ap.add_argument('--no_transformers', action='store_true')
    ap.add_argument('--threads', type=int, default=os.cpu_count(), help="transformers' torch threads")
    ap.add_argument('--json', help='also write the results here')
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(',')]
    nums = [int(n) for n in args.num_prompts.split(',')]
    nums = nums * len(levels) if len(nums) == 1 else nums
    out = {'load_before': _load(), 'cpu_count': os.cpu_count(), 'args': vars(args)}
    proc = None
    model_path = args.model_path
    if args.base_url is None:
        model_path = model_path or build_checkpoint(os.path.join(args.workdir, 'lm'))
        os.makedirs(args.workdir, exist_ok=True)
        t0 = time.time()
        proc, base_url = start_server(model_path, args.model, args, os.path.join(args.workdir, 'serve.log'))
        out['server_start_to_ready_s'] = time.time() - t0
    else:
        base_url = args.base_url
    try:
        ids = prompt_ids(base_url, args.model)
        out['prompt_tokens'] = len(ids)
        out['levels'] = [asyncio.run(run_level(base_url, args.model, c, n, args.max_tokens))
                         for c, n in zip(levels, nums)]
    finally:
        if proc is not None:
            stop_server(proc)
    for r in out['levels']:
        print(json.dumps(r), flush=True)
    single = out['levels'][0]
    out['single_stream_decode_tokens_per_s'] = 1e3 / single['tpot_ms']['mean']
    if len(out['levels']) >= 2:
        out['throughput_ratio'] = out['levels'][-1]['output_throughput'] / single['output_throughput']
    if not args.no_transformers and args.base_url is None:
        out['transformers'] = run_transformers(model_path, ids, args.max_tokens, args.threads)
        out['decode_ratio_vs_transformers'] = (out['single_stream_decode_tokens_per_s']
                                               / out['transformers']['decode_tokens_per_s'])
    out['load_after'] = _load()
    summary = {k: out[k] for k in ('prompt_tokens', 'single_stream_decode_tokens_per_s', 'throughput_ratio',
                                   'decode_ratio_vs_transformers', 'load_before', 'load_after') if k in out}
    if 'transformers' in out:
        summary['transformers_decode_tokens_per_s'] = out['transformers']['decode_tokens_per_s']
    print(json.dumps(summary), flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == '__main__':
    main()
