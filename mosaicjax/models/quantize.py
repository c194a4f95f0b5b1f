"""Int8 weight-only quantisation for inference (the talk's 8-bit serving): `DbrxConfig.quantize = 'int8'`.

Every matmul weight of DBRX -- attention Wqkv and out_proj, the experts' w1, v1, w2 and lm_head -- is stored as
symmetric int8 with one float32 scale per output channel:

    s = max |w| over the contracted (input) axis / 127,    q = round(w / s) in [-127, 127],    w ~ q * s

so a weight's error is at most s / 2 per element (half a quantisation step of its own channel). Activations stay in
the compute dtype; the int8 weight is converted to it as the matmul's operand and the scale multiplies the matmul's
*output* channels (x @ (q * s) = (x @ q) * s for a per-output-channel s), so no dequantised copy of a weight is
formed outside the matmul's operand: XLA fuses the int8 -> float convert into the dot on GPU/TPU, and memory traffic
for the weights is a quarter of float32 (half of bf16) -- what bounds decode speed. The router (its decisions are
discrete: a tiny error would flip an expert), the embedding (a gather of one row per token) and the norms stay in
float.

Parameter layout (names as the float model, plus scales; scan layout adds a leading [L]):
    attn/Wqkv/kernel int8 [d, qkv] + attn/Wqkv/scale f32 [qkv]        (out_proj, lm_head alike)
    experts/w1, v1 int8 [E*F, D] + w1_scale, v1_scale f32 [E*F]        (x @ w1_e.T: output channel = row)
    experts/w2 int8 [E*F, D] + w2_scale f32 [E, D]                      (h @ w2_e: output channel = column, per expert)

    lm = mosaicjax.load_lm(path)
    qlm = quantize_lm(lm)               # a LanguageModel over the int8 tree (the float tree can be dropped)
    python -m mosaicjax.serve --model=dbrx=PATH --quantize=int8
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

QUANTIZE_MODES = ('none', 'int8')
_QMAX = 127.0
_DENSE = ('Wqkv', 'out_proj', 'lm_head')  # nn.Dense modules quantised (their 'kernel' [in, out])
_EXPERTS = ('w1', 'v1', 'w2')


# ----------------------------------------------------------------------------------------------------------
# Tensors


def quantize_tensor(w, axis: int) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 with one scale per slice along `axis` (the contracted axis).

    Returns (q int8, same shape as w; scale f32, w's shape without `axis`). An all-zero channel gets scale 1.
    """
    w = jnp.asarray(w).astype(jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=axis)  # [w.shape without axis]
    scale = jnp.where(amax > 0, amax / _QMAX, 1.0).astype(jnp.float32)
    q = jnp.clip(jnp.round(w / jnp.expand_dims(scale, axis)), -_QMAX, _QMAX).astype(jnp.int8)
    return q, scale


def dequantize_tensor(q, scale, axis: int, dtype=jnp.float32) -> jax.Array:
    """q * scale (scale broadcast over `axis`), in dtype."""
    return (q.astype(jnp.float32) * jnp.expand_dims(scale, axis)).astype(dtype)


def int8_matmul(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """x [..., in] @ dequant(q [in, out], scale [out]) -> [..., out] in x's dtype.

    The convert of q is the dot's operand (fused into the matmul by XLA on accelerators) and the per-output-channel
    scale is applied to the product, which is exact algebra: x @ (q * s) == (x @ q) * s.
    """
    y = jnp.einsum('...i,io->...o', x, q.astype(x.dtype),
                   preferred_element_type=jnp.float32)  # [..., out]
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def expert_weights(params: dict, e: int, f: int, d: int, dtype) -> tuple[jax.Array, ...]:
    """Dequantised [E, F, D] w1, v1, w2 (compute dtype) from an int8 Experts param dict (one layer).

    The batched dispatch strategies take float expert weights; the decode path (gather_experts) instead
    dequantises only the gathered experts' rows.
    """
    w1 = params['w1'].reshape(e, f, d).astype(dtype) * params['w1_scale'].reshape(e, f, 1).astype(dtype)
    v1 = params['v1'].reshape(e, f, d).astype(dtype) * params['v1_scale'].reshape(e, f, 1).astype(dtype)
    w2 = params['w2'].reshape(e, f, d).astype(dtype) * params['w2_scale'].reshape(e, 1, d).astype(dtype)
    return w1, v1, w2  # each [E, F, D]


# ----------------------------------------------------------------------------------------------------------
# Modules


class QuantDense(nn.Module):
    """nn.Dense (no bias) over an int8 kernel [in, out] and an f32 per-output-channel scale [out].

    Same name and kernel shape as the float nn.Dense it replaces, so a float tree maps onto it by quantize_params.
    """
    features: int
    kernel_axes: tuple = (None, None)  # logical axis names of the kernel (the scale takes the output's)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param('kernel', nn.with_logical_partitioning(nn.initializers.zeros_init(), self.kernel_axes),
                            (x.shape[-1], self.features), jnp.int8)
        scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones_init(), self.kernel_axes[1:]),
                           (self.features,), jnp.float32)
        return int8_matmul(x.astype(self.dtype), kernel, scale)


def dense(features: int, quantize: str, *, kernel_axes: tuple, kernel_init, dtype, param_dtype, dot_general,
          name: str) -> nn.Module:
    """The projection the models use: nn.Dense (float) or QuantDense ('int8'), without bias."""
    if quantize == 'int8':
        return QuantDense(features, kernel_axes=kernel_axes, dtype=dtype, name=name)
    if quantize not in (None, 'none'):
        raise ValueError(f'quantize={quantize!r}; expected one of {QUANTIZE_MODES}')
    return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nn.with_logical_partitioning(kernel_init, kernel_axes), dot_general=dot_general,
                    name=name)


def expert_params(module: nn.Module, quantize: str, e: int, f: int, d: int, init, param_dtype, dtype):
    """Declares an Experts module's weights and returns them as compute-dtype [E, F, D] w1, v1, w2."""
    if quantize == 'int8':
        zeros = nn.with_logical_partitioning(nn.initializers.zeros_init(), ('exp_mlp', 'embed'))
        ones_rows = nn.with_logical_partitioning(nn.initializers.ones_init(), ('exp_mlp',))
        ones_cols = nn.with_logical_partitioning(nn.initializers.ones_init(), ('exp', 'embed'))
        p = {n: module.param(n, zeros, (e * f, d), jnp.int8) for n in _EXPERTS}
        p['w1_scale'] = module.param('w1_scale', ones_rows, (e * f,), jnp.float32)
        p['v1_scale'] = module.param('v1_scale', ones_rows, (e * f,), jnp.float32)
        p['w2_scale'] = module.param('w2_scale', ones_cols, (e, d), jnp.float32)
        return expert_weights(p, e, f, d, dtype)
    init = nn.with_logical_partitioning(init, ('exp_mlp', 'embed'))
    return tuple(module.param(n, init, (e * f, d), param_dtype).astype(dtype).reshape(e, f, d)
                 for n in _EXPERTS)  # each [E, F, D]


def gathered_expert_rows(w: dict, layer, top_idx, num_experts: int, dtype):
    """The routed experts' rows for gather_experts: (g1, g2, g3) [N, k, F, D] in dtype and the scales to apply to
    the products (s1, s2 [N, k, F], s3 [N, k, D]; None for float weights).

    w: {'w1', 'v1', 'w2'} [L, E*F, D] (+ '*_scale' when int8): only the gathered int8 rows are converted.
    """
    lyr, ef, d = w['w1'].shape
    f = ef // num_experts
    idx = layer * num_experts + top_idx  # [N, k] rows of the [L*E, ...] views
    g = tuple(w[n].reshape(lyr * num_experts, f, d)[idx].astype(dtype) for n in _EXPERTS)  # [N, k, F, D] each
    if 'w1_scale' not in w:
        return g, None
    s = (w['w1_scale'].reshape(lyr * num_experts, f)[idx], w['v1_scale'].reshape(lyr * num_experts, f)[idx],
         w['w2_scale'].reshape(lyr * num_experts, d)[idx])  # [N, k, F], [N, k, F], [N, k, D]
    return g, s


# ----------------------------------------------------------------------------------------------------------
# Parameter trees


def quantize_params(params: dict, mode: str = 'int8') -> dict:
    """A float DBRX 'params' tree (scan or unrolled layout) -> the tree of the same model with quantize=mode.

    Dense kernels [..., in, out] -> int8 kernel + scale [..., out]; experts [..., E*F, D] -> int8 + scales (see
    the module docstring). Everything else is returned as is. Quantised arrays keep their input's sharding.
    """
    if mode != 'int8':
        raise ValueError(f'quantize_params: mode={mode!r}; only int8 is implemented')
    n_experts = _router_experts(params)

    def walk(tree):
        out = {}
        for k, v in tree.items():
            if not isinstance(v, dict):
                out[k] = v
            elif k in _DENSE and set(v) == {'kernel'}:
                q, s = _quantize_sharded(v['kernel'], axis=-2)  # contract 'in': one scale per output column
                out[k] = {'kernel': q, 'scale': s}
            elif k == 'experts' and set(v) == set(_EXPERTS):
                out[k] = _quantize_experts(v, n_experts)
            else:
                out[k] = walk(v)
        return out

    return walk(params)


def _router_experts(params: dict) -> int:
    for k, v in params.items():
        if k == 'router' and isinstance(v, dict) and 'kernel' in v:
            return int(v['kernel'].shape[-1])
        if isinstance(v, dict):
            n = _router_experts(v)
            if n:
                return n
    return 0


def _quantize_sharded(w, axis):
    """quantize_tensor under jit, the int8 tensor placed like w (the scale placed by XLA's propagation)."""
    sharding = getattr(w, 'sharding', None)
    fn = jax.jit(quantize_tensor, static_argnums=1,
                 out_shardings=(sharding, None) if isinstance(sharding, jax.sharding.NamedSharding) else None)
    return fn(w, axis)


def _quantize_experts(p: dict, e: int) -> dict:
    if not e:
        raise ValueError('quantize_params: no router found to tell the number of experts')
    w1 = p['w1']
    *lead, ef, d = w1.shape
    f = ef // e
    out = {}
    for n in ('w1', 'v1'):
        out[n], out[f'{n}_scale'] = _quantize_sharded(p[n], axis=-1)  # per row: [..., E*F]

    def q_w2(w):
        q, s = quantize_tensor(w.reshape(*lead, e, f, d), axis=-2)  # per (expert, column): [..., E, D]
        return q.reshape(*lead, ef, d), s
    sharding = getattr(p['w2'], 'sharding', None)
    out['w2'], out['w2_scale'] = jax.jit(q_w2, out_shardings=(sharding, None) if isinstance(
        sharding, jax.sharding.NamedSharding) else None)(p['w2'])
    return out


def dequantize_params(params: dict) -> dict:
    """The float32 tree whose weights are the int8 tree's q * scale: the float model that the quantised one computes
    (up to float rounding), for measuring the quantised implementation separately from the quantisation."""
    n_experts = _router_experts(params)

    def walk(tree):
        out = {}
        for k, v in tree.items():
            if not isinstance(v, dict):
                out[k] = v
            elif k in _DENSE and set(v) == {'kernel', 'scale'}:
                out[k] = {'kernel': dequantize_tensor(v['kernel'], v['scale'], axis=-2)}
            elif k == 'experts' and 'w1_scale' in v:
                *lead, ef, d = v['w1'].shape
                e = n_experts
                f = ef // e
                out[k] = {n: dequantize_tensor(v[n], v[f'{n}_scale'], axis=-1) for n in ('w1', 'v1')}
                out[k]['w2'] = dequantize_tensor(v['w2'].reshape(*lead, e, f, d), v['w2_scale'],
                                                 axis=-2).reshape(*lead, ef, d)
            else:
                out[k] = walk(v)
        return out
    return walk(params)


def quantize_lm(lm, mode: str = 'int8'):
    """A LanguageModel serving `lm`'s weights quantised (same tokenizer, mesh, chat template, generator options)."""
    from mosaicjax import lm as lm_lib  # pylint: disable=import-outside-toplevel
    if mode in (None, 'none'):
        return lm
    cfg = dataclasses.replace(lm.config, quantize=mode)
    params = quantize_params(lm.params, mode)
    return lm_lib.LanguageModel(cfg, params, lm.tokenizer, mesh=lm.mesh, rules=lm.rules,
                                chat_template=lm.chat_template, generator_options=lm.generator_options)


def weight_bytes(params) -> int:
    """Bytes of a parameter tree (for reporting the memory a quantisation saves)."""
    return int(sum(np.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(params)))
