"""Training throughput on CPU: mosaicjax's jitted train step vs transformers' DbrxForCausalLM, side by side.

    python -m benchmarks.train_throughput                      # the default small DBRX (below), 10 timed steps
    python -m benchmarks.train_throughput --steps=3 --batch=2  # smoke run
    python -m benchmarks.train_throughput --profile=/tmp/prof  # + a JAX profiler trace of the timed steps
    python -m benchmarks.train_throughput --rounds=3           # alternate the sides 3 times: median ratio

Both sides do the same work per step: forward, next-token cross-entropy + the HF load-balancing loss
(moe_loss_weight 0.05, router logits of every layer), backward, global-norm clipping to 1.0 and AdamW
(b1 0.9, b2 0.95, eps 1e-8, weight decay 0.1), in float32, on the same weights (the JAX initialisation is
converted with mosaicjax.checkpoints.hf_dbrx.params_to_hf and loaded into torch), the same batch and the same
CPU, each framework in a fresh subprocess, one after the other. torch uses --threads intra-op threads (default:
all cores) and SDPA attention; JAX runs mosaicjax.trainer.step.make_train_step under jax.jit with the state
donated, with the model's defaults (moe_dispatch 'auto' = 'blocked' on CPU) unless flags say otherwise, in the
environment `python -m mosaicjax.train` gives itself on CPU (glibc's huge-page tunable, mosaicjax.host_memory;
--huge_pages=0 keeps this environment as it is; `--only=jax` runs always keep it).

Reported: median step time over the timed steps (after warm-up steps, which include JAX's compilation),
training tokens/s = batch * seq / median, and the same per CPU-second of the process (robust on a shared
machine). The ratios are mosaicjax / transformers. On a busy machine run it pinned to one core for both:
    taskset -c 0 python -m benchmarks.train_throughput --threads=1
(torch's OpenMP threads spin-wait: on a 2-core machine shared with other jobs its 2-thread step took 6 s
and 6 CPU-seconds where the pinned 1-thread step took 1 s, so unpinned numbers there flatter mosaicjax.)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import dbrx_config, without_flags
from mosaicjax import host_memory

# The default configuration: a small DBRX with every DBRX feature on (GQA, clip_qkv, fine-grained top-2 MoE).
DEFAULTS = dict(d_model=256, n_heads=8, kv_n_heads=2, n_layers=4, ffn_hidden_size=512, moe_num_experts=8,
                moe_top_k=2, vocab_size=4096, batch=8, seq=256)


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in DEFAULTS.items():
        p.add_argument(f'--{name}', type=int, default=value)
    p.add_argument('--steps', type=int, default=10, help='timed steps per framework')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps first (JAX compiles in the first)')
    p.add_argument('--threads', type=int, default=os.cpu_count(), help='torch intra-op threads')
    p.add_argument('--moe_dispatch', default='auto', help="DbrxConfig.moe_dispatch ('auto' = 'sorted' on CPU)")
    p.add_argument('--moe_block_size', type=int, default=0, help="'sorted' dispatch block rows (0 = derived)")
    p.add_argument('--attention_impl', default='auto', help='DbrxConfig.attention_impl')
    p.add_argument('--scan_layers', type=int, default=1, help='DbrxConfig.scan_layers (1: nn.scan, 0: unrolled)')
    p.add_argument('--huge_pages', type=int, default=1,
                   help='1: start the JAX side with the environment `python -m mosaicjax.train` gives itself on '
                        'CPU (mosaicjax.host_memory: glibc huge pages); 0: this environment as it is')
    p.add_argument('--rounds', type=int, default=1,
                   help='alternate the two sides this many times; report each round and the median ratio')
    p.add_argument('--only', choices=('jax', 'torch'), default=None, help='run one side only')
    p.add_argument('--profile', default=None, help='directory for a jax.profiler trace of the timed steps')
    p.add_argument('--json', default=None, help='also write the results to this JSON file')
    return p.parse_args(argv)


def _config(args):
    return dbrx_config(args, max_seq_len=max(args.seq, 8), moe_loss_weight=0.05, moe_dispatch=args.moe_dispatch,
                       moe_block_size=args.moe_block_size, attention_impl=args.attention_impl,
                       scan_layers=bool(args.scan_layers))


def _batch(args):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, args.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
    return tokens[:, :-1], tokens[:, 1:]  # inputs, next-token targets


def _time(step, n_warmup, n_steps, profile_dir=None):
    """Runs step() n_warmup + n_steps times (step must block until done).

    Returns (wall seconds, process CPU seconds) of each timed step. CPU seconds (all threads of this process)
    are what a shared machine cannot inflate: with every core busy elsewhere the wall time of both frameworks
    is noise, but their CPU time per step stays put (pin both to one core with `taskset -c 0` to compare
    single-threaded work without spin-waiting threads counted).
    """
    for _ in range(n_warmup):
        step()
    if profile_dir:
        import jax  # pylint: disable=import-outside-toplevel
        jax.profiler.start_trace(profile_dir, create_perfetto_trace=True)
    walls, cpus = [], []
    for _ in range(n_steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    if profile_dir:
        jax.profiler.stop_trace()
    return walls, cpus


def _init_state(args, cfg):
    """(model, tx, schedule, TrainState): the trainer's own initialisation, seed 0, on both sides' weights."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from mosaicjax.models import dbrx  # pylint: disable=import-outside-toplevel
    from mosaicjax.trainer import optimizer as optimizer_lib  # pylint: disable=import-outside-toplevel
    from mosaicjax.trainer import state as state_lib  # pylint: disable=import-outside-toplevel

    model = dbrx.Dbrx(cfg)
    opt_cfg = optimizer_lib.OptimizerConfig(learning_rate=1e-4, warmup_steps=0, weight_decay=0.1,
                                            grad_clip_norm=1.0)
    tx, schedule = optimizer_lib.make_optimizer(opt_cfg, args.warmup + args.steps)
    state = jax.jit(state_lib.make_init_fn(model, tx, (jnp.zeros((1, 8), jnp.int32),), seed=0))()
    return model, tx, schedule, state


def run_jax(args, cfg, inputs, targets):
    """Returns (step times, first-step loss, compile + first step seconds)."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from mosaicjax.trainer import step as step_lib  # pylint: disable=import-outside-toplevel

    model, tx, schedule, state = _init_state(args, cfg)
    train_step = jax.jit(step_lib.make_train_step(model, tx, schedule, grad_accum_steps=1, z_loss_weight=0.0,
                                                  moe_loss_weight=cfg.moe_loss_weight, router_z_loss_weight=0.0),
                         donate_argnums=(0,))
    b, t = inputs.shape
    batch = {'inputs': jnp.asarray(inputs), 'targets': jnp.asarray(targets),
             'segment_ids': jnp.ones((b, t), jnp.int32),
             'positions': jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
             'weights': jnp.ones((b, t), jnp.float32)}
    holder = {'state': state, 'losses': []}

    def step():
        holder['state'], metrics = train_step(holder['state'], batch)
        holder['losses'].append(float(metrics['loss']))  # blocks until the step is done

    t0 = time.perf_counter()
    step()
    compile_and_first = time.perf_counter() - t0
    times = _time(step, max(args.warmup - 1, 0), args.steps, args.profile)
    return times, holder['losses'][0], compile_and_first


def run_torch(args, cfg, inputs, targets):
    """Returns (step times, first-step loss) for transformers' DbrxForCausalLM on the same weights."""
    import jax  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    from mosaicjax.checkpoints import hf_dbrx  # pylint: disable=import-outside-toplevel

    params0 = jax.tree.map(np.asarray, _init_state(args, cfg)[3].params)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf_cfg = transformers.DbrxConfig(**hf_dbrx.config_to_hf(cfg))
    hf_cfg.output_router_logits = True  # the load-balancing loss, as mosaicjax's trainer adds it
    hf_cfg._attn_implementation = 'sdpa'  # pylint: disable=protected-access
    model = transformers.DbrxForCausalLM(hf_cfg)
    sd = hf_dbrx.params_to_hf({'params': params0}, cfg)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{'params': decay, 'weight_decay': 0.1}, {'params': no_decay, 'weight_decay': 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    ids = torch.from_numpy(np.asarray(inputs, np.int64))
    tgt = torch.from_numpy(np.asarray(targets, np.int64)).reshape(-1)  # already the next tokens: no HF shift
    losses = []

    def step():
        out = model(input_ids=ids)  # logits [batch, seq, vocab] and aux_loss (HF load balancing)
        ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(), tgt)
        (ce + hf_cfg.router_aux_loss_coef * out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(ce.detach()))

    times = _time(step, args.warmup, args.steps)
    return times, losses[0]


def _run_side(args, side: str) -> dict:
    """Measures one framework in this process; returns its results dict."""
    cfg = _config(args)
    inputs, targets = _batch(args)
    tokens = args.batch * args.seq
    if side == 'jax':
        import jax  # pylint: disable=import-outside-toplevel
        times, loss, first = run_jax(args, cfg, inputs, targets)
        extra = {'compile_and_first_step_sec': first, 'moe_dispatch': cfg.moe_dispatch,
                 'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
                 'attention_impl': cfg.attention_impl, 'backend': jax.default_backend()}
    else:
        times, loss = run_torch(args, cfg, inputs, targets)
        extra = {'threads': args.threads, 'attention': 'sdpa'}
    walls, cpus = times
    med, cpu = statistics.median(walls), statistics.median(cpus)
    return {'median_step_sec': med, 'tokens_per_sec': tokens / med, 'median_step_cpu_sec': cpu,
            'tokens_per_cpu_sec': tokens / cpu, 'first_loss': loss, 'step_secs': walls, 'step_cpu_secs': cpus,
            **extra}


def _line(name, r):
    first = (f', first step incl. compile {r["compile_and_first_step_sec"]:.1f} s'
             if 'compile_and_first_step_sec' in r else '')
    return (f'{name:12s} {r["tokens_per_sec"]:10.1f} tokens/s  {r["tokens_per_cpu_sec"]:10.1f} tokens/cpu-s  '
            f'(median step {r["median_step_sec"] * 1e3:.1f} ms, {r["median_step_cpu_sec"] * 1e3:.1f} cpu-ms'
            f'{first}, first-step loss {r["first_loss"]:.4f})')


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    if args.only:  # one side, in this process (what the parent below runs in a fresh child per side)
        results = {('mosaicjax' if args.only == 'jax' else 'transformers'): _run_side(args, args.only)}
        print(_line(*next(iter(results.items()))), flush=True)
    else:
        print(f'config: {json.dumps({k: getattr(args, k) for k in DEFAULTS})} float32, {os.cpu_count()} cores, '
              f'{args.warmup} warm-up + {args.steps} timed steps', flush=True)
        # Each framework in its own fresh process, one after the other, so neither runs next to the other's
        # idle thread pools or inherits its allocator state.
        results = {'config': {k: getattr(args, k) for k in DEFAULTS}, 'cpu_count': os.cpu_count(), 'rounds': []}
        passthrough = without_flags(argv, ('--json', '--only', '--rounds'))
        # Rounds alternate the sides (jax, torch, jax, torch, ...) so a machine whose speed drifts -- a shared
        # VM's neighbours -- slows both alike; the median of the per-round ratios is the figure to quote.
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.rounds):
                one = {}
                for side, name in (('jax', 'mosaicjax'), ('torch', 'transformers')):
                    out = os.path.join(tmp, f'{side}{i}.json')
                    env = host_memory.environ() if side == 'jax' and args.huge_pages else None
                    subprocess.run([sys.executable, '-m', 'benchmarks.train_throughput', *passthrough,
                                    f'--only={side}', f'--json={out}'], check=True, env=env)
                    with open(out) as f:
                        one[name] = json.load(f)[name]
                one['ratio'] = one['mosaicjax']['tokens_per_sec'] / one['transformers']['tokens_per_sec']
                one['cpu_ratio'] = one['mosaicjax']['tokens_per_cpu_sec'] / one['transformers']['tokens_per_cpu_sec']
                results['rounds'].append(one)
                if args.rounds > 1:
                    print(f"round {i + 1}: {one['ratio']:.2f}x tokens/s, {one['cpu_ratio']:.2f}x per CPU-second",
                          flush=True)
        rounds = results['rounds']
        mid = sorted(rounds, key=lambda r: r['ratio'])[(len(rounds) - 1) // 2]  # median round (lower for even)
        results['mosaicjax'], results['transformers'] = mid['mosaicjax'], mid['transformers']
        results['ratio'] = statistics.median(r['ratio'] for r in rounds)
        results['cpu_ratio'] = statistics.median(r['cpu_ratio'] for r in rounds)
        print(f"ratio mosaicjax / transformers: {results['ratio']:.2f}x training tokens/s (target >= 1.2x); "
              f"{results['cpu_ratio']:.2f}x tokens per CPU-second"
              + (f" (medians of {len(rounds)} rounds)" if len(rounds) > 1 else ''), flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == '__main__':
    main()
