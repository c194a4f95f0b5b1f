"""What only an accelerator can show: DBRX training MFU per MoE dispatch, SDXL-sized image latency, DBRX decode speed.

    python -m benchmarks.device_report --out=$OUT                    # every part, full size (one GPU, < 9.5 minutes)
    python -m benchmarks.device_report --out=$OUT --parts=unet       # one part
    python -m benchmarks.device_report --tiny --out=/tmp/devrep      # tiny shapes: the CPU smoke run (~1 minute)
    python -m benchmarks.device_report --out=$OUT --parts=train --dispatches=auto --profile   # + where time goes

--profile traces one training step per dispatch and one whole generation, and records the largest device ops
(benchmarks/trace_summary.py); under XLA:GPU's command buffers (CUDA graphs) kernels show up by buffer name, so set
XLA_FLAGS=--xla_gpu_enable_command_buffer= to see them by HLO op (the timings then include the launch gaps).

Results go to $OUT/device_report.json (one dict per part plus 'meta', rewritten after every part, so a run cut short
keeps the parts it finished) and a table on stdout; copy the numbers into BUILD_NOTES.md ("Measured performance").

Time: each part runs in its own child process (a crash or a hung compile cannot take the others down, and each part
starts with the whole device memory). A part has a soft budget (--budget_<part>, seconds): timing loops stop early
once its share is spent, but a compiled program is always timed a few times. The parent kills a part at 1.25 x its
soft budget + 15 s and never runs past --total_budget (default 560 s); whatever the part recorded before is kept
(parts write their partial results after every sub-measurement). A part that fails records its error string and
the next part still runs. Programs are compiled ahead of time (jit(...).lower(...).compile(), reported as compile
seconds) and, on accelerators, several at once from a thread pool before anything is timed.

Parts (random weights; nothing is downloaded):
  train   The trainer's jitted step (mosaicjax.trainer.step.make_train_step: forward, next-token cross-entropy, MoE
          load-balancing loss, backward, clipping, AdamW; float32 parameters, bfloat16 compute, state donated) on
          a ~1B-active DBRX (TRAIN: d_model 2048, 16 heads / 8 kv, 16 layers, 16 experts top-4, ffn 1024, vocab
          100352: 1.016B active / 2.224B total parameters), batch 8 x 2048 tokens, for each MoE dispatch in
          DISPATCHES. One train state (the trainer's make_init_fn under jax.jit) is handed from dispatch to
          dispatch: the parameter tree does not depend on the dispatch. Per dispatch: 3 warm-up steps, then up to
          10 timed steps; median step time, tokens/s and MFU = dbrx.flops_per_token (what the trainer's `mfu`
          metric counts: 6 x non-embedding active params + attention, no rematerialisation) x tokens / (step time
          x mosaicjax.trainer.mfu.peak_flops_per_device()), and the fastest dispatch. Rematerialisation and
          gradient accumulation (same global batch, same FLOPs) are the cheapest pair in TRAIN_MEMORY_CANDIDATES
          that mosaicjax.models.sizing.memory_plan says fits the device (activation estimates scaled by sizing's
          XLA:CPU calibration): 'dots' on an H200, 'full' on an 80 GB card; on an out-of-memory error a dispatch
          is retried once with the next pair.
  unet    The SDXL UNet (experiments/imageai/architectures/sdxl/unet/config.json: 2.567B parameters, bfloat16
          parameters and compute) at 1024x1024 (128x128 latents) with classifier-free guidance (UNet batch = 2 x
          images), 30 steps of an Euler-like update inside one jitted lax.fori_loop (the step count is a traced
          scalar, so the 1-step warm-up runs the same program), then the SDXL VAE decode (vae/config.json, 83.7M
          parameters, bfloat16) as a second program. Per batch (1 and 4 images): denoising seconds, seconds per
          UNet call (denoising / steps), VAE decode seconds, seconds per request (denoise + decode) and images/s,
          against the ~3 s/image target. Attention 'auto' (cuDNN's fused kernel where it applies); should cuDNN
          fail to compile, the part is redone once with XLA's attention.
  decode  DBRX decode at batch 1 on the same ~1B-active config with bfloat16 parameters, through the public
          mosaicjax.generation.Generator (greedy, prompt 128, 256 new tokens), timed as benchmarks/decode.py
          does: decode tokens/s = (new - 1) / (t(256 new) - t(1 new)). The memory-bandwidth bound reads, per
          token, the active weights except the input embedding table (a one-row lookup; lm_head is read whole) in
          bfloat16 plus the KV cache at the mean context length, at the device's HBM bandwidth (HBM_BANDWIDTH;
          null for devices not in the table, e.g. CPU); the achieved fraction is tokens/s over that bound.

--tiny swaps every configuration for a tiny one (TINY_*; still bfloat16) so the whole run takes about a minute on
CPU (tests/test_device_report.py). GPU memory: XLA_PYTHON_CLIENT_MEM_FRACTION defaults to 0.92 in the parts (JAX's
own default, 0.75, would leave a quarter of an 80 GB card unused); set it in the environment to override.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import traceback

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __package__ in (None, ''):  # `python benchmarks/device_report.py`: make the repository importable
    sys.path.insert(0, ROOT)
from benchmarks import dbrx_config, without_flags  # noqa: E402  (after the path line: also runs as a script)

PARTS = ('train', 'unet', 'decode')
DISPATCHES = ('ragged', 'sorted', 'blocked', 'capacity')
# Soft seconds per part; each part is killed at 1.25 x its soft budget + 15 s, and the run at the total budget.
BUDGETS = {'train': 200, 'unet': 160, 'decode': 70}
TINY_BUDGETS = {'train': 40, 'unet': 40, 'decode': 30}
TOTAL_BUDGET, TINY_TOTAL_BUDGET = 560, 240

# DBRX shapes: ~1B active parameters (1.016B, 0.810B without the input embedding), 2.22B total. ffn 1024 rather than
# 1536 keeps float32 params + AdamW + gradients (33 GiB) and activations inside an 80 GB card at 8 x 2048 tokens.
TRAIN = dict(d_model=2048, n_heads=16, kv_n_heads=8, n_layers=16, ffn_hidden_size=1024, moe_num_experts=16,
             moe_top_k=4, vocab_size=100352, batch=8, seq=2048, warmup=3, steps=10)
TINY_TRAIN = dict(d_model=64, n_heads=4, kv_n_heads=2, n_layers=1, ffn_hidden_size=64, moe_num_experts=4,
                  moe_top_k=2, vocab_size=256, batch=2, seq=32, warmup=1, steps=2)
# (remat, grad_accum_steps), cheapest first; the first whose memory plan fits the device is used.
TRAIN_MEMORY_CANDIDATES = (('dots', 1), ('full', 1), ('full', 2), ('full', 4))
# sizing.py's calibration on XLA:CPU: its activation estimate is a lower bound by these factors.
ACTIVATION_CALIBRATION = {'none': 2.3, 'dots': 1.2, 'full': 1.0}

SDXL_DIR = os.path.join(ROOT, 'experiments', 'imageai', 'architectures', 'sdxl')
UNET = dict(image=1024, steps=30, batches=(1, 4), text_len=77, guidance=5.0, repeats=3)
TINY_UNET = dict(image=64, steps=3, batches=(1, 2), text_len=7, guidance=5.0, repeats=2)
# tests/models/test_unet.py's SDXL_TINY (SDXL's block layout and text_time conditioning, narrow channels) with one
# resnet per block and one transformer layer (compiles in half the time on CPU).
SDXL_TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'), up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'),
    attention_head_dim=(2, 4), transformer_layers_per_block=(1, 1), cross_attention_dim=32, norm_num_groups=8,
    use_linear_projection=True, upcast_attention=None, addition_embed_type='text_time',
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8)
TINY_VAE = dict(block_out_channels=(16, 16, 32, 32), down_block_types=('DownEncoderBlock2D',) * 4,
                up_block_types=('UpDecoderBlock2D',) * 4, layers_per_block=1, norm_num_groups=8,
                scaling_factor=0.13025)
TARGET_S_PER_IMAGE = 3.0  # the talk's SDXL 1024x1024 target (30 steps + decode, batch 1)

DECODE = dict(prompt_len=128, max_new_tokens=256)
TINY_DECODE = dict(prompt_len=8, max_new_tokens=64)

# HBM bandwidth in bytes/s by device kind (first match of the lower-cased device_kind wins).
HBM_BANDWIDTH = (
    (r'gh200', None),  # Grace Hopper: HBM3 or HBM3e variants; unknown which
    (r'h200', 4.8e12),
    (r'h100.*pcie', 2.0e12),
    (r'h100.*nvl', 3.9e12),
    (r'h100', 3.35e12),  # SXM ('NVIDIA H100 80GB HBM3')
    (r'a100.*80', 2.0e12),
)


def hbm_bandwidth(device_kind: str) -> float | None:
    """HBM bytes/s for a JAX device_kind ('NVIDIA H100 80GB HBM3', 'NVIDIA H200', ...); None when unknown."""
    kind = device_kind.lower()
    for pattern, bandwidth in HBM_BANDWIDTH:
        if re.search(pattern, kind):
            return bandwidth
    return None


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', required=True, help='directory for device_report.json')
    p.add_argument('--parts', default=','.join(PARTS), help=f'comma-separated subset of {",".join(PARTS)}')
    p.add_argument('--tiny', action='store_true', help='tiny configurations (CPU smoke test)')
    for part in PARTS:
        p.add_argument(f'--budget_{part}', type=float, default=None,
                       help=f'soft seconds for {part} (default {BUDGETS[part]}, --tiny {TINY_BUDGETS[part]})')
    p.add_argument('--total_budget', type=float, default=None,
                   help=f'hard seconds for the whole run (default {TOTAL_BUDGET}, --tiny {TINY_TOTAL_BUDGET}): '
                        'no part runs past it')
    p.add_argument('--dispatches', default=','.join(DISPATCHES), help='train: MoE dispatches, in order')
    p.add_argument('--train_memory', default='auto',
                   help="train: 'auto' (fit to the device) or REMAT:GRAD_ACCUM, e.g. 'full:1'")
    p.add_argument('--attention_impl', default='auto', help='train and decode: DbrxConfig.attention_impl')
    p.add_argument('--profile', action='store_true',
                   help='train and decode: also trace one step (per dispatch) / one generation with the profiler and '
                        'record the largest device ops (benchmarks/trace_summary.py)')
    p.add_argument('--serial_compile', action='store_true',
                   help='compile one program at a time (default: concurrently, from a thread pool)')
    p.add_argument('--child', default=None, choices=PARTS, help=argparse.SUPPRESS)  # run one part in-process
    args = p.parse_args(argv)
    args.parts = [x for x in args.parts.split(',') if x]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        p.error(f'unknown parts {unknown}; expected some of {PARTS}')
    if args.total_budget is None:
        args.total_budget = TINY_TOTAL_BUDGET if args.tiny else TOTAL_BUDGET
    for part in PARTS:
        if getattr(args, f'budget_{part}') is None:
            setattr(args, f'budget_{part}', (TINY_BUDGETS if args.tiny else BUDGETS)[part])
    return args


# ---------------------------------------------------------------------------------------------------- helpers


def _log(msg: str):
    print(f'[device_report {time.strftime("%H:%M:%S")}] {msg}', flush=True)


def _count(n) -> str:
    """1016000000 -> '1.02B' (parameter counts in log lines and the table)."""
    if n is None:
        return '-'
    for unit, div in (('T', 1e12), ('B', 1e9), ('M', 1e6), ('K', 1e3)):
        if n >= div:
            return f'{n / div:.2f}{unit}'
    return str(n)


def _clean(x):
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python numbers, recursively."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _write_json(path: str, data: dict):
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(_clean(data), f, indent=1)
    os.replace(tmp, path)


def _is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return 'resource_exhausted' in text or 'out of memory' in text


def _block(tree):
    import jax  # pylint: disable=import-outside-toplevel
    return jax.block_until_ready(tree)


class Clock:
    """A part's soft budget (seconds from the part's start), split into per-measurement deadlines."""

    def __init__(self, budget: float):
        self.start, self.budget = time.perf_counter(), budget

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget - self.elapsed()

    def deadlines(self, n: int) -> list[float]:
        """n perf_counter deadlines splitting what is left of the budget evenly (an early finish leaves more time
        to the measurements after it)."""
        now, left = time.perf_counter(), max(self.left(), 0.0)
        return [now + left * (i + 1) / n for i in range(n)]


def device_info() -> dict:
    import jax  # pylint: disable=import-outside-toplevel
    from mosaicjax.models import sizing  # pylint: disable=import-outside-toplevel
    from mosaicjax.trainer import mfu as mfu_lib  # pylint: disable=import-outside-toplevel
    dev = jax.devices()[0]
    return {'backend': jax.default_backend(), 'device_kind': dev.device_kind, 'device_count': jax.device_count(),
            'jax_version': jax.__version__, 'peak_flops_per_device': mfu_lib.peak_flops_per_device(dev),
            'hbm_bandwidth_bytes_per_sec': hbm_bandwidth(dev.device_kind),
            'device_memory_bytes': sizing.device_memory_bytes(),
            'mem_fraction': os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION')}


# ------------------------------------------------------------------------------------------------------ train


def _dbrx_config(shape: dict, **kw):
    return dbrx_config(shape, moe_loss_weight=0.05, **kw)


def _param_counts(cfg) -> dict:
    from mosaicjax.models import dbrx  # pylint: disable=import-outside-toplevel
    n = dbrx.count_params(cfg)
    return {'total_params': n['total'], 'active_params': n['active'],
            'active_params_no_embedding': n['active'] - n['embedding']}


def _train_memory_choice(args, shape, base_cfg) -> tuple[list, dict]:
    """(candidates [(remat, grad_accum)] starting at the chosen one, the memory-plan notes)."""
    import dataclasses  # pylint: disable=import-outside-toplevel
    from mosaicjax.models import sizing  # pylint: disable=import-outside-toplevel
    if args.train_memory != 'auto':
        remat, accum = args.train_memory.split(':')
        return [(remat, int(accum))], {'memory_choice': 'flag'}
    device_memory = sizing.device_memory_bytes()  # None on CPU: the first candidate
    notes = {'device_memory_bytes': device_memory, 'plans_gib': {}}
    chosen = None
    for i, (remat, accum) in enumerate(TRAIN_MEMORY_CANDIDATES):
        cfg = dataclasses.replace(base_cfg, remat=remat)
        plan = sizing.memory_plan(cfg, {'data': -1, 'fsdp': 1, 'expert': 1, 'tensor': 1}, 1,
                                  batch_size=shape['batch'], seq_len=shape['seq'], grad_accum_steps=accum)
        need = plan.params + plan.optimizer + plan.gradients + plan.activations * ACTIVATION_CALIBRATION[remat]
        notes['plans_gib'][f'{remat}:{accum}'] = round(need / 2 ** 30, 1)
        if chosen is None and (device_memory is None or need <= (1 - sizing.HEADROOM) * device_memory):
            chosen = i
    if chosen is None:
        chosen = len(TRAIN_MEMORY_CANDIDATES) - 1
        notes['memory_choice'] = 'nothing fits the plan; trying the smallest'
    return list(TRAIN_MEMORY_CANDIDATES[chosen:]), notes


def part_train(args, record) -> dict:
    import dataclasses  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from mosaicjax.models import dbrx  # pylint: disable=import-outside-toplevel
    from mosaicjax.trainer import mfu as mfu_lib  # pylint: disable=import-outside-toplevel
    from mosaicjax.trainer import optimizer as optimizer_lib  # pylint: disable=import-outside-toplevel
    from mosaicjax.trainer import state as state_lib  # pylint: disable=import-outside-toplevel
    from mosaicjax.trainer import step as step_lib  # pylint: disable=import-outside-toplevel

    clock = Clock(args.budget_train)
    shape = TINY_TRAIN if args.tiny else TRAIN
    b, t = shape['batch'], shape['seq']
    base = _dbrx_config(shape, max_seq_len=t, dtype='bfloat16', param_dtype='float32',
                        attention_impl=args.attention_impl, scan_layers=True)
    candidates, notes = _train_memory_choice(args, shape, base)
    peak = mfu_lib.peak_flops_per_device()
    flops_per_step = dbrx.flops_per_token(base, t) * b * t
    out = dict(config=dict(shape), **_param_counts(base), dtype='bfloat16', param_dtype='float32',
               attention_impl=args.attention_impl, flops_per_step=flops_per_step, peak_flops_per_device=peak,
               **notes, dispatch={})
    record(out)
    _log(f'train: {_count(out["active_params"])} active / {_count(out["total_params"])} total params, batch {b} x {t}, '
         f'{flops_per_step / 1e12:.3g} TFLOP/step, peak {peak / 1e12:.1f} TFLOP/s; (remat, grad_accum) candidates '
         f'{candidates}, memory plans (GiB) {notes.get("plans_gib")}')

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, shape['vocab_size'], (b, t + 1)).astype(np.int32)
    batch = {'inputs': jnp.asarray(tokens[:, :-1]), 'targets': jnp.asarray(tokens[:, 1:]),
             'segment_ids': jnp.ones((b, t), jnp.int32),
             'positions': jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
             'weights': jnp.ones((b, t), jnp.float32)}
    opt_cfg = optimizer_lib.OptimizerConfig(learning_rate=1e-4, warmup_steps=0, weight_decay=0.1, grad_clip_norm=1.0)
    tx, schedule = optimizer_lib.make_optimizer(opt_cfg, 10_000)
    holder = {'state': None}

    def ensure_state():
        """One train state, handed from dispatch to dispatch (the parameter tree does not depend on the dispatch
        or remat); made again only when a failed step left it deleted (donated)."""
        st = holder['state']
        if st is not None and not any(x.is_deleted() for x in jax.tree.leaves(st)):
            return
        holder['state'] = None
        gc.collect()
        t0 = time.perf_counter()
        init = state_lib.make_init_fn(dbrx.Dbrx(base), tx, (jnp.zeros((1, 8), jnp.int32),), seed=0)
        holder['state'] = _block(jax.jit(init)())
        out['init_sec'] = time.perf_counter() - t0
        record(out)
        _log(f'train: state initialised in {out["init_sec"]:.1f}s')

    def build(dispatches, remat, accum):
        """{dispatch: (compiled step or the exception, compile seconds)}, compiled concurrently."""
        ensure_state()
        lowered = {}
        for d in dispatches:
            cfg = dataclasses.replace(base, moe_dispatch=d, remat=remat)
            fn = step_lib.make_train_step(dbrx.Dbrx(cfg), tx, schedule, grad_accum_steps=accum, z_loss_weight=0.0,
                                          moe_loss_weight=cfg.moe_loss_weight, router_z_loss_weight=0.0)
            lowered[d] = _lower(jax.jit(fn, donate_argnums=(0,)), holder['state'], batch)
        t0 = time.perf_counter()
        built = compile_all(lowered, args.serial_compile)
        _log(f'train: compiled {len(built)} step(s) in {time.perf_counter() - t0:.1f}s wall (remat={remat}, '
             f'grad_accum={accum}): ' + ', '.join(f'{d} {sec:.1f}s' + ('' if _ok(c) else ' FAILED')
                                                  for d, (c, sec) in built.items()))
        return built

    def run_step(compiled) -> float:
        """One step on the held state; its loss (float() blocks until the step is done)."""
        holder['state'], metrics = compiled(holder['state'], batch)
        return float(metrics['loss'])

    def measure(compiled, deadline) -> dict:
        ensure_state()
        losses, times = [], []

        def step():
            t1 = time.perf_counter()
            losses.append(run_step(compiled))
            return time.perf_counter() - t1

        first = step()
        for _ in range(shape['warmup'] - 1):
            if time.perf_counter() > deadline:
                break
            step()
        while len(times) < shape['steps'] and (len(times) < 3 or time.perf_counter() < deadline):
            times.append(step())
        med = statistics.median(times)
        return dict(first_step_sec=first, timed_steps=len(times), median_step_sec=med, min_step_sec=min(times),
                    tokens_per_sec=b * t / med, mfu=mfu_lib.mfu(flops_per_step, med, 1, peak), first_loss=losses[0],
                    last_loss=losses[-1])

    dispatches = [d for d in args.dispatches.split(',') if d]
    remat, accum = candidates[0]
    t0 = time.perf_counter()
    built = build(dispatches, remat, accum)
    out['compile_wall_sec'] = time.perf_counter() - t0
    record(out)
    for d, deadline in zip(dispatches, clock.deadlines(len(dispatches))):
        compiled, compile_sec = built[d]
        # A compiled program is always timed (a few steps at least, even past the soft budget: the compile was the
        # expensive part); the parent's hard limit bounds the whole part.
        r = {'remat': remat, 'grad_accum_steps': accum, 'compile_sec': compile_sec}
        _log(f'train[{d}]: timing ({clock.elapsed():.0f}s into the part)')
        try:
            if not _ok(compiled):
                raise compiled
            r.update(measure(compiled, deadline))
        except Exception as e:  # pylint: disable=broad-except
            r['error'] = f'{type(e).__name__}: {str(e)[:2000]}'
            if _is_oom(e) and len(candidates) > 1 and clock.left() > 0:  # one retry, a step down the list
                retry = candidates[1]
                _log(f'train[{d}]: out of memory with remat={remat}, grad_accum={accum}; retrying with {retry}')
                try:
                    compiled, compile_sec = build([d], *retry)[d]
                    if not _ok(compiled):
                        raise compiled
                    r = {'remat': retry[0], 'grad_accum_steps': retry[1], 'compile_sec': compile_sec,
                         'oom_with': f'{remat}:{accum}', **measure(compiled, max(deadline, time.perf_counter()))}
                except Exception as e2:  # pylint: disable=broad-except
                    r['retry_error'] = f'{type(e2).__name__}: {str(e2)[:2000]}'
        if args.profile and 'median_step_sec' in r:
            r['profile'] = _profile(lambda: run_step(compiled), f'train_{d}')
        out['dispatch'][d] = r
        if 'median_step_sec' in r:
            _log(f'train[{d}]: {r["median_step_sec"] * 1e3:.1f} ms/step over {r["timed_steps"]} steps, '
                 f'{r["tokens_per_sec"]:,.0f} tokens/s, MFU {_fmt(r["mfu"], ".1f", 100, "%")}  (loss '
                 f'{r["first_loss"]:.3f} -> {r["last_loss"]:.3f}, remat={r["remat"]}, '
                 f'grad_accum={r["grad_accum_steps"]})')
        else:
            _log(f'train[{d}]: ' + (r.get('skipped') or f'FAILED: {r.get("error", "")[:300]}'))
        ok = {k: v for k, v in out['dispatch'].items() if 'median_step_sec' in v}
        if ok:
            out['best_dispatch'] = min(ok, key=lambda k: ok[k]['median_step_sec'])
            out['best_mfu'] = ok[out['best_dispatch']]['mfu']
        out['peak_bytes_in_use'] = _peak_memory()
        record(out)
    return out


def _profile(fn, name: str, per: int = 1) -> dict:
    """trace_summary.profile(fn) in a temporary folder, logged; the error string instead when tracing fails (a
    profile is an extra: it never costs the part its timings). `per`: the log line also gives ms per `per`."""
    import tempfile  # pylint: disable=import-outside-toplevel
    from benchmarks import trace_summary  # pylint: disable=import-outside-toplevel
    try:
        with tempfile.TemporaryDirectory() as tmp:
            summary = trace_summary.profile(fn, tmp)
        _log(f'{name} profile' + (f' (/{per}: {summary["device_ms"] / per:.3f} ms of device events each)'
                                  if per > 1 else '') + ':\n' + trace_summary.format_summary(summary))
        return summary
    except Exception as e:  # pylint: disable=broad-except
        _log(f'{name} profile failed: {type(e).__name__}: {str(e)[:300]}')
        return {'error': f'{type(e).__name__}: {str(e)[:2000]}'}


def _lower(jitted, *args):
    """jitted.lower(*args), or the exception (a trace-time failure is reported per program, not per part)."""
    try:
        return jitted.lower(*args)
    except Exception as e:  # pylint: disable=broad-except
        return e


def _ok(x) -> bool:
    return not isinstance(x, BaseException)


def compile_all(lowered: dict, serial: bool = False) -> dict:
    """{name: jax Lowered (or an exception)} -> {name: (Compiled or the exception, seconds)}.

    On accelerators, compiled from a thread pool: XLA compiles outside the GIL, so N programs take about the wall
    time of the slowest rather than the sum on the host's cores (the compiles all finish before any timing starts,
    so autotuning never overlaps a measurement). On CPU one at a time: there the compiles and the XLA:CPU
    programs share the same cores.
    """
    def one(item):
        name, low = item
        t0 = time.perf_counter()
        if not _ok(low):
            return name, (low, 0.0)
        try:
            return name, (low.compile(), time.perf_counter() - t0)
        except Exception as e:  # pylint: disable=broad-except
            return name, (e, time.perf_counter() - t0)

    import jax  # pylint: disable=import-outside-toplevel
    if serial or len(lowered) < 2 or jax.default_backend() == 'cpu':  # XLA:CPU: the compiles share the timed cores
        return dict(map(one, lowered.items()))
    with concurrent.futures.ThreadPoolExecutor(len(lowered)) as pool:
        return dict(pool.map(one, lowered.items()))


def _peak_memory() -> int | None:
    import jax  # pylint: disable=import-outside-toplevel
    try:
        return (jax.local_devices()[0].memory_stats() or {}).get('peak_bytes_in_use')
    except Exception:  # pylint: disable=broad-except  # CPU has no memory_stats
        return None


# ------------------------------------------------------------------------------------------------------- unet


def random_params(shapes, seed: int):
    """Random parameters on the device for a tree of jax.ShapeDtypeStruct, without compiling anything.

    Kernels ~ N(0, 1 / fan_in) (fan_in: every dimension but the last), 'scale' leaves 1, 'bias' leaves 0. Each
    kernel is a scaled view, at a random offset, of one host buffer of normal draws, copied to the device. The
    obvious ways cost compile time instead: the models' own initialisers under jax.jit took ~40 s to compile for
    even the tiny UNet on XLA:CPU, and one jitted program slicing a random buffer into SDXL's 1680 leaves 26 s.
    The weights' exact distribution does not change a timing.
    """
    import jax  # pylint: disable=import-outside-toplevel
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    rng = np.random.default_rng(seed)
    sizes = [int(np.prod(leaf.shape)) for _, leaf in leaves]
    base = rng.standard_normal(2 * max(sizes) + 1024, dtype=np.float32)
    offsets = [int(rng.integers(0, base.size - n + 1)) for n in sizes]

    def make(i):
        path, leaf = leaves[i]
        kind = str(getattr(path[-1], 'key', path[-1]))
        if kind == 'scale':
            return jax.device_put(np.ones(leaf.shape, leaf.dtype))
        if kind == 'bias':
            return jax.device_put(np.zeros(leaf.shape, leaf.dtype))
        fan_in = max(1, sizes[i] // max(1, leaf.shape[-1] if leaf.shape else 1))
        host = base[offsets[i]:offsets[i] + sizes[i]].reshape(leaf.shape) / np.float32(np.sqrt(fan_in))
        return jax.device_put(host.astype(leaf.dtype))

    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # numpy releases the GIL
        out = list(pool.map(make, range(len(leaves))))
    return _block(jax.tree_util.tree_unflatten(treedef, out))


def _image_configs(args, attention_impl: str):
    from mosaicjax.checkpoints import diffusers_parts  # pylint: disable=import-outside-toplevel
    from mosaicjax.checkpoints import diffusers_unet  # pylint: disable=import-outside-toplevel
    from mosaicjax.models import vae as vae_lib  # pylint: disable=import-outside-toplevel
    kw = dict(dtype='bfloat16', param_dtype='bfloat16', attention_impl=attention_impl)
    if args.tiny:
        ucfg = diffusers_unet.unet_config_from_diffusers(SDXL_TINY_UNET, **kw)
        vcfg = vae_lib.VAEConfig(**TINY_VAE, **kw)
    else:
        with open(os.path.join(SDXL_DIR, 'unet', 'config.json')) as f:
            ucfg = diffusers_unet.unet_config_from_diffusers(json.load(f), **kw)
        vcfg = diffusers_parts.vae_config_from_diffusers(os.path.join(SDXL_DIR, 'vae', 'config.json'), **kw)
    return ucfg, vcfg


def _image_programs(ucfg, vcfg, guidance: float):
    """(denoise(unet_params, x, context, added, n_steps) -> x, decode(vae_params, latents) -> images)."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from mosaicjax.models import unet as unet_lib  # pylint: disable=import-outside-toplevel
    from mosaicjax.models import vae as vae_lib  # pylint: disable=import-outside-toplevel
    unet, vae = unet_lib.UNet2DConditionModel(ucfg), vae_lib.AutoencoderKL(vcfg)

    def denoise(unet_params, x, context, added, n_steps):
        """x [B, h, w, 4] float32; context [2B, text, width]; n_steps int32 scalar (traced: one program)."""
        dt = 1.0 / n_steps.astype(jnp.float32)

        def body(i, x):
            t = 999.0 * (1.0 - i.astype(jnp.float32) * dt)  # 999 -> ~0
            eps = unet.apply({'params': unet_params}, jnp.concatenate([x, x], axis=0), t, context, added)
            eps_uncond, eps_text = jnp.split(eps.astype(jnp.float32), 2, axis=0)
            return x - dt * (eps_uncond + guidance * (eps_text - eps_uncond))  # Euler-like update

        return jax.lax.fori_loop(0, n_steps, body, x)

    def decode(vae_params, latents):
        z = vae_lib.unscale_latents(latents, vcfg).astype(jnp.bfloat16)
        image = vae.apply({'params': vae_params}, z, method='decode')
        return jnp.clip(image.astype(jnp.float32) * 0.5 + 0.5, 0.0, 1.0)  # [B, H, W, 3]

    return jax.jit(denoise), jax.jit(decode)


def _timed_repeats(fn, repeats: int, deadline: float) -> list[float]:
    """Runs fn() (which blocks) at least once and up to `repeats` times while before the deadline."""
    times = []
    while len(times) < repeats and (not times or time.perf_counter() < deadline):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def part_unet(args, record) -> dict:
    clock = Clock(args.budget_unet)
    try:
        return _unet_run(args, record, clock, 'auto')
    except CudnnFailure as e:
        # 'auto' picks cuDNN's fused attention on GPU when it accepts the shapes at trace time; should cuDNN still
        # fail at compile time, the part is retried once with XLA's attention.
        _log(f'unet: a program failed with cuDNN attention ({str(e)[:300]}); retrying with XLA attention')
        out = _unet_run(args, record, clock, 'xla')
        out['cudnn_error'] = str(e)[:2000]
        record(out)
        return out


class CudnnFailure(RuntimeError):
    pass


def _unet_run(args, record, clock, attention_impl: str) -> dict:
    import flax.linen as nn  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from mosaicjax.models import unet as unet_lib  # pylint: disable=import-outside-toplevel
    from mosaicjax.models import vae as vae_lib  # pylint: disable=import-outside-toplevel

    shape = TINY_UNET if args.tiny else UNET
    ucfg, vcfg = _image_configs(args, attention_impl)
    f = vcfg.downsample_factor
    side = shape['image'] // f
    text_width = ucfg.projection_class_embeddings_input_dim - 6 * ucfg.addition_time_embed_dim  # pooled text
    t0 = time.perf_counter()
    unet_params = random_params(unet_lib.param_shapes(ucfg), 0)
    vae_params = random_params(jax.eval_shape(lambda: nn.meta.unbox(vae_lib.AutoencoderKL(vcfg).init(
        jax.random.key(0), jnp.zeros((1, 8 * f, 8 * f, vcfg.in_channels), jnp.bfloat16))['params'])), 1)
    init_s = time.perf_counter() - t0
    n_unet = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(unet_params))
    n_vae = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(vae_params))
    out = dict(image=f'{shape["image"]}x{shape["image"]}', latents=f'{side}x{side}', steps=shape['steps'],
               guidance='cfg (UNet batch = 2 x images)', dtype='bfloat16', param_dtype='bfloat16',
               attention_impl=attention_impl, unet_params=n_unet, vae_params=n_vae, init_sec=init_s,
               target_sec_per_image=TARGET_S_PER_IMAGE, batch={})
    record(out)
    _log(f'unet: {_count(n_unet)} UNet + {_count(n_vae)} VAE params initialised in {init_s:.1f}s; {out["image"]} '
         f'images, {out["latents"]} latents, {shape["steps"]} steps')

    denoise, decode = _image_programs(ucfg, vcfg, shape['guidance'])
    rng = np.random.default_rng(0)
    batches = shape['batches']
    inputs, lowered = {}, {}
    for b in batches:
        x = jnp.asarray(rng.standard_normal((b, side, side, ucfg.in_channels)), jnp.float32)
        context = jnp.asarray(rng.standard_normal((2 * b, shape['text_len'], ucfg.cross_attention_dims[0])),
                              jnp.bfloat16)
        size = float(shape['image'])
        added = {'text_embeds': jnp.asarray(rng.standard_normal((2 * b, text_width)), jnp.float32),
                 'time_ids': jnp.broadcast_to(jnp.asarray([size, size, 0.0, 0.0, size, size], jnp.float32), (2 * b, 6))}
        inputs[b] = (x, context, added)
        lowered[f'denoise_{b}'] = _lower(denoise, unet_params, x, context, added, jnp.int32(1))
        lowered[f'decode_{b}'] = _lower(decode, vae_params, jax.ShapeDtypeStruct(x.shape, jnp.float32))
    t0 = time.perf_counter()
    built = compile_all(lowered, args.serial_compile)
    out['compile_wall_sec'] = time.perf_counter() - t0
    _log(f'unet: compiled {len(built)} programs in {out["compile_wall_sec"]:.1f}s wall: '
         + ', '.join(f'{k} {sec:.1f}s' + ('' if _ok(c) else ' FAILED') for k, (c, sec) in built.items()))
    failures = [c for c, _ in built.values() if not _ok(c)]
    if attention_impl == 'auto' and any('cudnn' in str(e).lower() for e in failures):
        raise CudnnFailure(next(str(e) for e in failures if 'cudnn' in str(e).lower()))
    record(out)

    for b, deadline in zip(batches, clock.deadlines(len(batches))):
        (den, den_c), (dec, dec_c) = built[f'denoise_{b}'], built[f'decode_{b}']
        r = {'unet_batch': 2 * b, 'unet_compile_sec': den_c, 'vae_compile_sec': dec_c}
        try:  # compiled programs are always timed (once at least); the parent's hard limit bounds the part
            r.update(_measure_image(den, dec, unet_params, vae_params, inputs[b], shape, deadline))
        except Exception as e:  # pylint: disable=broad-except
            traceback.print_exc()
            r['error'] = f'{type(e).__name__}: {str(e)[:2000]}'
        out['batch'][b] = r
        out['peak_bytes_in_use'] = _peak_memory()
        record(out)
        if 'sec_per_request' in r:
            _log(f'unet[batch {b}]: {r["sec_per_request"]:.3f} s/request ({r["denoise_sec"]:.3f} s denoising = '
                 f'{1e3 * r["unet_call_sec"]:.1f} ms/UNet call at batch {2 * b}, '
                 f'VAE decode {r["vae_decode_sec"]:.3f} s), {r["images_per_sec"]:.3f} images/s'
                 + (f'  [target {TARGET_S_PER_IMAGE:.1f} s/image]' if b == 1 else ''))
        else:
            _log(f'unet[batch {b}]: ' + (r.get('skipped') or f'FAILED: {r.get("error", "")[:300]}'))
    return out


def _measure_image(den, dec, unet_params, vae_params, inputs, shape, deadline) -> dict:
    """Times the compiled denoising loop (shape['steps'] steps) and the VAE decode of its latents."""
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    if not _ok(den):
        raise den
    if not _ok(dec):
        raise dec
    x, context, added = inputs
    b = x.shape[0]
    _block(den(unet_params, x, context, added, jnp.int32(1)))  # warm-up: one step of the same program
    steps = jnp.int32(shape['steps'])
    res = {}

    def run_denoise():
        res['latents'] = _block(den(unet_params, x, context, added, steps))

    def run_decode():
        res['images'] = _block(dec(vae_params, res['latents']))

    den_times = _timed_repeats(run_denoise, shape['repeats'], deadline)
    run_decode()  # warm-up
    dec_times = _timed_repeats(run_decode, shape['repeats'], deadline)
    den_s, dec_s = statistics.median(den_times), statistics.median(dec_times)
    images = np.asarray(res['images'])
    return dict(denoise_sec=den_s, unet_call_sec=den_s / shape['steps'], vae_decode_sec=dec_s,
                sec_per_request=den_s + dec_s, sec_per_image=(den_s + dec_s) / b, images_per_sec=b / (den_s + dec_s),
                denoise_runs=len(den_times), decode_runs=len(dec_times), image_shape=list(images.shape),
                finite=bool(np.isfinite(images).all()))


# ----------------------------------------------------------------------------------------------------- decode


def part_decode(args, record) -> dict:
    import flax.linen as nn  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from mosaicjax.models import dbrx  # pylint: disable=import-outside-toplevel
    from mosaicjax.generation import Generator, SamplingParams  # pylint: disable=import-outside-toplevel

    clock = Clock(args.budget_decode)
    shape = TINY_TRAIN if args.tiny else TRAIN
    lengths = TINY_DECODE if args.tiny else DECODE
    p_len, n_new = lengths['prompt_len'], lengths['max_new_tokens']
    max_len = 1 << (p_len + n_new - 1).bit_length()  # one length bucket: every call reuses the same two programs
    cfg = _dbrx_config(shape, max_seq_len=max_len, dtype='bfloat16', param_dtype='bfloat16',
                       attention_impl=args.attention_impl)
    t0 = time.perf_counter()
    model = dbrx.Dbrx(cfg)
    params = _block(jax.jit(lambda k: nn.unbox(model.init(k, jnp.zeros((1, 8), jnp.int32))['params']))(
        jax.random.key(0)))
    init_s = time.perf_counter() - t0
    counts = _param_counts(cfg)
    kv_bytes_per_token = 2 * cfg.n_layers * cfg.kv_n_heads * cfg.head_dim * 2  # k and v, bfloat16
    mean_context = p_len + n_new / 2
    bytes_per_token = counts['active_params_no_embedding'] * 2 + kv_bytes_per_token * mean_context
    bandwidth = hbm_bandwidth(jax.devices()[0].device_kind)
    bound = bandwidth / bytes_per_token if bandwidth else None
    out = dict(config={k: shape[k] for k in ('d_model', 'n_heads', 'kv_n_heads', 'n_layers', 'ffn_hidden_size',
                                             'moe_num_experts', 'moe_top_k', 'vocab_size')},
               **counts, dtype='bfloat16', param_dtype='bfloat16', batch=1, prompt_len=p_len, max_new_tokens=n_new,
               cache_len=max_len, init_sec=init_s, weight_bytes_per_token=counts['active_params_no_embedding'] * 2,
               kv_bytes_per_token_mean=kv_bytes_per_token * mean_context, bytes_per_token=bytes_per_token,
               hbm_bandwidth_bytes_per_sec=bandwidth, bound_tokens_per_sec=bound)
    record(out)
    _log(f'decode: {_count(counts["active_params"])} active params (bf16) initialised in {init_s:.1f}s; '
         f'{bytes_per_token / 1e9:.3f} GB read per token' +
         (f', bandwidth bound {bound:,.0f} tokens/s' if bound else ', bandwidth unknown for this device'))

    gen = Generator(cfg, params, max_batch=1, min_length=cfg.max_seq_len)
    prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, p_len).tolist()

    def generate(n):
        [c] = gen.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0))
        return c.tokens

    def timed(fn):
        t1 = time.perf_counter()
        fn()
        return time.perf_counter() - t1

    out['warmup_incl_compile_sec'] = timed(lambda: (generate(1), generate(2)))  # compiles prefill and decode
    _log(f'decode: prefill + decode compiled and warmed up in {out["warmup_incl_compile_sec"]:.1f}s')
    t_first = sorted(timed(lambda: generate(1)) for _ in range(3))[1]  # prefill + first token: median of 3
    fulls = []
    while len(fulls) < 3 and (not fulls or clock.left() > 2 * fulls[-1]):
        fulls.append(timed(lambda: generate(n_new)))
    t_full = min(fulls)
    out.update(t_first_sec=t_first, t_full_sec=t_full, full_runs=len(fulls), end_to_end_tokens_per_sec=n_new / t_full)
    if t_full <= t_first:  # timer noise larger than the whole decode (tiny shapes only)
        raise RuntimeError(f'{n_new} tokens took {t_full:.4f}s, no longer than 1 token ({t_first:.4f}s)')
    tps = (n_new - 1) / (t_full - t_first)
    out.update(decode_tokens_per_sec=tps, ms_per_token=1e3 / tps, fraction_of_bound=tps / bound if bound else None)
    if args.profile:
        out['profile'] = _profile(lambda: generate(n_new), 'decode', per=n_new)
    record(out)
    _log(f'decode: {tps:,.1f} tokens/s ({1e3 / tps:.2f} ms/token; prefill {p_len} + 1 token {1e3 * t_first:.1f} ms)'
         + (f' = {100 * tps / bound:.1f}% of the {bound:,.0f} tokens/s bandwidth bound' if bound else ''))
    return out


PART_FNS = {'train': part_train, 'unet': part_unet, 'decode': part_decode}


# ------------------------------------------------------------------------------------------------- the report


def _fmt(v, spec='.3f', scale=1.0, suffix=''):
    return '-' if v is None else f'{v * scale:{spec}}{suffix}'


def format_table(report: dict) -> str:
    """The human-readable summary of device_report.json."""
    meta = report.get('meta', {})
    lines = [f"device: {meta.get('device_kind')} ({meta.get('backend')}), jax {meta.get('jax_version')}, "
             f"peak {_fmt(meta.get('peak_flops_per_device'), '.1f', 1e-12)} TFLOP/s bf16, "
             f"HBM {_fmt(meta.get('hbm_bandwidth_bytes_per_sec'), '.2f', 1e-12)} TB/s", '']
    tr = report.get('train')
    if tr is not None:
        lines.append(f"train: DBRX {_count(tr.get('active_params'))} active / "
                     f"{_count(tr.get('total_params'))} total params, batch "
                     f"{tr.get('config', {}).get('batch')} x {tr.get('config', {}).get('seq')}, bf16 compute")
        lines.append(f"  {'dispatch':10s}{'ms/step':>10s}{'tokens/s':>12s}{'MFU':>8s}{'compile s':>11s}"
                     f"{'steps':>7s}  remat:accum")
        for d, r in tr.get('dispatch', {}).items():
            if 'median_step_sec' in r:
                lines.append(f"  {d:10s}{r['median_step_sec'] * 1e3:10.1f}{r['tokens_per_sec']:12,.0f}"
                             f"{_fmt(r.get('mfu'), '.1f', 100, '%'):>8s}{r['compile_sec']:11.1f}{r['timed_steps']:7d}"
                             f"  {r['remat']}:{r['grad_accum_steps']}")
            else:
                lines.append(f"  {d:10s}  {(r.get('error') or r.get('skipped') or '?')[:100]}")
        if 'best_dispatch' in tr:
            lines.append(f"  best: {tr['best_dispatch']} (MFU {_fmt(tr.get('best_mfu'), '.1f', 100, '%')})")
        if 'error' in tr:
            lines.append(f"  ERROR: {tr['error'][:300]}")
        lines.append('')
    un = report.get('unet')
    if un is not None:
        lines.append(f"unet: SDXL UNet {_count(un.get('unet_params'))} + VAE "
                     f"{_count(un.get('vae_params'))} params, {un.get('image')}, {un.get('steps')} steps, CFG, "
                     f"bf16, attention {un.get('attention_impl')}; target {TARGET_S_PER_IMAGE:.1f} s/image")
        lines.append(f"  {'images':>6s}{'s/request':>11s}{'denoise s':>11s}{'ms/UNet':>9s}{'decode s':>10s}"
                     f"{'images/s':>10s}{'compile s':>11s}")
        for b, r in un.get('batch', {}).items():
            if 'sec_per_request' in r:
                lines.append(f"  {b:>6}{r['sec_per_request']:11.3f}{r['denoise_sec']:11.3f}"
                             f"{r['unet_call_sec'] * 1e3:9.1f}{r['vae_decode_sec']:10.3f}{r['images_per_sec']:10.3f}"
                             f"{r['unet_compile_sec'] + r['vae_compile_sec']:11.1f}")
            else:
                lines.append(f"  {b:>6}  {(r.get('error') or r.get('skipped') or '?')[:100]}")
        one = un.get('batch', {}).get('1', un.get('batch', {}).get(1, {}))
        if 'sec_per_image' in one:
            verdict = 'met' if one['sec_per_image'] <= TARGET_S_PER_IMAGE else 'NOT met'
            lines.append(f"  batch 1: {one['sec_per_image']:.2f} s/image vs the target {TARGET_S_PER_IMAGE:.1f} s: "
                         f"{verdict}")
        if 'error' in un:
            lines.append(f"  ERROR: {un['error'][:300]}")
        lines.append('')
    de = report.get('decode')
    if de is not None:
        lines.append(f"decode: DBRX {_count(de.get('active_params'))} active params, bf16, batch 1, greedy, "
                     f"prompt {de.get('prompt_len')} + {de.get('max_new_tokens')} new tokens")
        if 'decode_tokens_per_sec' in de:
            lines.append(f"  {de['decode_tokens_per_sec']:,.1f} tokens/s ({de['ms_per_token']:.2f} ms/token), "
                         f"prefill + 1 token {de['t_first_sec'] * 1e3:.1f} ms; bound "
                         f"{_fmt(de.get('bound_tokens_per_sec'), ',.0f')} tokens/s "
                         f"({_fmt(de.get('bytes_per_token'), '.3f', 1e-9)} GB/token) -> "
                         f"{_fmt(de.get('fraction_of_bound'), '.1f', 100, '%')} of the bound")
        if 'error' in de:
            lines.append(f"  ERROR: {de['error'][:300]}")
    return '\n'.join(lines)


def _run_child(args, part: str) -> None:
    """One part in this process: writes OUT/<part>.partial.json after every sub-measurement."""
    path = os.path.join(args.out, f'{part}.partial.json')
    state = {}

    def record(d):
        state['result'] = d
        _write_json(path, d)

    try:
        record(PART_FNS[part](args, record))
    except Exception as e:  # pylint: disable=broad-except
        traceback.print_exc()
        result = dict(state.get('result') or {})
        result['error'] = f'{type(e).__name__}: {str(e)[:4000]}'
        record(result)


def _device_meta(env) -> dict:
    """device_info() from a short child process (the parent never starts a backend: on a GPU it would hold the
    memory the parts need)."""
    code = ('import json; from benchmarks import device_report as d; '
            'print("DEVICE_INFO " + json.dumps(d._clean(d.device_info())))')
    try:
        proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=180)
        line = next((x for x in proc.stdout.splitlines() if x.startswith('DEVICE_INFO ')), None)
        if line is None:
            return {'error': f'device query failed (exit code {proc.returncode}): {proc.stderr[-2000:]}'}
        return json.loads(line[len('DEVICE_INFO '):])
    except Exception as e:  # pylint: disable=broad-except
        return {'error': f'{type(e).__name__}: {e}'}


def _run_part(part: str, passthrough: list, env, out_dir: str, hard: float) -> dict:
    """Runs one part in a child process (killed after `hard` seconds); returns what it recorded."""
    partial = os.path.join(out_dir, f'{part}.partial.json')
    if os.path.exists(partial):
        os.remove(partial)
    t0 = time.perf_counter()
    error = None
    try:
        proc = subprocess.run([sys.executable, '-m', 'benchmarks.device_report', *passthrough, f'--child={part}'],
                              cwd=ROOT, env=env, timeout=hard)
        if proc.returncode:
            error = f'child process exited with code {proc.returncode}'
    except subprocess.TimeoutExpired:
        error = f'killed at the hard limit of {hard:.0f}s (what it recorded before is kept)'
    result = {}
    if os.path.exists(partial):
        with open(partial) as f:
            result = json.load(f)
        os.remove(partial)
    if error and 'error' not in result:
        result['error'] = error
    elif not result:
        result['error'] = 'the part recorded nothing'
    result['wall_sec'] = time.perf_counter() - t0
    return result


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.child:
        _run_child(args, args.child)
        return {}
    start = time.perf_counter()
    env = dict(os.environ)
    env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.92')
    report_path = os.path.join(args.out, 'device_report.json')
    report = {'meta': {'command': ' '.join(['python -m benchmarks.device_report'] + argv), 'tiny': args.tiny,
                       'started': time.strftime('%Y-%m-%d %H:%M:%S'), **_device_meta(env)}}
    _log(f'device: {json.dumps(report["meta"])}')
    _write_json(report_path, report)
    passthrough = without_flags(argv, ('--parts', '--child'))
    for part in args.parts:
        budget = getattr(args, f'budget_{part}')
        total_left = args.total_budget - (time.perf_counter() - start)
        hard = min(1.25 * budget + 15, total_left)
        if hard < 10:
            report[part] = {'error': f'skipped: the total budget of {args.total_budget:.0f}s is spent'}
        else:
            _log(f'{part}: started (soft budget {budget:.0f}s, hard limit {hard:.0f}s)')
            report[part] = _run_part(part, passthrough, env, args.out, hard)
        _write_json(report_path, report)
        err = report[part].get('error')
        _log(f'{part}: done in {report[part].get("wall_sec", 0):.0f}s'
             + (f' with an error: {err[:300]}' if err else ''))
    print('\n' + format_table(report), flush=True)
    print(f'\nwritten: {report_path}', flush=True)
    return report


if __name__ == '__main__':
    main()
