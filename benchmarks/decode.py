"""Decode speed at batch 1 on CPU: mosaicjax's KV-cache generation vs transformers' generate, side by side.

    python -m benchmarks.decode                                  # default small DBRX, 128 prompt + 128 new tokens
    python -m benchmarks.decode --prompt_len=16 --max_new_tokens=32 --d_model=64 --n_layers=2   # smoke run
    python benchmarks/decode.py --json=/tmp/decode.json

Both sides: the same random DBRX weights (numpy, loaded into both), float32, the same prompt, greedy
(transformers: do_sample=False, no EOS; mosaicjax: temperature 0, no stop ids), the same number of new
tokens, the same CPU, one process, one timed run each after a warm-up (which includes JAX's compilation).
torch uses all cores and SDPA attention with its default dynamic KV cache; mosaicjax runs
mosaicjax.generation.Generator (jitted prefill, then the whole decode loop in one jitted lax.while_loop).

Reported per side: the end-to-end time for max_new_tokens, the time to the first new token (prompt prefill +
first token; transformers: stamped by a streamer inside the timed run, mosaicjax: the median of 3 separate
max_new_tokens=1 calls, since its decode loop is one device call), and decode tokens/s =
(max_new_tokens - 1) / (t_full - t_first): the per-token rate once the prompt is in the cache. The ratio is
mosaicjax / transformers decode tokens/s. Also whether the greedy tokens agree (they should, up to float32
near-ties).

On a shared, oversubscribed CPU torch's default of one intra-op thread per core can slow it down by 10-100x
(threads spin waiting for each other); --threads=1 gives a fairer number there. Quote numbers from a quiet
machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

if __package__ in (None, ''):  # `python benchmarks/decode.py`: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import dbrx_config  # noqa: E402  (after the path line: also runs as a script)

# A small DBRX with every DBRX feature on (GQA, clip_qkv, fine-grained top-2 MoE); as benchmarks/train_throughput.
DEFAULTS = dict(d_model=256, n_heads=8, kv_n_heads=2, n_layers=4, ffn_hidden_size=512, moe_num_experts=8,
                moe_top_k=2, vocab_size=4096, prompt_len=128, max_new_tokens=128)


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in DEFAULTS.items():
        p.add_argument(f'--{name}', type=int, default=value)
    p.add_argument('--threads', type=int, default=os.cpu_count(), help='torch intra-op threads')
    p.add_argument('--attention', default='sdpa', help="transformers attention implementation ('sdpa', 'eager')")
    p.add_argument('--only', choices=('jax', 'torch'), default=None, help='run one side only')
    p.add_argument('--json', default=None, help='also write the results to this JSON file')
    return p.parse_args(argv)


def _config(args):
    max_len = 1 << (args.prompt_len + args.max_new_tokens - 1).bit_length()  # a power of two that fits both
    return dbrx_config(args, max_seq_len=max_len)


def _state_dict(cfg, seed=0):
    """Random HF-layout weights (std 0.02 as DBRX's initialiser; norm scales 1)."""
    from mosaicjax.checkpoints import hf_dbrx  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(seed)
    return {k: (np.ones(shape, np.float32) if 'norm' in k else rng.normal(0.0, 0.02, shape).astype(np.float32))
            for k, shape in hf_dbrx.hf_shapes(cfg).items()}


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run_jax(args, cfg, sd, prompt):
    from mosaicjax.checkpoints import hf_dbrx  # pylint: disable=import-outside-toplevel
    from mosaicjax.generation import Generator, SamplingParams  # pylint: disable=import-outside-toplevel

    # One length bucket (max_seq_len fits prompt + new tokens): every call below reuses the same two programs.
    gen = Generator(cfg, hf_dbrx.params_from_hf(sd, cfg), max_batch=1, min_length=cfg.max_seq_len)

    def generate(n):
        [c] = gen.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0))
        return c.tokens

    compile_s, _ = _timed(lambda: (generate(1), generate(2)))  # compiles prefill and decode (same buckets)
    # Prefill + first token is one short jitted call: the median of 3 keeps scheduler noise out of the
    # difference below.
    t_first = sorted(_timed(lambda: generate(1))[0] for _ in range(3))[1]
    t_full, tokens = _timed(lambda: generate(args.max_new_tokens))
    return {'t_first_sec': t_first, 't_full_sec': t_full, 'warmup_incl_compile_sec': compile_s}, tokens


class TokenClock:
    """A transformers streamer that timestamps every put(): the prompt first, then each new token."""

    def __init__(self):
        self.times = []

    def put(self, value):
        del value
        self.times.append(time.perf_counter())

    def end(self):
        pass


def run_torch(args, cfg, sd, prompt):
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel

    torch.set_num_threads(args.threads)
    hf_cfg = transformers.DbrxConfig(**cfg.to_hf_dict())  # sets rope_parameters explicitly
    hf_cfg._attn_implementation = args.attention  # pylint: disable=protected-access
    model = transformers.DbrxForCausalLM(hf_cfg).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    ids = torch.tensor([prompt])

    def generate(n, streamer=None):
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                 pad_token_id=0, streamer=streamer)
        return out[0, len(prompt):].tolist()

    warm_s, _ = _timed(lambda: generate(2))
    clock = TokenClock()
    t0 = time.perf_counter()
    tokens = generate(args.max_new_tokens, clock)
    t_full = time.perf_counter() - t0
    # One run: the streamer stamps the first new token (prefill done) and the last one.
    t_first = clock.times[1] - t0
    return {'t_first_sec': t_first, 't_full_sec': t_full, 'warmup_sec': warm_s, 'threads': args.threads}, tokens


def _rates(r, n):
    r['end_to_end_tokens_per_sec'] = n / r['t_full_sec']
    r['decode_tokens_per_sec'] = (n - 1) / max(r['t_full_sec'] - r['t_first_sec'], 1e-9)
    return r


def main(argv=None):
    args = _parse(argv)
    if args.max_new_tokens < 2:
        raise SystemExit('--max_new_tokens must be >= 2')
    cfg = _config(args)
    sd = _state_dict(cfg)
    prompt = np.random.default_rng(1).integers(0, args.vocab_size, args.prompt_len).tolist()
    n = args.max_new_tokens
    conf = {k: getattr(args, k) for k in DEFAULTS}
    print(f'config: {json.dumps(conf)} float32, batch 1, greedy, {os.cpu_count()} cores', flush=True)
    results = {'config': conf, 'cpu_count': os.cpu_count()}
    tokens = {}
    for side, fn in (('mosaicjax', run_jax), ('transformers', run_torch)):
        if args.only is not None and {'jax': 'mosaicjax', 'torch': 'transformers'}[args.only] != side:
            continue
        r, tokens[side] = fn(args, cfg, sd, prompt)
        results[side] = _rates(r, n)
        print(f'{side:12s} decode {r["decode_tokens_per_sec"]:9.1f} tokens/s   end-to-end '
              f'{r["end_to_end_tokens_per_sec"]:9.1f} tokens/s   (prefill + 1 token {r["t_first_sec"] * 1e3:7.1f} ms, '
              f'{n} tokens {r["t_full_sec"] * 1e3:8.1f} ms)', flush=True)
    if len(tokens) == 2:
        a, b = tokens['mosaicjax'], tokens['transformers']
        agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        results['greedy_tokens_agree'] = agree
        ratio = results['mosaicjax']['decode_tokens_per_sec'] / results['transformers']['decode_tokens_per_sec']
        results['ratio'] = ratio
        print(f'greedy tokens identical for the first {agree} of {n}', flush=True)
        print(f'ratio mosaicjax / transformers (decode tokens/s): {ratio:.2f}x', flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == '__main__':
    main(sys.argv[1:])
