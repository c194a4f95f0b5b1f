"""Sharded MoE dispatch: experts split over the mesh's `expert` axis, tokens exchanged by all-to-all.

The model never names the mesh; this module reads it from the context (`jax.set_mesh`, which
mosaicjax.parallel.rules.activate sets) at trace time. With no mesh (or a one-device mesh) `context_plan`
returns None and moe.Experts runs its single-device dispatch unchanged.

Inside one jax.shard_map, every device:
  1. holds n local tokens [n, D] with their routing (computed before, per token: the router is tiny),
     and its expert shard's weights: experts [j*E_l, (j+1)*E_l) for expert-axis index j (E_l = E / ep),
     with d_model split over the fsdp axes (ZeRO-3) and, when the mesh has a `tensor` axis, only its 1/tp
     slice of every expert's ffn dimension (Megatron MLP);
  2. all-gathers the weights' d_model over fsdp (the transpose reduce-scatters the weight gradients);
  3. buckets its n*k assignments per destination expert shard (shard = expert // E_l) into a static buffer
     [ep, C, D], first choices of all tokens before any second choice and padding tokens last;
  4. jax.lax.all_to_all over `expert`: row block j goes to shard j, so each device receives [ep, C, D]
     rows for its own experts, with their local expert ids;
  5. runs its E_l experts over the received rows with the per-backend local kernel (moe.expert_rows_fn:
     blocked sorted matmul on CPU, ragged_dot on GPU/TPU, which leaves the empty slots out);
  6. all_to_all back, un-buckets, weights each token's k outputs by its router weights and sums them;
     with tensor > 1 the partial sums over ffn slices are psum-ed over `tensor`.
With expert = 1 (data/fsdp/tensor meshes) steps 3-4 and 6's exchange vanish: each device runs the ordinary
dispatch strategy over its own tokens. This is deliberate: left to GSPMD, the single-device strategies sort
the *global* token list, and XLA partitions that sort by all-reducing the whole global dispatch buffer
(f32[9984, 16] on every device for 64x64 tokens on {data: 8}), i.e. no data parallelism for the experts.

Capacity C per (source device, destination shard):
  dropless (every dispatch except 'capacity'): C = n * min(k, E_l), the worst case (a token sends at most
    min(k, E_l) assignments to one shard), so nothing is ever dropped and the result equals the
    single-device model. Static shapes make the buffers ep * min(k, E_l) / k times the assignments
    (jax.lax.ragged_all_to_all would send only the real rows: a GPU/TPU follow-up).
  'capacity': C = ceil(capacity_factor * n * k / ep) (at most the dropless C); overflowing assignments are
    dropped (contribute 0) and counted in `dropped_fraction` (global, over real tokens only). With expert = 1
    the local 'capacity' dispatch runs per device (per-expert capacity from the local token count).
  Either way capacity is per device's tokens, so 'capacity' drops differ from the one-device program's.

Token layout: tokens are split over the mesh axes the logical rules give 'act_batch' (default data, fsdp,
expert), plus `expert` if the rules leave it out; they are replicated over `tensor`. The HF [E*F, D] expert
weights (default rules: P('expert', 'fsdp')) are viewed as [E, F, D] and enter as P('expert', 'tensor',
<axes of 'embed'>); layouts other than the default rules' are resharded by XLA at the shard_map boundary.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

EXPERT_AXIS = 'expert'
TENSOR_AXIS = 'tensor'
# Used when no flax logical-axis rules are active (e.g. a bare jax.set_mesh): the default rules' choice.
_DEFAULT_TOKEN_AXES = ('data', 'fsdp', 'expert')
_DEFAULT_EMBED_AXES = ('fsdp',)

# rows_fn(rows [M, D], expert_ids int32 [M] in [0, E_l] (E_l = empty slot), w1, v1, w2 [E_l, F_l, D])
#   -> f32 [M, D] (zero for empty slots): the kernel after the exchange (moe.expert_rows_fn).
RowsFn = Callable[..., jax.Array]
# token_fn(x [n, D], w1, v1, w2 [E, F_l, D], top_w [n, k], top_idx [n, k], valid [n]) -> (y f32 [n, D],
#   dropped_fraction): a single-device dispatch strategy, used per device when expert = 1.
TokenFn = Callable[..., tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """How the context mesh splits the MoE layer (all static, read at trace time)."""
    ep: int  # size of the expert axis (1: no exchange, every device holds all experts)
    tp: int  # size of the tensor axis (1 if absent): ffn slices, partial sums psum-ed
    token_axes: tuple[str, ...]  # mesh axes the flattened token dim is split over (includes 'expert')
    embed_axes: tuple[str, ...]  # mesh axes (size > 1) the expert weights' d_model is split over (fsdp)
    token_shards: int  # product of the token_axes sizes: the token count is padded to a multiple of it


def _rule_axes(logical_name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """Mesh axes the active flax logical-axis rules give `logical_name` ('default' if no rules are active)."""
    if not nn.get_logical_axis_rules():
        return default
    spec = nn.logical_to_mesh_axes((logical_name,))[0]
    if spec is None:
        return ()
    return (spec,) if isinstance(spec, str) else tuple(spec)


def context_plan(num_experts: int) -> ShardingPlan | None:
    """The plan for the mesh in context, or None when there is no mesh or it has a single device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return None
    sizes = dict(mesh.shape)
    names = set(mesh.axis_names)
    ep = sizes.get(EXPERT_AXIS, 1)
    if num_experts % ep:
        raise ValueError(f'moe_num_experts={num_experts} is not divisible by the mesh expert axis ({ep})')
    token_axes = tuple(a for a in _rule_axes('act_batch', _DEFAULT_TOKEN_AXES) if a in names and a != TENSOR_AXIS)
    if EXPERT_AXIS in names and EXPERT_AXIS not in token_axes:  # every expert shard needs its own tokens
        token_axes += (EXPERT_AXIS,)
    embed_axes = tuple(a for a in _rule_axes('embed', _DEFAULT_EMBED_AXES)  # size-1 axes: no gather at all
                       if a in names and a not in (EXPERT_AXIS, TENSOR_AXIS) and sizes[a] > 1)
    return ShardingPlan(ep=ep, tp=sizes.get(TENSOR_AXIS, 1), token_axes=token_axes, embed_axes=embed_axes,
                        token_shards=math.prod(sizes[a] for a in token_axes))


def bucket_capacity(n: int, k: int, ep: int, experts_per_shard: int, capacity_factor: float | None) -> int:
    """Rows per (source, destination shard) bucket: dropless worst case, or capacity_factor x the balanced load."""
    worst = n * min(k, experts_per_shard)
    if capacity_factor is None:
        return max(worst, 1)
    return max(1, min(worst, math.ceil(capacity_factor * n * k / ep)))


def _rows(x, idx):
    """x[idx] where idx == len(x) selects a zero row."""
    x_ext = jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)], axis=0)  # [len+1, ...]
    return x_ext[idx]


def _bucket(top_idx, valid, ep, e_local, cap):
    """Assigns each of the n*k assignments a row of the [ep*C] send buffer (ep*C = dropped).

    Slot-major priority (assignment a = slot * n + token): every first choice before any second choice;
    padding tokens after all real ones, so capacity drops hit real tokens last.
    Returns dest [k*n] (slot-major buffer row or ep*C), keep [k*n] bool, send_token [ep*C] (n = empty),
    send_e [ep*C] (local expert id, e_local = empty), valid_sm [k*n] (slot-major validity).
    """
    n, k = top_idx.shape
    a = n * k
    e_sm = top_idx.T.reshape(a)  # [A] global expert, slot-major
    shard_sm = e_sm // e_local  # [A] destination expert shard
    tok_sm = jnp.tile(jnp.arange(n, dtype=jnp.int32), k)  # [A]
    valid_sm = jnp.tile(valid, k)  # [A]
    priority = jnp.arange(a, dtype=jnp.int32) + jnp.where(valid_sm, 0, a).astype(jnp.int32)  # [A] < 2A
    order = jnp.argsort(shard_sm * (2 * a) + priority)  # [A]; unique keys, so no stability needed
    sorted_shard = shard_sm[order]  # [A]
    sizes = jnp.bincount(shard_sm, length=ep)  # [ep]
    rank = jnp.arange(a) - (jnp.cumsum(sizes) - sizes)[sorted_shard]  # [A] position inside the bucket
    keep_sorted = rank < cap
    dest_sorted = jnp.where(keep_sorted, sorted_shard * cap + rank, ep * cap).astype(jnp.int32)  # [A]
    send_token = jnp.full((ep * cap + 1,), n, jnp.int32).at[dest_sorted].set(tok_sm[order])[:ep * cap]
    send_e = jnp.full((ep * cap + 1,), e_local, jnp.int32).at[dest_sorted].set(
        (e_sm[order] % e_local).astype(jnp.int32))[:ep * cap]  # [ep*C]
    dest = jnp.zeros((a,), jnp.int32).at[order].set(dest_sorted)  # [A] slot-major
    return dest, dest < ep * cap, send_token, send_e, valid_sm


def _exchange(x, top_w, top_idx, valid, ws, *, ep, num_experts, capacity_factor, rows_fn):
    """Steps 3-6 on one device: bucket, all-to-all, local experts, all-to-all back, combine.

    Returns (y f32 [n, D] (a partial sum over ffn slices when tensor > 1), dropped count, valid count).
    """
    n, k = top_idx.shape
    d = x.shape[-1]
    e_local = num_experts // ep
    cap = bucket_capacity(n, k, ep, e_local, capacity_factor)
    dest, keep, send_token, send_e, valid_sm = _bucket(top_idx, valid, ep, e_local, cap)
    send_x = _rows(x, send_token)  # [ep*C, D]; block j goes to expert shard j
    recv_x = jax.lax.all_to_all(send_x, EXPERT_AXIS, 0, 0, tiled=True)  # [ep*C, D]; block j came from shard j
    recv_e = jax.lax.all_to_all(send_e, EXPERT_AXIS, 0, 0, tiled=True)  # [ep*C] local expert ids
    y_recv = rows_fn(recv_x, recv_e, *ws).astype(x.dtype)  # [ep*C, D]
    y_back = jax.lax.all_to_all(y_recv, EXPERT_AXIS, 0, 0, tiled=True)  # [ep*C, D] in send order
    y_assign = _rows(y_back, dest).reshape(k, n, d).transpose(1, 0, 2)  # [n, k, D]; dropped rows are 0
    y = jnp.einsum('nk,nkd->nd', top_w.astype(jnp.float32), y_assign.astype(jnp.float32))  # [n, D]
    return y, jnp.sum(valid_sm & ~keep).astype(jnp.float32), jnp.sum(valid_sm).astype(jnp.float32)


def _body(x, top_w, top_idx, valid, w1, v1, w2, *, plan: ShardingPlan, num_experts: int,
          capacity_factor: float | None, rows_fn: RowsFn, token_fn: TokenFn):
    """Per-device body of the shard_map (shapes are local).

    x [n, D]; top_w, top_idx [n, k]; valid [n]; w1, v1, w2 [E_l, F/tp, D/fsdp] (this device's experts, its ffn
    slice when tensor > 1, its d_model shard). Returns (y f32 [n, D], dropped_fraction f32 scalar).
    """
    ws = []
    for w in (w1, v1, w2):  # each [E_l, F/tp, D/fsdp]
        if plan.embed_axes:
            # ZeRO-3: gather d_model just in time; the transpose reduce-scatters the gradient.
            w = jax.lax.all_gather(w, plan.embed_axes, axis=2, tiled=True)  # [E_l, F/tp, D]
        ws.append(w)
    if plan.tp > 1:
        # The tokens are the same on every tensor device, but from here on each device's values differ (its
        # ffn slice). Marking x varying now puts the backward's sum over tensor on dx [n, D], the smallest
        # place, instead of on the [ep*C, D] exchange buffers where the varying weights first meet them.
        x = jax.lax.pcast(x, TENSOR_AXIS, to='varying')
    if plan.ep > 1:
        y, dropped, total = _exchange(x, top_w, top_idx, valid, ws, ep=plan.ep, num_experts=num_experts,
                                      capacity_factor=capacity_factor, rows_fn=rows_fn)
    else:
        y, frac = token_fn(x, *ws, top_w, top_idx, valid)  # [n, D]; all experts are local
        total = jnp.sum(valid).astype(jnp.float32) * top_idx.shape[1]
        dropped = frac * jnp.maximum(total, 1.0)  # the strategies report dropped / max(valid assignments, 1)
    if plan.tp > 1:
        y = jax.lax.psum(y, TENSOR_AXIS)  # sum the ffn slices' partial outputs
    dropped, total = jax.lax.psum((dropped, total), plan.token_axes)
    return y, dropped / jnp.maximum(total, 1.0)


def sharded_dispatch(x, w1, v1, w2, top_w, top_idx, valid, *, plan: ShardingPlan, num_experts: int,
                     capacity_factor: float | None, rows_fn: RowsFn, token_fn: TokenFn):
    """MoE experts over the context mesh (expert-parallel all-to-all when plan.ep > 1).

    Args:
      x: [N, D] tokens (compute dtype); w1, v1, w2: [E*F, D] HF-layout expert weights (compute dtype);
      top_w f32 [N, k]; top_idx int32 [N, k]; valid bool [N] or None.
      capacity_factor: None = dropless exchange; else the bucket capacity factor (see module docstring).
      rows_fn: kernel after the exchange (ep > 1); token_fn: per-device dispatch strategy (ep == 1).
    Returns:
      (y f32 [N, D], dropped_fraction f32 scalar).
    """
    n, d = x.shape
    ffn = w1.shape[0] // num_experts
    # [E*F, D] -> [E, F, D]: the expert-major rows make this a local reshape of each expert shard, and it lets
    # the shard_map slice F over tensor (free: the weights are replicated over tensor), so the backward
    # all-gathers the weight-gradient slices over tensor instead of all-reducing zero-padded full gradients.
    w1, v1, w2 = (w.reshape(num_experts, ffn, d) for w in (w1, v1, w2))  # each [E, F, D]
    valid = jnp.ones((n,), jnp.bool_) if valid is None else valid
    pad = -n % plan.token_shards  # e.g. batch 1 on 8 devices: pad with invalid zero-weight tokens
    if pad:
        x = jnp.pad(x, ((0, pad), (0, 0)))
        top_w = jnp.pad(top_w, ((0, pad), (0, 0)))
        top_idx = jnp.pad(top_idx, ((0, pad), (0, 0)))
        valid = jnp.pad(valid, (0, pad))
    tok = P(plan.token_axes or None)
    w_spec = P(EXPERT_AXIS if plan.ep > 1 else None, TENSOR_AXIS if plan.tp > 1 else None,
               plan.embed_axes or None)
    body = jax.shard_map(
        lambda *a: _body(*a, plan=plan, num_experts=num_experts, capacity_factor=capacity_factor,
                         rows_fn=rows_fn, token_fn=token_fn),
        in_specs=(tok, tok, tok, tok, w_spec, w_spec, w_spec), out_specs=(tok, P()))
    y, dropped = body(x, top_w, top_idx.astype(jnp.int32), valid, w1, v1, w2)
    return y[:n], dropped
