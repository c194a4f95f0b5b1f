"""DBRX mixture of experts: router, GLU experts, dispatch strategies, auxiliary losses.

Routing (as transformers' DBRX): logits = x @ router, softmax in float32 over all experts, top-k, then the
top-k weights are divided by their p-norm (p = moe_normalize_expert_weights; None = no renormalisation).
Experts are SiLU-GLU MLPs stored in the Hugging Face layout: w1, v1, w2 are [experts*ffn, d_model] and
expert e computes (silu(x @ w1_e.T) * (x @ v1_e.T)) @ w2_e.

Dispatch strategies (all compute the same function; only speed and memory differ, except 'capacity'):
  'loop'      every expert runs over every token and is masked by its routing weight. E times the work;
              the obviously-correct reference the others are tested against.
  'sorted'    dropless. Token-assignments are sorted by expert, each expert's group is padded to a multiple
              of a block size, and the blocks run as one batched matmul against per-block expert weights
              (gathered copies). Static shapes: every block of the worst case A + E*(bs-1) rows is computed.
              Fully differentiable by JAX; on XLA:CPU ~20x faster than jax.lax.ragged_dot.
  'blocked'   dropless, the same padded layout, but a while loop runs only the blocks that hold assignments,
              each against its expert's weights in place, with a hand-written backward (custom_vjp) loop.
              The fast path on XLA:CPU: ~1.7x faster than 'sorted' forward+backward (8 experts, d_model 256,
              ffn 512, 4096 assignments, one core), as fast as one dense GLU over the same rows. No
              higher-order derivatives (a loop with a data-dependent trip count cannot be reversed by JAX).
  'ragged'    dropless grouped matmul with jax.lax.ragged_dot on the sorted assignments: no padding at all;
              meant for TPU, where ragged_dot lowers to a grouped GEMM kernel. On an H200 (jax 0.11.2) it was
              the slowest strategy: 2.4x 'sorted''s step time (BUILD_NOTES.md, "GPU").
  'capacity'  fixed per-expert capacity ceil(capacity_factor * assignments / experts); assignments over
              capacity are dropped (first-choice assignments of all tokens take precedence over second
              choices, padding tokens come last) and the dropped fraction is reported.
  'auto'      'ragged' on tpu, 'sorted' on gpu (the fastest dropless strategy measured there), 'blocked' on cpu.

Sharding (mosaicjax/models/expert_parallel.py): under a multi-device mesh in context (jax.set_mesh), Experts
runs inside jax.shard_map over the devices' own tokens. With an `expert` axis > 1 the experts are split over it
and tokens are exchanged with all-to-all; the strategy then picks the per-device kernel ('auto'/'blocked'/
'sorted'/'ragged'/'loop', dropless) or, for 'capacity', bounds the exchange buffers at capacity_factor x the balanced
load and counts the drops. With expert = 1 each device runs the strategy below over its own tokens. With no
mesh the strategies run on the whole flattened token list.

Auxiliary losses (router_aux; the trainer weights them by DbrxConfig.moe_loss_weight / router_z_loss_weight):
  load balancing  per layer, exactly transformers' load_balancing_loss_func for that layer's tokens:
                  E * sum_e f_e * P_e with f_e = top-k assignments to e / real tokens (sum_e f_e = k, so a
                  perfectly balanced router scores k, not 1) and P_e = mean router probability of e, over real
                  (non-padding) tokens only. The model AVERAGES the per-layer values (MegaBlocks) instead of
                  pooling all layers' tokens into one f and P as transformers does: pooled statistics can look
                  balanced while every layer is imbalanced in a different direction. MegaBlocks also divides f
                  by k, so its number is ours / k; with DBRX's moe_loss_weight=0.05 ours is the HF scale.
  router z-loss   mean over real tokens of logsumexp(router logits)^2 (ST-MoE), averaged over layers.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mosaicjax.models import expert_parallel
from mosaicjax.models import quantize as quantize_lib

Dtype = Any

DISPATCH_STRATEGIES = ('auto', 'loop', 'sorted', 'blocked', 'ragged', 'capacity')


def resolve_dispatch(dispatch: str) -> str:
    """Maps 'auto' to the strategy for the default backend ('ragged' on tpu, 'sorted' on gpu, 'blocked' on cpu)."""
    if dispatch not in DISPATCH_STRATEGIES:
        raise ValueError(f'unknown moe_dispatch {dispatch!r}; expected one of {DISPATCH_STRATEGIES}')
    if dispatch != 'auto':
        return dispatch
    backend = jax.default_backend()
    if backend == 'tpu':
        return 'ragged'
    return 'sorted' if backend in ('gpu', 'cuda', 'rocm') else 'blocked'


# ----------------------------------------------------------------------------------------------------------
# Router


class Router(nn.Module):
    """Top-k softmax router.

    Attributes:
      num_experts, top_k: experts and experts per token.
      jitter_eps: when not None/0 and not deterministic, the router *input* is multiplied by
        uniform(1 - eps, 1 + eps) noise (rng stream 'jitter'); the experts see the clean input.
      normalize_p: p of the p-norm the top-k weights are divided by (None: keep raw probabilities).
      init_std: stddev of the normal kernel initialiser.
    """
    num_experts: int
    top_k: int
    jitter_eps: float | None = None
    normalize_p: float | None = 1.0
    init_std: float = 0.02
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool = True):
        """x [..., d_model] -> (logits f32 [..., E], probs f32 [..., E], top_w f32 [..., k], top_idx i32 [..., k])."""
        kernel = self.param('kernel', nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                                                     ('embed', None)),
                            (x.shape[-1], self.num_experts), self.param_dtype)
        x = x.astype(jnp.float32)
        if not deterministic and self.jitter_eps:
            noise = jax.random.uniform(self.make_rng('jitter'), x.shape, jnp.float32,
                                       1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
            x = x * noise
        # Routing decisions are discrete: keep logits in float32 even under bf16 compute (cheap: E columns).
        logits = jnp.einsum('...d,de->...e', x, kernel.astype(jnp.float32))  # [..., experts]
        probs = jax.nn.softmax(logits, axis=-1)  # [..., experts]
        top_w, top_idx = jax.lax.top_k(probs, self.top_k)  # [..., k]
        if self.normalize_p is not None:
            p = float(self.normalize_p)
            if math.isinf(p):
                norm = jnp.max(jnp.abs(top_w), axis=-1, keepdims=True)
            else:
                norm = jnp.sum(jnp.abs(top_w) ** p, axis=-1, keepdims=True) ** (1.0 / p)
            top_w = top_w / norm
        return logits, probs, top_w, top_idx.astype(jnp.int32)


def router_aux(logits: jax.Array, probs: jax.Array, top_idx: jax.Array,
               valid: jax.Array | None = None) -> dict[str, jax.Array]:
    """Per-layer router statistics over real (non-padding) tokens.

    Args:
      logits, probs: float32 [tokens, E]; top_idx: int [tokens, k]; valid: bool [tokens] (None = all).
    Returns:
      'lb_loss': Switch/HF load-balancing loss E * sum_e f_e * P_e, with f_e = (top-k assignments to e) /
        tokens (so sum_e f_e = k and a perfectly balanced router scores k) and P_e = mean router prob of e.
        For one layer this is exactly transformers' `load_balancing_loss_func`.
        Across layers we AVERAGE the per-layer losses (MegaBlocks) instead of pooling every layer's tokens
        into one f and one P (transformers): a pooled f/P can look balanced while each layer is badly
        imbalanced in a different direction, and balance is needed per layer (each layer has its own experts
        on the same devices). Note MegaBlocks also divides f by k, so its value is ours / top_k.
      'z_loss': mean over tokens of logsumexp(logits)^2 (ST-MoE router z-loss).
      'expert_load': float32 [E], fraction of routed assignments per expert (sums to 1).
    """
    n, e = probs.shape
    k = top_idx.shape[-1]
    w = jnp.ones((n,), jnp.float32) if valid is None else valid.astype(jnp.float32)  # [tokens]
    n_valid = jnp.maximum(jnp.sum(w), 1.0)
    counts = jnp.einsum('n,nke->e', w, jax.nn.one_hot(top_idx, e, dtype=jnp.float32))  # [E]
    frac_tokens = counts / n_valid  # [E]; sums to k
    mean_prob = jnp.einsum('n,ne->e', w, probs.astype(jnp.float32)) / n_valid  # [E]
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)  # [tokens]
    return {
        'lb_loss': e * jnp.sum(frac_tokens * mean_prob),
        'z_loss': jnp.sum(w * jnp.square(lse)) / n_valid,
        'expert_load': counts / (n_valid * k),
    }


# ----------------------------------------------------------------------------------------------------------
# Dispatch strategies. Shared signature:
#   x [N, D]; w1, v1, w2 [E, F, D] (compute dtype); top_w f32 [N, k]; top_idx int [N, k]; valid bool [N]
#   -> (y f32 [N, D], dropped_fraction f32 scalar)


def _glu(x, w1, v1, w2):
    """One expert's GLU: x [..., D], w* [F, D] -> [..., D]."""
    h = jax.nn.silu(jnp.einsum('...d,fd->...f', x, w1)) * jnp.einsum('...d,fd->...f', x, v1)  # [..., F]
    return jnp.einsum('...f,fd->...d', h, w2)  # [..., D]


def _rows(x, idx):
    """x[idx] where idx == len(x) selects a zero row (the padding slot of dispatch buffers)."""
    x_ext = jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)], axis=0)  # [N+1, ...]
    return x_ext[idx]


def _combine(y_assign, top_w):
    """Weighted sum of each token's k expert outputs: y_assign [N, k, D], top_w [N, k] -> f32 [N, D]."""
    return jnp.einsum('nk,nkd->nd', top_w.astype(jnp.float32), y_assign.astype(jnp.float32))


def dispatch_loop(x, w1, v1, w2, top_w, top_idx, valid=None):
    """Reference: every expert over every token, scaled by that token's weight for the expert (0 if unrouted)."""
    del valid
    e = w1.shape[0]
    gates = jnp.einsum('nk,nke->ne', top_w.astype(jnp.float32),
                       jax.nn.one_hot(top_idx, e, dtype=jnp.float32))  # [N, E]
    y = jnp.zeros(x.shape, jnp.float32)
    for i in range(e):
        y = y + gates[:, i:i + 1] * _glu(x, w1[i], v1[i], w2[i]).astype(jnp.float32)  # [N, D]
    return y, jnp.zeros((), jnp.float32)


def _sort_by_expert(top_idx, e):
    """Stable sort of the N*k assignments (token-major) by expert.

    Returns order [A] (assignment ids in sorted order), sorted_e [A], group_sizes int32 [E], rank [A] (position of
    each sorted assignment inside its expert's group).
    """
    a = top_idx.size
    flat_e = top_idx.reshape(a)  # [A], assignment id = token * k + slot
    order = jnp.argsort(flat_e, stable=True)  # [A]
    sorted_e = flat_e[order]  # [A]
    group_sizes = jnp.bincount(flat_e, length=e).astype(jnp.int32)  # [E]; ids >= e not counted
    group_start = jnp.cumsum(group_sizes) - group_sizes  # [E]
    rank = jnp.arange(a, dtype=jnp.int32) - group_start[jnp.minimum(sorted_e, e - 1)]  # [A]
    return order, sorted_e, group_sizes, rank


def default_block_size(num_assignments: int, num_experts: int) -> int:
    """Block size for 'sorted': about a quarter of an expert's mean load, multiple of 8, in [8, 512].

    The static buffer holds A + E*(bs-1) rows, so padding waste is ~E*bs = A/4 (25%) while the per-block
    weight gather stays ~5x the expert weights; larger bs trades waste for fewer gathered weight copies.
    """
    bs = math.ceil(num_assignments / (4 * num_experts))
    return int(min(512, max(8, 8 * math.ceil(bs / 8))))


def _padded_layout(top_idx, e, bs):
    """Expert-sorted assignments, each expert's group padded to a multiple of bs ('sorted' and 'blocked').

    Assignments with expert id == e are empty (the all-to-all buffers' unused slots): they get no slot.
    Returns (static num_blocks = A + E*(bs-1) rows / bs, the bound on sum_e ceil(group_e / bs)):
      dest int32 [A]: buffer row of each (token-major) assignment; num_blocks*bs for an empty one.
      slot_token int32 [P = num_blocks*bs]: token of each buffer row; N for padding rows.
      block_e int32 [num_blocks]: expert of each block (clipped to E-1 past the last group: all-padding blocks).
      used int32 scalar: blocks holding at least one assignment (all before any unused block).
    """
    n, k = top_idx.shape
    a = n * k
    num_blocks = (a + e * (bs - 1)) // bs
    p = num_blocks * bs
    order, sorted_e, group_sizes, rank = _sort_by_expert(top_idx, e)  # empty ids sort last, outside groups
    padded = (group_sizes + bs - 1) // bs * bs  # [E]
    padded_end = jnp.cumsum(padded)  # [E]
    dest_sorted = jnp.where(sorted_e < e, (padded_end - padded)[jnp.minimum(sorted_e, e - 1)] + rank,
                            p).astype(jnp.int32)  # [A] row in the padded buffer
    slot_token = jnp.full((p,), n, jnp.int32).at[dest_sorted].set(
        (order // k).astype(jnp.int32), mode='drop')  # [P]; n = empty slot
    # Expert of block b: first expert whose padded range ends after b*bs.
    block_e = jnp.searchsorted(padded_end, jnp.arange(num_blocks) * bs, side='right')
    block_e = jnp.minimum(block_e, e - 1).astype(jnp.int32)  # [blocks]
    dest = jnp.zeros((a,), jnp.int32).at[order].set(dest_sorted)  # [A] token-major
    return num_blocks, dest, slot_token, block_e, (padded_end[-1] // bs).astype(jnp.int32)


def block_weights(w, block_e, *, one_hot: bool | None = None):
    """w [E, ...] -> [blocks, ...]: each block's expert's weights (w[block_e]), for 'sorted'.

    one_hot (default: on accelerators) selects with a one-hot matmul, [blocks, E] x [E, F*D], instead of a gather.
    The two are equal (one nonzero term per output, and HIGHEST precision keeps float32 weights exact), but their
    gradients are not equally fast: the gather's is a scatter-add of every block's [F, D] gradient into its expert,
    which on an H200 took 113 of a 444 ms DBRX training step (3 scatters x 16 layers, 2.4 ms each; BUILD_NOTES.md,
    "GPU"), while the one-hot matmul's is another small matmul. On CPU the gather stays: there the one-hot matmul's
    E x more arithmetic is not hidden behind memory traffic.
    """
    if one_hot is None:
        one_hot = jax.default_backend() != 'cpu'
    if not one_hot:
        return w[block_e]
    sel = jax.nn.one_hot(block_e, w.shape[0], dtype=w.dtype)  # [blocks, E]; block_e < E
    return jnp.einsum('be,e...->b...', sel, w, precision=jax.lax.Precision.HIGHEST)


def dispatch_sorted(x, w1, v1, w2, top_w, top_idx, valid=None, *, block_size: int = 0, one_hot: bool | None = None):
    """Dropless blocked dispatch: sort by expert, pad groups to block multiples, one batched matmul.

    one_hot: how each block's expert weights are selected (block_weights; default per backend)."""
    del valid
    n, k = top_idx.shape
    e = w1.shape[0]
    bs = block_size or default_block_size(n * k, e)
    num_blocks, dest, slot_token, block_e, _ = _padded_layout(top_idx, e, bs)
    xb = _rows(x, slot_token).reshape(num_blocks, bs, -1)  # [blocks, bs, D]
    wb1, wb2, wb3 = (block_weights(w, block_e, one_hot=one_hot) for w in (w1, v1, w2))  # each [blocks, F, D]
    # Blocks past the last group hold only zero rows, so their outputs (and weight gradients) are zero.
    h = jax.nn.silu(jnp.einsum('bsd,bfd->bsf', xb, wb1)) * jnp.einsum('bsd,bfd->bsf', xb, wb2)  # [blocks, bs, F]
    yb = jnp.einsum('bsf,bfd->bsd', h, wb3)  # [blocks, bs, D]
    y_assign = _rows(yb.reshape(num_blocks * bs, -1), dest).reshape(n, k, -1)  # [N, k, D]
    return _combine(y_assign, top_w), jnp.zeros((), jnp.float32)


def blocked_block_size(num_assignments: int, num_experts: int) -> int:
    """Block rows for 'blocked': about an eighth of an expert's mean load, multiple of 8, in [16, 512]; 8 when
    an expert's mean load is at most 8 (decoding batches).

    Only blocks holding assignments run, so padding costs ~E*bs/2 rows on average (~6% here) instead of
    'sorted''s static E*bs; much smaller blocks pay the loop's per-iteration cost (measured on XLA:CPU,
    d_model 256, ffn 512, 4096 assignments over 8 experts: bs 48-96 equally fast, 16 is 1.5x slower). At decode
    sizes each used expert runs one block either way, so 8 rows halve the padded work (16 tokens, top-2 of 8
    experts, 4 layers: 4.9 ms instead of 6.6).
    """
    if num_assignments <= 8 * num_experts:
        return 8
    bs = math.ceil(num_assignments / (8 * num_experts))
    return int(min(512, max(16, 8 * math.ceil(bs / 8))))


def _block(a, b, bs):
    return jax.lax.dynamic_slice_in_dim(a, b * bs, bs)  # rows [b*bs, (b+1)*bs)


def _zero_like(dtype, *like):
    """A scalar 0 that, inside shard_map, varies over every mesh axis any of `like` varies over.

    The sum of an empty slice of each: public ops only, and XLA folds it to a constant.
    """
    return sum(jnp.sum(a.reshape(-1)[:0]).astype(dtype) for a in like)


def _loop_zeros(shape, dtype, *like):
    """Zeros for a loop carry that the body mixes with `like` (inside shard_map the initial carry must already
    vary over the mesh axes the body's values vary over, or the loop's input and output types differ)."""
    return jnp.zeros(shape, dtype) + _zero_like(dtype, *like)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _blocked_glu(xs, w1, v1, w2, block_e, used, bs):
    """Row block b of xs [P, D] through expert block_e[b]'s GLU, for b < used (later blocks: 0) -> [P, D]."""
    return _blocked_glu_fwd(xs, w1, v1, w2, block_e, used, bs)[0]


def _blocked_glu_fwd(xs, w1, v1, w2, block_e, used, bs):
    def body(b, ys):
        e = block_e[b]
        xb = _block(xs, b, bs)  # [bs, D]
        h = jax.nn.silu(xb @ w1[e].T) * (xb @ v1[e].T)  # [bs, F]
        return jax.lax.dynamic_update_slice_in_dim(ys, h @ w2[e], b * bs, 0)  # block of [P, D]
    # A while loop with a data-dependent trip count: unused blocks cost nothing, and each block reads its
    # expert's weights in place (no [blocks, F, D] gathered copy, no batched matmul).
    ys = jax.lax.fori_loop(0, used, body, _loop_zeros(xs.shape, xs.dtype, xs, w1, v1, w2, block_e))
    return ys, (xs, w1, v1, w2, block_e, used)


def _blocked_glu_bwd(bs, res, dys):
    # Hand-written: JAX cannot reverse a loop with a dynamic trip count. The GLU pre-activations are
    # recomputed per block instead of saved ([P, F] x 2 of memory; as fast here).
    xs, w1, v1, w2, block_e, used = res
    f32 = jnp.float32

    def body(b, carry):
        dxs, dw1, dv1, dw2 = carry
        e = block_e[b]
        xb, dyb = _block(xs, b, bs), _block(dys, b, bs)  # [bs, D]
        a1, a2 = xb @ w1[e].T, xb @ v1[e].T  # [bs, F]
        sig = jax.nn.sigmoid(a1)
        g = a1 * sig  # silu(a1)
        dh = dyb @ w2[e].T  # [bs, F]
        da1 = dh * a2 * (sig * (1 + a1 * (1 - sig)))  # silu'(a) = sig(a) (1 + a (1 - sig(a)))
        da2 = dh * g
        # Weight gradients accumulate in float32 (many blocks per expert under bf16 compute).
        dw2 = dw2.at[e].add(jnp.dot((g * a2).T, dyb, preferred_element_type=f32))  # [F, D]
        dw1 = dw1.at[e].add(jnp.dot(da1.T, xb, preferred_element_type=f32))  # [F, D]
        dv1 = dv1.at[e].add(jnp.dot(da2.T, xb, preferred_element_type=f32))  # [F, D]
        dxs = jax.lax.dynamic_update_slice_in_dim(dxs, da1 @ w1[e] + da2 @ v1[e], b * bs, 0)  # block of [P, D]
        return dxs, dw1, dv1, dw2

    like = (xs, dys, w1, v1, w2, block_e)
    zeros = [_loop_zeros(a.shape, f32 if a is not xs else a.dtype, *like) for a in (xs, w1, v1, w2)]
    dxs, dw1, dv1, dw2 = jax.lax.fori_loop(0, used, body, tuple(zeros))
    return dxs, dw1.astype(w1.dtype), dv1.astype(v1.dtype), dw2.astype(w2.dtype), None, None


_blocked_glu.defvjp(_blocked_glu_fwd, _blocked_glu_bwd)


def dispatch_blocked(x, w1, v1, w2, top_w, top_idx, valid=None, *, block_size: int = 0):
    """Dropless: 'sorted''s padded expert-sorted layout, run by a loop over the used blocks only."""
    del valid
    n, k = top_idx.shape
    e = w1.shape[0]
    bs = block_size or blocked_block_size(n * k, e)
    _, dest, slot_token, block_e, used = _padded_layout(top_idx, e, bs)
    xs = _rows(x, slot_token)  # [P, D]
    if jax.sharding.get_abstract_mesh().manual_axes:
        # Inside shard_map: give the custom_vjp's float inputs one common variance (e.g. tokens vary over data,
        # weights do not), so its hand-written backward returns cotangents of its inputs' types; JAX's own
        # transpose of this broadcast then sums the weight gradients over the axes the weights do not vary on.
        tie = _zero_like(jnp.float32, xs, w1, v1, w2, block_e)
        xs, w1, v1, w2 = (a + tie.astype(a.dtype) for a in (xs, w1, v1, w2))
    ys = _blocked_glu(xs, w1, v1, w2, block_e, used, bs)  # [P, D]
    return _combine(_rows(ys, dest).reshape(n, k, -1), top_w), jnp.zeros((), jnp.float32)


_RAGGED_DNUMS = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])),  # contract lhs D with rhs [E, F, D]'s D
    lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


def _ragged_glu(xs, w1, v1, w2, group_sizes):
    """GLU over expert-grouped rows xs [A, D] with ragged_dot; rows past sum(group_sizes) give 0."""
    h1 = jax.lax.ragged_dot_general(xs, w1, group_sizes, _RAGGED_DNUMS)  # [A, F]
    h2 = jax.lax.ragged_dot_general(xs, v1, group_sizes, _RAGGED_DNUMS)  # [A, F]
    return jax.lax.ragged_dot(jax.nn.silu(h1) * h2, w2, group_sizes)  # [A, D]


def dispatch_ragged(x, w1, v1, w2, top_w, top_idx, valid=None):
    """Dropless grouped matmul (jax.lax.ragged_dot) over the expert-sorted assignments."""
    del valid
    n, k = top_idx.shape
    e = w1.shape[0]
    order, _, group_sizes, _ = _sort_by_expert(top_idx, e)
    ys = _ragged_glu(x[order // k], w1, v1, w2, group_sizes)  # [A, D] grouped by expert
    inv = jnp.zeros((n * k,), jnp.int32).at[order].set(jnp.arange(n * k, dtype=jnp.int32))  # [A]
    return _combine(ys[inv].reshape(n, k, -1), top_w), jnp.zeros((), jnp.float32)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Per-expert slots: ceil(capacity_factor * N * k / E), at least 1."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def dispatch_capacity(x, w1, v1, w2, top_w, top_idx, valid=None, *, capacity_factor: float = 1.25):
    """Fixed-capacity dispatch into an [E, C, D] buffer; overflow assignments are dropped (contribute 0)."""
    n, k = top_idx.shape
    e = w1.shape[0]
    a = n * k
    cap = expert_capacity(n, k, e, capacity_factor)
    valid = jnp.ones((n,), jnp.bool_) if valid is None else valid
    # Slot-major assignment ids (a = slot * N + token): every token's first choice outranks any second
    # choice; padding tokens are pushed behind all real ones so they only ever drop themselves.
    e_sm = top_idx.T.reshape(a)  # [A]
    tok_sm = jnp.tile(jnp.arange(n, dtype=jnp.int32), k)  # [A]
    valid_sm = jnp.tile(valid, k)  # [A]
    priority = jnp.arange(a, dtype=jnp.int32) + jnp.where(valid_sm, 0, a).astype(jnp.int32)  # [A] < 2A
    order = jnp.argsort(e_sm.astype(jnp.int32) * (2 * a) + priority)  # [A]; keys are unique
    sorted_e = e_sm[order]
    group_sizes = jnp.bincount(e_sm, length=e)
    rank = jnp.arange(a) - (jnp.cumsum(group_sizes) - group_sizes)[sorted_e]  # [A]
    keep = rank < cap  # [A]
    dest_sorted = jnp.where(keep, sorted_e * cap + rank, e * cap).astype(jnp.int32)  # e*cap = dropped
    slot_token = jnp.full((e * cap + 1,), n, jnp.int32).at[dest_sorted].set(tok_sm[order])[:e * cap]
    xe = _rows(x, slot_token).reshape(e, cap, -1)  # [E, C, D]
    h = (jax.nn.silu(jnp.einsum('ecd,efd->ecf', xe, w1))
         * jnp.einsum('ecd,efd->ecf', xe, v1))  # [E, C, F]
    ye = jnp.einsum('ecf,efd->ecd', h, w2).reshape(e * cap, -1)  # [E*C, D]
    dest = jnp.zeros((a,), jnp.int32).at[order].set(dest_sorted)  # [A] slot-major; e*cap = dropped
    y_assign = _rows(ye, dest).reshape(k, n, -1).transpose(1, 0, 2)  # [N, k, D]
    dropped = jnp.sum((~keep) & valid_sm[order]) / jnp.maximum(jnp.sum(valid_sm), 1)
    return _combine(y_assign, top_w), dropped.astype(jnp.float32)


def dispatch_fn(strategy: str, *, capacity_factor: float = 1.25, block_size: int = 0):
    """The dispatch function of a resolved strategy name, with its options bound (shared signature above)."""
    fns = {'loop': dispatch_loop, 'sorted': functools.partial(dispatch_sorted, block_size=block_size),
           'blocked': functools.partial(dispatch_blocked, block_size=block_size), 'ragged': dispatch_ragged,
           'capacity': functools.partial(dispatch_capacity, capacity_factor=capacity_factor)}
    if strategy not in fns:
        raise ValueError(f'unknown resolved dispatch {strategy!r}; expected one of {sorted(fns)}')
    return fns[strategy]


def expert_rows_fn(strategy: str, block_size: int = 0):
    """Per-row expert computation for the expert-parallel path (mosaicjax.models.expert_parallel).

    Returns f(rows [M, D], ids int32 [M], w1, v1, w2 [E_l, F, D]) -> f32 [M, D]: row m through expert ids[m];
    ids == E_l marks an empty slot of the all-to-all buffer (output 0). strategy: 'loop' | 'sorted' | 'blocked' |
    'ragged' (the same per-backend choice as the single-device path; 'blocked' and 'ragged' skip empty slots).
    """
    def rows_loop(rows, ids, w1, v1, w2):
        # one_hot of id E_l is all zeros inside dispatch_loop: empty slots get no expert.
        y, _ = dispatch_loop(rows, w1, v1, w2, jnp.ones(ids.shape + (1,), jnp.float32), ids[:, None])
        return y

    def rows_sorted(rows, ids, w1, v1, w2):
        # Empty slots hold zero rows: parked on the last expert they produce zeros; the static block count
        # already covers every row, so leaving them out would not save any work.
        e = w1.shape[0]
        y, _ = dispatch_sorted(rows, w1, v1, w2, jnp.ones(ids.shape + (1,), jnp.float32),
                               jnp.minimum(ids, e - 1)[:, None], block_size=block_size)
        return y

    def rows_blocked(rows, ids, w1, v1, w2):
        # Empty slots (id E_l) get no buffer row and no block: the loop runs only the received rows' blocks.
        y, _ = dispatch_blocked(rows, w1, v1, w2, jnp.ones(ids.shape + (1,), jnp.float32), ids[:, None],
                                block_size=block_size)
        return y

    def rows_ragged(rows, ids, w1, v1, w2):
        e = w1.shape[0]
        order = jnp.argsort(ids, stable=True)  # [M]; empty slots (id e) last, outside every group
        group_sizes = jnp.bincount(ids, length=e).astype(jnp.int32)  # [E_l]; ignores id e
        ys = _ragged_glu(rows[order], w1, v1, w2, group_sizes)  # [M, D]
        inv = jnp.zeros(ids.shape, jnp.int32).at[order].set(jnp.arange(ids.shape[0], dtype=jnp.int32))
        return ys[inv].astype(jnp.float32)  # [M, D]

    fns = {'loop': rows_loop, 'sorted': rows_sorted, 'blocked': rows_blocked, 'ragged': rows_ragged}
    if strategy not in fns:
        raise ValueError(f'no per-row expert computation for dispatch {strategy!r}; expected one of {sorted(fns)}')
    return fns[strategy]


# ----------------------------------------------------------------------------------------------------------
# Experts module


class Experts(nn.Module):
    """E SiLU-GLU experts with HF-layout weights, applied to routed tokens.

    Attributes:
      num_experts, ffn_hidden_size: experts and each expert's hidden width.
      dispatch: one of DISPATCH_STRATEGIES.
      capacity_factor: per-expert capacity multiplier for 'capacity'.
      block_size: 'sorted' / 'blocked' block rows (0 = default_block_size / blocked_block_size).
      init_std: stddev of the normal initialiser.
      quantize: 'none' or 'int8' (int8 weights + scales, dequantised to the compute dtype as the dispatch's
        operands; see models/quantize.py).
    """
    num_experts: int
    ffn_hidden_size: int
    dispatch: str = 'auto'
    capacity_factor: float = 1.25
    block_size: int = 0
    init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    quantize: str = 'none'

    @nn.compact
    def __call__(self, x, top_w, top_idx, valid=None):
        """x [..., D], top_w [..., k], top_idx [..., k], valid bool [...] -> (y [..., D] in dtype, dropped f32)."""
        d = x.shape[-1]
        e, f = self.num_experts, self.ffn_hidden_size
        # HF layout [E*F, D] for all three (w2 is used as h @ w2_e, i.e. already [in=F, out=D] per expert).
        w1, v1, w2 = quantize_lib.expert_params(self, self.quantize, e, f, d, nn.initializers.normal(self.init_std),
                                                self.param_dtype, self.dtype)  # each [E, F, D]
        lead = x.shape[:-1]
        xf = x.astype(self.dtype).reshape(-1, d)  # [N, D]
        xf = nn.with_logical_constraint(xf, ('act_batch', 'act_embed'))
        tw = top_w.reshape(xf.shape[0], -1)  # [N, k]
        ti = top_idx.reshape(xf.shape[0], -1)  # [N, k]
        vf = None if valid is None else valid.reshape(-1)  # [N]
        strategy = resolve_dispatch(self.dispatch)
        dispatch = dispatch_fn(strategy, capacity_factor=self.capacity_factor, block_size=self.block_size)
        plan = expert_parallel.context_plan(e)
        if plan is None:
            y, dropped = dispatch(xf, w1, v1, w2, tw, ti, vf)
        else:
            # A multi-device mesh in context: shard_map over it, all-to-all expert parallelism when expert > 1.
            # 'capacity' bounds the exchange buffers (drops counted); the other strategies are dropless and
            # pick the per-device kernel.
            capacity = strategy == 'capacity'
            y, dropped = expert_parallel.sharded_dispatch(
                xf, *(wt.reshape(e * f, d) for wt in (w1, v1, w2)), tw, ti, vf, plan=plan, num_experts=e,
                capacity_factor=self.capacity_factor if capacity else None,
                rows_fn=expert_rows_fn(resolve_dispatch('auto') if capacity else strategy, self.block_size),
                token_fn=dispatch)
        return y.astype(self.dtype).reshape(*lead, d), dropped
