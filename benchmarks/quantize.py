"""Int8 weight-only quantisation (`--quantize=int8`): logit error and decode speed against float32 and bfloat16.

    python -m benchmarks.quantize                         # benchmarks/decode.py's small DBRX, both weight inits
    python -m benchmarks.quantize --init=dbrx --batches=1,16 --json=/tmp/q.json

Model: benchmarks/decode.py's DBRX (d_model 256, 8 heads / 2 kv, 4 layers, 8 experts top-2, ffn 512, vocab 4096,
max_seq_len 256) with random weights, two ways (--init):
  dbrx   DBRX's initialiser, N(0, 0.02) everywhere: near-uniform routers and attention, tiny activations;
  unit   N(0, 1/fan_in) for every matmul (activations of order 1 through the network) and N(0, 4/fan_in) routers
         (decisive routing): closer to a trained model's regime.
Variants, each from the same float32 weights: float32; bfloat16 (params and compute, load_lm(dtype='bfloat16')'s
model); int8 (mosaicjax.models.quantize: int8 matmul weights with per-output-channel scales, float32 activations).

Error: the float32 model's logits on 8 random sequences of 128 tokens are the reference; for each variant: max and
mean |logit difference|, relative error (max |difference| / max |reference logit|), top-1 agreement (argmax equal)
and the mean |difference| of the log-probabilities of the sequence's own next tokens (what lm-eval scores).
Speed: mosaicjax.generation.Generator, greedy, prompt 128 tokens, decode tokens/s = (n - 1) / (t(n) - t(1)) for
n = 128 new tokens (compile excluded), per batch size in --batches.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

if __package__ in (None, ''):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(args):
    from benchmarks import decode as decode_bench  # pylint: disable=import-outside-toplevel
    ns = argparse.Namespace(**decode_bench.DEFAULTS)
    ns.prompt_len, ns.max_new_tokens = args.prompt_len, args.max_new_tokens
    return decode_bench._config(ns)  # pylint: disable=protected-access


def state_dict(cfg, init: str, seed: int = 0) -> dict:
    from mosaicjax.checkpoints import hf_dbrx  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(seed)
    sd = {}
    for k, shape in hf_dbrx.hf_shapes(cfg).items():
        if 'norm' in k:
            sd[k] = np.ones(shape, np.float32)
            continue
        if init == 'dbrx':
            std = 0.02
        else:  # fan_in of each HF tensor: Linear weights are [out, in]; experts' w1/v1 [E*F, D] (in = D),
            # w2 [E*F, D] used as h @ w2_e (in = F); the embedding gets std 1
            fan_in = {'wte': 1, 'w2': cfg.ffn_hidden_size}.get(next((n for n in ('wte', 'w2') if n in k), ''),
                                                               shape[-1])
            std = (2.0 if 'router' in k else 1.0) / np.sqrt(fan_in)
        sd[k] = rng.normal(0.0, std, shape).astype(np.float32)
    return sd


def _variants(cfg, sd):
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

    from mosaicjax.checkpoints import hf_dbrx  # pylint: disable=import-outside-toplevel
    from mosaicjax.models import quantize  # pylint: disable=import-outside-toplevel
    p32 = hf_dbrx.params_from_hf(sd, cfg)
    bf_cfg = dataclasses.replace(cfg, dtype='bfloat16', param_dtype='bfloat16')
    p16 = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), p32)
    q_cfg = dataclasses.replace(cfg, quantize='int8')
    return {'float32': (cfg, p32), 'bfloat16': (bf_cfg, p16), 'int8': (q_cfg, quantize.quantize_params(p32))}


def logit_error(variants, tokens) -> dict:
    import jax  # pylint: disable=import-outside-toplevel

    from mosaicjax.models import dbrx  # pylint: disable=import-outside-toplevel

    def logits(cfg, params):
        fn = jax.jit(lambda p, t: dbrx.Dbrx(cfg).apply({'params': p}, t)[0])
        return np.asarray(fn(params, tokens), np.float64)  # [B, T, V]

    def logsoftmax(x):
        m = x.max(-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))

    ref = logits(*variants['float32'])
    ref_lp = logsoftmax(ref)
    nxt = tokens[:, 1:]
    out = {}
    for name, (cfg, params) in variants.items():
        if name == 'float32':
            continue
        got = logits(cfg, params)
        diff = np.abs(got - ref)
        lp = logsoftmax(got)
        tok_lp = lambda a: np.take_along_axis(a[:, :-1], nxt[..., None], -1)[..., 0]  # noqa: E731
        out[name] = {'max_abs': float(diff.max()), 'mean_abs': float(diff.mean()),
                     'relative': float(diff.max() / np.abs(ref).max()),
                     'top1_agreement': float((got.argmax(-1) == ref.argmax(-1)).mean()),
                     'token_logprob_mean_abs': float(np.abs(tok_lp(lp) - tok_lp(ref_lp)).mean()),
                     'token_logprob_max_abs': float(np.abs(tok_lp(lp) - tok_lp(ref_lp)).max())}
    out['reference_max_abs_logit'] = float(np.abs(ref).max())
    return out


def decode_speed(variants, prompt_len, n_new, batches) -> dict:
    from mosaicjax.generation import Generator, SamplingParams  # pylint: disable=import-outside-toplevel
    out = {}
    for name, (cfg, params) in variants.items():
        gen = Generator(cfg, params, max_batch=max(batches), min_length=cfg.max_seq_len)
        for b in batches:
            prompts = np.random.default_rng(1).integers(0, cfg.vocab_size, (b, prompt_len)).tolist()

            def run(n):
                t0 = time.perf_counter()
                gen.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0))
                return time.perf_counter() - t0
            run(1), run(2)  # compile
            t1 = sorted(run(1) for _ in range(3))[1]
            tn = min(run(n_new) for _ in range(2))
            out[f'{name}/batch{b}'] = b * (n_new - 1) / max(tn - t1, 1e-9)
            print(f'{name:9s} batch {b:2d}: {out[f"{name}/batch{b}"]:8.1f} decode tokens/s', flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--init', default='dbrx,unit')
    ap.add_argument('--batches', default='1,16')
    ap.add_argument('--prompt_len', type=int, default=128)
    ap.add_argument('--max_new_tokens', type=int, default=128)
    ap.add_argument('--no_speed', action='store_true')
    ap.add_argument('--json')
    args = ap.parse_args(argv)
    from mosaicjax.models import quantize  # pylint: disable=import-outside-toplevel
    cfg = _config(args)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (8, 128)).astype(np.int32)
    results = {'load_before': os.getloadavg()[0]}
    for init in args.init.split(','):
        variants = _variants(cfg, state_dict(cfg, init))
        err = logit_error(variants, tokens)
        results[f'error/{init}'] = err
        for name in ('bfloat16', 'int8'):
            e = err[name]
            print(f'init {init:4s} {name:8s} logits max |d| {e["max_abs"]:.4f} mean |d| {e["mean_abs"]:.5f} '
                  f'relative {e["relative"]:.4f} top-1 {e["top1_agreement"]:.4f} token logprob mean |d| '
                  f'{e["token_logprob_mean_abs"]:.5f} (reference max |logit| {err["reference_max_abs_logit"]:.3f})',
                  flush=True)
    results['weight_bytes'] = {k: quantize.weight_bytes(p) for k, (_, p) in variants.items()}
    print('weight bytes:', results['weight_bytes'], flush=True)
    if not args.no_speed:
        batches = [int(b) for b in args.batches.split(',')]
        results['decode_tokens_per_s'] = decode_speed(variants, args.prompt_len, args.max_new_tokens, batches)
    results['load_after'] = os.getloadavg()[0]
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == '__main__':
    main()
