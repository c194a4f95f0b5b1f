"""Model size and per-device memory planning for DBRX configs, without devices and without allocating.

Counts come from the real parameter tree: `jax.eval_shape` of `Dbrx.init` gives every parameter's shape, dtype and
logical axis names (the same boxes the trainer shards from), so a size table can never drift from the model.

Per-device bytes follow the trainer's layout: each parameter's logical axes go through the logical-axis rules
(mosaicjax/parallel/rules.py) to mesh axes, and every dimension is divided by the product of the sizes of the mesh
axes it is split over (rounded up: GSPMD pads uneven shards). The mesh comes from
`mosaicjax.parallel.mesh.resolve_shape(shape, num_devices)`, so a 256-chip pod can be planned on a laptop.

Memory per device (p = parameter dtype bytes, a = compute dtype bytes, t = tensor size, L = layers, d = d_model,
H/KV = query/kv heads, hd = head_dim, E/k = experts/top-k, f = ffn_hidden_size, V = vocab, T = seq_len):

  parameters   sum over parameters of prod(local shard shape) * p        (float32 by default: the master copy)
  optimizer    the real optimizer's state from `jax.eval_shape(tx.init)`, each moment sharded like the parameter it
               tracks (AdamW: mu and nu in the parameter dtype, i.e. 2 * parameters); counters replicated
  gradients    parameters, doubled when train.grad_accum_steps > 1 (the accumulator plus one microbatch's)
  activations  an estimate (XLA's fusion and buffer reuse move the real number by tens of percent):
      b = ceil(batch_size / (data * fsdp * expert) / grad_accum_steps) sequences per device per microbatch,
      n = b * T tokens, and per token per layer
        mm   = a * ((H + 2KV) * hd / t + H * hd / t + d)      qkv, attention output, out_proj output
             + 8 * E                                           router logits and probabilities (float32)
             + a * k * (2f + d)                                w1 and v1 outputs and w2 output, per routed copy
        ew   = a * (4d + k * (f + d) + (H + KV) * hd / t)      norms, residual sums, GLU product, gathered expert
                                                               inputs, rotated q and k
        core = (H / t) * T * (4 + a) when attention materialises its scores (any attention_impl but 'cudnn', 'chunked':
               float32 scores and probabilities per query), else 4 * H / t (flash attention's row statistics)
      saved per layer for the backward pass, by DbrxConfig.remat:
        'full' a * d (the block input: the scan carry)
        'dots' a * d + mm + a * (H / t) * T  (matmul outputs, attention scores included, when materialised)
        'none' mm + ew + core
      activations = n * (L * saved + 2 * (mm + ew + core))     + the one layer being recomputed and its gradients
                  + n * (3 * 4 * V / t + 2 * a * d)            float32 logits, log-softmax and their gradient
                  + b * T * T                                  the boolean attention mask
                  + 2 * p * (one layer's parameters sharded over every mesh axis but fsdp)
                                                               FSDP all-gathers a layer's weights for compute and
                                                               holds its full gradient until the reduce-scatter
  fits         total <= (1 - HEADROOM) * device memory (XLA's scratch space and fragmentation need the rest)

Calibration (XLA:CPU `compiled.memory_analysis()` of the trainer's real train step, one device, a 4-layer
d_model=256 config, 'sorted' dispatch): with remat='full' (every experiments/dbrx config) gradients + activations
came within 1% of XLA's temp bytes at T=512 and T=1024. With 'dots' and 'none' XLA needed 1.2x and 2.3x the
estimate there (the dispatch's padded buffers are saved for the backward too): read those as lower bounds.
Not yet checked against GPU/TPU compiles (where 'auto' dispatch is 'sorted' on GPU, 'ragged' on TPU).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mosaicjax.models import dbrx
from mosaicjax.parallel import mesh as mesh_lib
from mosaicjax.parallel import rules as rules_lib

COMPONENTS = ('embedding', 'attention', 'router', 'experts', 'norms', 'lm_head')
HEADROOM = 0.10  # fraction of device memory kept free for XLA's scratch buffers and fragmentation
GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """One parameter as the model declares it."""
    path: str  # 'blocks/attn/Wqkv/kernel'
    component: str  # one of COMPONENTS
    shape: tuple[int, ...]
    dtype: Any  # numpy dtype
    logical: tuple[str | None, ...]  # logical axis names, one per dimension


def component_of(path: str) -> str:
    """Maps a parameter path to its COMPONENTS entry (works for scanned 'blocks' and unrolled 'blocks_i')."""
    parts = path.split('/')
    top = parts[0]
    if top == 'wte':
        return 'embedding'
    if top == 'lm_head':
        return 'lm_head'
    if top.startswith('norm') or (len(parts) > 1 and parts[1].startswith('norm')):
        return 'norms'
    if top == 'blocks' or top.startswith('blocks_'):
        sub = parts[1]
        if sub in ('attn', 'router', 'experts'):
            return {'attn': 'attention', 'router': 'router', 'experts': 'experts'}[sub]
    raise ValueError(f'parameter {path!r} belongs to no known component; extend sizing.component_of')


def abstract_params(cfg: dbrx.DbrxConfig) -> list[ParamInfo]:
    """Every parameter of Dbrx(cfg), from jax.eval_shape of its init (no memory is allocated)."""
    model = dbrx.Dbrx(cfg)
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    boxed = jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t), tokens)['params']
    out = []
    leaves = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    for key_path, leaf in leaves:
        path = '/'.join(str(getattr(k, 'key', k)) for k in key_path)
        if isinstance(leaf, nn.Partitioned):
            value, logical = leaf.value, tuple(leaf.names)
        else:  # an unannotated parameter: replicated
            value, logical = leaf, (None,) * len(leaf.shape)
        out.append(ParamInfo(path, component_of(path), tuple(value.shape), np.dtype(value.dtype), logical))
    return out


def component_counts(cfg: dbrx.DbrxConfig, params: Sequence[ParamInfo] | None = None) -> dict[str, dict[str, int]]:
    """{component: {'total': N, 'active': N}} plus a 'total' row.

    Active = what one token uses: everything but the experts, plus top_k / num_experts of the expert weights.
    """
    params = abstract_params(cfg) if params is None else params
    rows = {c: {'total': 0, 'active': 0} for c in COMPONENTS}
    for p in params:
        n = math.prod(p.shape)
        rows[p.component]['total'] += n
        rows[p.component]['active'] += n * cfg.moe_top_k // cfg.moe_num_experts if p.component == 'experts' else n
    rows['total'] = {k: sum(rows[c][k] for c in COMPONENTS) for k in ('total', 'active')}
    return rows


def local_shape(shape: Sequence[int], logical: Sequence[str | None], mesh_sizes: Mapping[str, int],
                rules, *, whole_if_indivisible: bool = False) -> tuple[int, ...]:
    """The shard one device holds: each dim divided (rounded up) by the mesh axes the rules put it on, or, with
    whole_if_indivisible, kept whole where they do not divide it (rules.fit_to_shapes, as the image task shards)."""
    spec = nn.logical_to_mesh_axes(tuple(logical), rules)  # PartitionSpec of mesh axis names
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(dim)
            continue
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        n = math.prod(mesh_sizes[a] for a in axes)
        out.append(dim if whole_if_indivisible and dim % n else -(-dim // n))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes one device holds during a training step (see the module docstring for the formula)."""
    mesh: dict  # resolved mesh sizes {'data': .., 'fsdp': .., 'expert': .., 'tensor': ..}
    num_devices: int
    micro_batch: int  # sequences per device per microbatch
    params: int
    optimizer: int
    gradients: int
    activations: int
    component_params: dict  # {component: parameter bytes per device}
    device_memory: int | None = None  # bytes, when known
    problems: tuple[str, ...] = ()  # layout errors the trainer would refuse the launch for (see plan_problems)

    @property
    def total(self) -> int:
        return self.params + self.optimizer + self.gradients + self.activations

    @property
    def fits(self) -> bool | None:
        if not self.device_memory:
            return None
        return self.total <= (1.0 - HEADROOM) * self.device_memory


def _optimizer_bytes(tx: optax.GradientTransformation, params: Sequence[ParamInfo], local: Sequence[tuple]) -> int:
    """Bytes per device of tx's state: param-shaped leaves sharded like their parameter, the rest replicated."""
    paths = [p.path for p in params]
    abstract = {path: jax.ShapeDtypeStruct(p.shape, p.dtype) for path, p in zip(paths, params)}
    local_elems = {path: math.prod(s) for path, s in zip(paths, local)}
    state = jax.eval_shape(tx.init, abstract)
    per_leaf = optax.tree_map_params(
        tx, lambda leaf, n: n * np.dtype(leaf.dtype).itemsize, state, local_elems,
        transform_non_params=lambda leaf: math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize)
    return int(sum(jax.tree.leaves(per_leaf)))


def attention_materialized(cfg: dbrx.DbrxConfig) -> bool:
    """Whether attention keeps [heads, T, T] scores: every impl but cuDNN flash attention and 'chunked' (which
    saves only the output and row statistics); conservative for 'auto', which may pick either."""
    return cfg.attention_impl not in ('cudnn', 'chunked')


def activation_bytes(cfg: dbrx.DbrxConfig, mesh_sizes: Mapping[str, int], *, micro_batch: int, seq_len: int,
                     layer_gather_elems: int) -> int:
    """The activation estimate of the module docstring, for `micro_batch` sequences of `seq_len` on one device."""
    a = np.dtype(cfg.compute_dtype).itemsize
    p = np.dtype(cfg.params_dtype).itemsize
    t = mesh_sizes['tensor']
    d, hd, h, kv = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.kv_n_heads
    e, k, f, v, T = cfg.moe_num_experts, cfg.moe_top_k, cfg.ffn_hidden_size, cfg.vocab_size, seq_len
    mm = a * ((h + 2 * kv) * hd / t + h * hd / t + d) + 8 * e + a * k * (2 * f + d)
    ew = a * (4 * d + k * (f + d) + (h + kv) * hd / t)
    materialized = attention_materialized(cfg)
    core = (h / t) * T * (4 + a) if materialized else 4 * h / t
    saved = {
        'full': a * d,
        'dots': a * d + mm + (a * (h / t) * T if materialized else 0),
        'none': mm + ew + core,
    }[cfg.remat]
    n = micro_batch * seq_len
    per_token = cfg.n_layers * saved + 2 * (mm + ew + core) + 3 * 4 * v / t + 2 * a * d
    return int(n * per_token + micro_batch * T * T + 2 * p * layer_gather_elems)


def memory_plan(cfg: dbrx.DbrxConfig, mesh_shape: Mapping[str, int], num_devices: int, *, batch_size: int,
                seq_len: int, grad_accum_steps: int = 1, rules=None,
                tx: optax.GradientTransformation | None = None, device_memory: int | None = None,
                params: Sequence[ParamInfo] | None = None) -> MemoryPlan:
    """Per-device training memory of cfg on a mesh of `num_devices` (none need exist).

    Args:
      mesh_shape: mesh.shape as configured (one axis may be -1); resolved against num_devices.
      batch_size, seq_len, grad_accum_steps: train.* (global batch in sequences).
      rules: logical-axis rules (default: the gin-bound table).
      tx: the optimizer (default: AdamW, the trainer's).
      device_memory: bytes per device, to decide `fits`.
    Raises:
      mesh.MeshError: the mesh shape does not fit num_devices.
    """
    sizes = mesh_lib.resolve_shape(mesh_shape, num_devices)
    rules = rules_lib.get_rules() if rules is None else rules
    tx = optax.adamw(1e-4) if tx is None else tx
    params = abstract_params(cfg) if params is None else params
    local = [local_shape(p.shape, p.logical, sizes, rules) for p in params]
    by_component = {c: 0 for c in COMPONENTS}
    for p, s in zip(params, local):
        by_component[p.component] += math.prod(s) * p.dtype.itemsize
    param_bytes = sum(by_component.values())
    # One layer's parameters as they are computed with: gathered over fsdp, still split over the other axes.
    no_fsdp = dict(sizes, fsdp=1)
    layer_gather = sum(math.prod(local_shape(p.shape, p.logical, no_fsdp, rules)) // cfg.n_layers
                       for p in params if p.path.startswith('blocks/'))
    if not cfg.scan_layers:  # unrolled blocks_i: each entry already is one layer
        layer_gather = sum(math.prod(local_shape(p.shape, p.logical, no_fsdp, rules))
                           for p in params if p.path.startswith('blocks_0/'))
    shards = math.prod(sizes[a] for a in mesh_lib.BATCH_AXES)
    micro_batch = max(1, -(-batch_size // (shards * max(grad_accum_steps, 1))))
    return MemoryPlan(
        mesh=sizes, num_devices=num_devices, micro_batch=micro_batch, params=param_bytes,
        optimizer=_optimizer_bytes(tx, params, local),
        gradients=param_bytes * (2 if grad_accum_steps > 1 else 1),
        activations=activation_bytes(cfg, sizes, micro_batch=micro_batch, seq_len=seq_len,
                                     layer_gather_elems=layer_gather),
        component_params=by_component, device_memory=device_memory,
        problems=plan_problems(cfg, sizes, batch_size=batch_size, seq_len=seq_len,
                               grad_accum_steps=max(grad_accum_steps, 1)))


def plan_problems(cfg: dbrx.DbrxConfig, sizes: Mapping[str, int], *, batch_size: int, seq_len: int,
                  grad_accum_steps: int) -> tuple[str, ...]:
    """The divisibility checks of trainer.loop.validate, as messages (empty when the launch is valid)."""
    out = []
    shards = math.prod(sizes[a] for a in mesh_lib.BATCH_AXES)
    if batch_size % (shards * grad_accum_steps):
        out.append(f'train.batch_size={batch_size} is not divisible by data x fsdp x expert ({shards}) times '
                   f'train.grad_accum_steps={grad_accum_steps}')
    for field in ('n_heads', 'kv_n_heads', 'ffn_hidden_size'):
        if getattr(cfg, field) % sizes['tensor']:
            out.append(f"DbrxConfig.{field}={getattr(cfg, field)} is not divisible by mesh tensor={sizes['tensor']}")
    if cfg.moe_num_experts % sizes['expert']:
        out.append(f"DbrxConfig.moe_num_experts={cfg.moe_num_experts} is not divisible by mesh "
                   f"expert={sizes['expert']}")
    if seq_len > cfg.max_seq_len:
        out.append(f'train.seq_len={seq_len} exceeds DbrxConfig.max_seq_len={cfg.max_seq_len}')
    return tuple(out)


def device_memory_bytes() -> int | None:
    """The first local device's memory limit, when the backend reports it (GPU/TPU; None on CPU)."""
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # pylint: disable=broad-except  # backends without memory_stats
        return None
    return stats.get('bytes_limit') or None


# ----------------------------------------------------------------------------------------------------------
# Text reports (the params CLI prints these)


def format_counts(cfg: dbrx.DbrxConfig, rows: Mapping[str, Mapping[str, int]]) -> str:
    """First line `total_params=N active_params=N`, then the model shape and the per-component table."""
    total = rows['total']
    lines = [f"total_params={total['total']} active_params={total['active']}",
             f'DbrxConfig: d_model={cfg.d_model} n_heads={cfg.n_heads} kv_n_heads={cfg.kv_n_heads} '
             f'head_dim={cfg.head_dim} n_layers={cfg.n_layers} ffn_hidden_size={cfg.ffn_hidden_size} '
             f'moe_num_experts={cfg.moe_num_experts} moe_top_k={cfg.moe_top_k} vocab_size={cfg.vocab_size}',
             '',
             f"{'component':<12}{'total':>18}{'active':>18}{'% total':>9}{'% active':>10}"]
    for name in COMPONENTS + ('total',):
        r = rows[name]
        lines.append(f"{name:<12}{r['total']:>18,}{r['active']:>18,}"
                     f"{100 * r['total'] / max(total['total'], 1):>8.1f}%"
                     f"{100 * r['active'] / max(total['active'], 1):>9.1f}%")
    lines.append(f"{'':<12}{_human(total['total']):>18}{_human(total['active']):>18}")
    return '\n'.join(lines)


def format_plan(cfg: dbrx.DbrxConfig, plan: MemoryPlan, *, batch_size: int, seq_len: int,
                grad_accum_steps: int) -> str:
    """The per-device memory table and a machine-readable `memory_per_device_bytes=...` line."""
    gib = lambda n: f'{n / GIB:10.2f} GiB'  # noqa: E731
    fits = {None: 'unknown (pass --device_memory_gib)', True: 'yes', False: 'no'}[plan.fits]
    lines = [
        f'memory per device: {plan.num_devices} devices, mesh {plan.mesh}, batch {batch_size} x {seq_len} '
        f'(grad_accum_steps={grad_accum_steps}: {plan.micro_batch} sequence(s) per device per microbatch), '
        f'remat={cfg.remat}, dtype={cfg.dtype}, param_dtype={cfg.param_dtype}',
        f"  {'parameters':<22}{gib(plan.params)}",
        f"  {'optimizer state':<22}{gib(plan.optimizer)}   (AdamW mu + nu, sharded like the parameters)",
        f"  {'gradients':<22}{gib(plan.gradients)}",
        f"  {'activations (est.)':<22}{gib(plan.activations)}   "
        f"(attention scores {'materialised' if attention_materialized(cfg) else 'flash'})",
        f"  {'total':<22}{gib(plan.total)}",
    ]
    if plan.device_memory:
        lines.append(f"  {'device memory':<22}{gib(plan.device_memory)}   fits (<= {100 * (1 - HEADROOM):.0f}%): "
                     f'{fits} ({100 * plan.total / plan.device_memory:.0f}% used)')
    else:
        lines.append(f'  fits: {fits}')
    lines.extend(f'  the trainer would refuse this layout: {msg}' for msg in plan.problems)
    lines.append('  parameters per device by component: ' + ', '.join(
        f'{c} {plan.component_params[c] / GIB:.2f} GiB' for c in COMPONENTS))
    fits_word = {None: 'unknown', True: 'yes', False: 'no'}[plan.fits]
    lines.append(f'memory_per_device_bytes={plan.total} params_bytes={plan.params} optimizer_bytes={plan.optimizer} '
                 f'gradients_bytes={plan.gradients} activations_bytes={plan.activations} fits={fits_word}')
    return '\n'.join(lines)


def _human(n: int) -> str:
    for unit, div in (('T', 1e12), ('B', 1e9), ('M', 1e6), ('K', 1e3)):
        if n >= div:
            return f'{n / div:.2f}{unit}'
    return str(n)
