"""DBRX: decoder-only fine-grained MoE transformer, numerically equal to transformers' DbrxForCausalLM.

    tokens -> wte -> L x [x += attn(norm_1(x)); x += moe(norm_2(x))] -> norm_f -> lm_head -> logits

Parameter tree (scan_layers=True; block params get a leading 'layers' axis), kernels [in, out]:
    wte/embedding [vocab, d]                           lm_head/kernel [d, vocab]      norm_f/scale [d]
    blocks/norm_1/scale [L, d]                         blocks/norm_2/scale [L, d]
    blocks/attn/Wqkv/kernel [L, d, (H + 2*KV)*hd]      blocks/attn/out_proj/kernel [L, d, d]
    blocks/router/kernel [L, d, E]                     blocks/experts/{w1,v1,w2} [L, E*ffn, d]  (HF layout)
With scan_layers=False the blocks are blocks_0 ... blocks_{L-1} without the leading axis
(stack_block_params / unstack_block_params convert).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from mosaicjax.models import expert_parallel
from mosaicjax.models import layers
from mosaicjax.models import moe
from mosaicjax.models import quantize as quantize_lib

REMAT_POLICIES = ('none', 'full', 'dots')


@gin.configurable('DbrxConfig')
@dataclasses.dataclass(frozen=True)
class DbrxConfig:
    """DBRX hyper-parameters: Hugging Face config.json fields (flattened), then framework fields.

    Defaults are the published DBRX-132B (databricks/dbrx-base), except moe_jitter_eps (0: no jitter).
    """
    # --- Hugging Face DBRX fields ---
    d_model: int = 6144  # residual stream width (HF hidden_size)
    n_heads: int = 48  # query heads; head_dim = d_model // n_heads
    n_layers: int = 40  # transformer blocks
    max_seq_len: int = 32768  # longest sequence the model is meant for (RoPE has no hard limit)
    vocab_size: int = 100352  # embedding / lm_head rows (cl100k BPE padded)
    kv_n_heads: int = 8  # key/value heads (GQA); n_heads % kv_n_heads == 0; 1 = MQA
    clip_qkv: float | None = 8.0  # clamp the fused qkv projection to [-clip_qkv, clip_qkv]; None = off
    rope_theta: float = 500000.0  # RoPE base (HF attn_config.rope_theta)
    ffn_hidden_size: int = 10752  # hidden width of each expert's GLU
    moe_num_experts: int = 16  # experts per MoE layer
    moe_top_k: int = 4  # experts each token is routed to
    moe_jitter_eps: float | None = 0.0  # router-input multiplicative noise U(1-eps, 1+eps) in training
    moe_loss_weight: float = 0.05  # weight the trainer puts on aux['moe_lb_loss']
    moe_normalize_expert_weights: float | None = 1.0  # p of the p-norm top-k weights are divided by
    # --- framework fields ---
    dtype: str = 'float32'  # compute dtype ('bfloat16': bf16 matmuls over float32 params)
    param_dtype: str = 'float32'  # parameter storage dtype
    remat: str = 'none'  # per-block rematerialisation: 'none' | 'full' (save nothing) | 'dots' (save matmuls)
    scan_layers: bool = True  # nn.scan over blocks (one compiled block, params stacked on 'layers')
    moe_dispatch: str = 'auto'  # 'auto' | 'loop' | 'sorted' | 'blocked' | 'ragged' | 'capacity' (models/moe.py)
    # 'capacity' only: per-expert capacity multiplier; under an expert-parallel mesh, the all-to-all bucket
    # capacity as a multiple of the balanced load (models/expert_parallel.py)
    moe_capacity_factor: float = 1.25
    moe_block_size: int = 0  # 'sorted' / 'blocked' dispatch block rows (0 = derived from tokens per expert)
    router_z_loss_weight: float = 0.0  # weight the trainer puts on aux['router_z_loss']
    layer_norm_eps: float = 1e-5  # LayerNorm epsilon (torch default, as in the HF model)
    initializer_range: float = 0.02  # stddev of every normal initialiser (HF initializer_range)
    attention_impl: str = 'auto'  # 'auto' | 'xla' | 'cudnn' | 'einsum' | 'chunked' (see models/layers.py)
    # Inference only: 'int8' stores the matmul weights (Wqkv, out_proj, experts, lm_head) as int8 with per-output-
    # channel scales (models/quantize.py; quantize_params converts a float tree). 'none': float weights.
    quantize: str = 'none'

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f'd_model={self.d_model} not divisible by n_heads={self.n_heads}')
        if self.n_heads % self.kv_n_heads:
            raise ValueError(f'n_heads={self.n_heads} not divisible by kv_n_heads={self.kv_n_heads}')
        if self.head_dim % 2:
            raise ValueError(f'head_dim={self.head_dim} must be even for RoPE')
        if not 1 <= self.moe_top_k <= self.moe_num_experts:
            raise ValueError(f'moe_top_k={self.moe_top_k} must be in [1, moe_num_experts={self.moe_num_experts}]')
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f'remat={self.remat!r}; expected one of {REMAT_POLICIES}')
        if self.moe_dispatch not in moe.DISPATCH_STRATEGIES:
            raise ValueError(f'moe_dispatch={self.moe_dispatch!r}; expected one of {moe.DISPATCH_STRATEGIES}')
        if self.attention_impl not in layers.ATTENTION_IMPLS:
            raise ValueError(f'attention_impl={self.attention_impl!r}; expected one of {layers.ATTENTION_IMPLS}')
        if self.quantize not in quantize_lib.QUANTIZE_MODES:
            raise ValueError(f'quantize={self.quantize!r}; expected one of {quantize_lib.QUANTIZE_MODES}')
        for name in ('dtype', 'param_dtype'):
            jnp.dtype(getattr(self, name))  # raises on an unknown dtype name

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)

    @classmethod
    def from_hf_dict(cls, hf: dict, **overrides) -> 'DbrxConfig':
        """From a Hugging Face DBRX config.json dict (see mosaicjax.checkpoints.hf_dbrx)."""
        from mosaicjax.checkpoints import hf_dbrx  # pylint: disable=import-outside-toplevel
        return hf_dbrx.config_from_hf(hf, **overrides)

    def to_hf_dict(self) -> dict:
        """To a Hugging Face DBRX config.json dict (see mosaicjax.checkpoints.hf_dbrx)."""
        from mosaicjax.checkpoints import hf_dbrx  # pylint: disable=import-outside-toplevel
        return hf_dbrx.config_to_hf(self)


def gather_experts(x, experts_w, layer, top_w, top_idx, num_experts: int):
    """Dropless MoE for a handful of tokens (decoding): reads only the k experts each token uses.

    x [N, D]; experts_w: the HF-layout expert weights of every layer, {'w1', 'v1', 'w2'} [L, E*F, D]
    (x @ w1_e.T, h @ w2_e), plus their scales when int8 (models/quantize.py: only the gathered rows are converted,
    the scales multiply the products); layer: int32 scalar, the layer to use; top_w f32 [N, k];
    top_idx int [N, k] -> f32 [N, D].
    The rows of expert (layer, e) are gathered straight from the stacked parameter: slicing the layer out
    first (what nn.scan does to block params) would copy all E experts of the layer every step, and the
    blocked 'sorted' dispatch reads ~E experts for one token. The right trade while N*k <= E.
    """
    n, k = top_idx.shape
    (g1, g2, g3), scales = quantize_lib.gathered_expert_rows(experts_w, layer, top_idx, num_experts,
                                                             x.dtype)  # each [N, k, F, D]
    f, d = g1.shape[2], g1.shape[3]
    g1, g2 = g1.reshape(n, k * f, d), g2.reshape(n, k * f, d)  # [N, k*F, D]
    h1 = jnp.einsum('nmd,nd->nm', g1, x, preferred_element_type=jnp.float32)  # [N, k*F]: a matvec per token
    h2 = jnp.einsum('nmd,nd->nm', g2, x, preferred_element_type=jnp.float32)  # [N, k*F]
    if scales is not None:  # per-output-channel scales of w1 / v1: one per row
        h1, h2 = h1 * scales[0].reshape(n, k * f), h2 * scales[1].reshape(n, k * f)
    h = jax.nn.silu(h1.astype(x.dtype)) * h2.astype(x.dtype)  # [N, k*F]
    # Scaling h by the routing weight before w2 (linear) turns the k expert outputs and their weighted
    # sum into one product over the concatenated k*F rows.
    h = (h.reshape(n, k, f).astype(jnp.float32) * top_w[:, :, None].astype(jnp.float32))  # [N, k, F]
    if scales is None:
        return jnp.einsum('nm,nmd->nd', h.reshape(n, k * f).astype(x.dtype), g3.reshape(n, k * f, d),
                          preferred_element_type=jnp.float32)  # [N, D]
    y = jnp.einsum('nkf,nkfd->nkd', h.astype(x.dtype), g3, preferred_element_type=jnp.float32)  # [N, k, D]
    return jnp.sum(y * scales[2], axis=1)  # w2's scales are per (expert, output column): [N, D]


class DbrxBlock(nn.Module):
    """One pre-norm transformer block; returns (x, per-layer aux). Signature fits nn.scan (carry, *broadcast).

    Attributes:
      deterministic: no router jitter when True.
      return_kv: also return this layer's new keys/values in aux['k'], aux['v'] [batch, seq, kv_heads, hd]
        (implied when a kv cache is passed): how prefill and decode fill the KV cache.
    """
    config: DbrxConfig
    deterministic: bool = True
    return_kv: bool = False

    @nn.compact
    def __call__(self, x, cos, sin, mask, valid, kv_cache=None, cache_mask=None, experts_w=None, layer=None):
        """x [batch, seq, d]; cos/sin f32 [batch, seq, head_dim]; mask bool [batch, 1, seq, seq];
        valid bool [batch, seq] (False = padding).

        Decoding: kv_cache = (k, v) [batch, cache_len, kv_heads, head_dim] (this layer's cache before these
        tokens) and cache_mask bool [batch, 1, seq, cache_len] (cached slots each token may attend to).
        experts_w = {'w1', 'v1', 'w2'} [L', E*F, D] (+ their scales when int8) and layer (int32 index into L'): run the MoE with
        gather_experts on these (the stacked expert params) instead of this block's own Experts."""
        cfg = self.config
        dt, pdt = cfg.compute_dtype, cfg.params_dtype
        act = ('act_batch', 'act_length', 'act_embed')
        h = layers.LayerNorm(cfg.layer_norm_eps, dt, pdt, name='norm_1')(x)
        h = layers.Attention(cfg.d_model, cfg.n_heads, cfg.kv_n_heads, cfg.clip_qkv, cfg.attention_impl,
                             cfg.initializer_range, dt, pdt, quantize=cfg.quantize, name='attn')(
                                 h, cos, sin, mask, kv_cache, cache_mask, self.return_kv)
        new_kv = None
        if kv_cache is not None or self.return_kv:
            h, new_kv = h
        x = nn.with_logical_constraint(x + h, act)
        h = layers.LayerNorm(cfg.layer_norm_eps, dt, pdt, name='norm_2')(x)
        logits, probs, top_w, top_idx = moe.Router(
            cfg.moe_num_experts, cfg.moe_top_k, cfg.moe_jitter_eps, cfg.moe_normalize_expert_weights,
            cfg.initializer_range, pdt, name='router')(h, deterministic=self.deterministic)  # [b, s, E|k]
        e = cfg.moe_num_experts
        if experts_w is not None:
            b, t, d = h.shape
            y = gather_experts(h.reshape(b * t, d), experts_w, layer, top_w.reshape(b * t, -1),
                               top_idx.reshape(b * t, -1), e)  # [batch*seq, d]
            y, dropped = y.astype(dt).reshape(b, t, d), jnp.zeros((), jnp.float32)
        else:
            y, dropped = moe.Experts(cfg.moe_num_experts, cfg.ffn_hidden_size, cfg.moe_dispatch,
                                     cfg.moe_capacity_factor, cfg.moe_block_size, cfg.initializer_range, dt, pdt,
                                     quantize=cfg.quantize, name='experts')(h, top_w, top_idx, valid)  # [b, s, d]
        x = nn.with_logical_constraint(x + y, act)
        aux = moe.router_aux(logits.reshape(-1, e), probs.reshape(-1, e),
                             top_idx.reshape(-1, cfg.moe_top_k), valid.reshape(-1))
        aux['dropped_fraction'] = dropped
        if new_kv is not None:
            aux['k'], aux['v'] = new_kv
        return x, aux


def _remat_policy(name: str):
    # 'full' saves nothing (recompute the whole block); 'dots' keeps matmul outputs, recomputes elementwise.
    return {'full': None, 'dots': jax.checkpoint_policies.checkpoint_dots}[name]


class Dbrx(nn.Module):
    """DBRX causal LM. __call__(tokens, positions=None, segment_ids=None, *, deterministic=True) -> (logits, aux).

    tokens/positions/segment_ids int32 [batch, seq]; positions default arange(seq), segment_ids default ones
    (0 marks padding, which never attends to / is attended by real tokens and is excluded from router stats).
    logits float32 [batch, seq, vocab]. aux: 'moe_lb_loss' and 'router_z_loss' (unweighted scalars, mean over
    layers), 'expert_load' f32 [n_layers, E], 'dropped_fraction' (mean over layers; 0 when dropless).

    KV-cache decoding (mosaicjax.generation drives it): pass kv_cache = {'k', 'v'} each
    [n_layers, batch, cache_len, kv_heads, head_dim] (only kv heads are cached) and get the updated cache back
    in aux['kv_cache'].
      cache_index=None: prefill of an empty cache. Exactly the training forward (same attention, same
        dispatch); the tokens' keys/values are written to slots [0, seq).
      cache_index int32 [batch]: append. Row b's tokens go to slots cache_index[b] + t, attend to its cached
        slots < cache_index[b] and causally (same segment) to each other; positions default to the slots.
        When batch*seq*top_k <= n_experts (and no multi-device mesh is in context) the MoE gathers just the
        routed experts' rows from the stacked params (gather_experts).
    logits_index int32 [batch] (optional): return logits only at that sequence index per row,
    [batch, 1, vocab] (e.g. the last real token of right-padded prompts), skipping lm_head elsewhere.
    """
    config: DbrxConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, *, deterministic: bool = True,
                 kv_cache=None, cache_index=None, logits_index=None):
        cfg = self.config
        dt, pdt = cfg.compute_dtype, cfg.params_dtype
        b, t = tokens.shape
        if cache_index is not None and kv_cache is None:
            raise ValueError('cache_index needs kv_cache')
        if kv_cache is not None and cache_index is None and t > kv_cache['k'].shape[2]:
            raise ValueError(f'prefill of {t} tokens does not fit a cache of {kv_cache["k"].shape[2]} slots')
        if positions is None:
            start = 0 if cache_index is None else cache_index.astype(jnp.int32)[:, None]  # [batch, 1]
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) + start, (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        init = nn.initializers.normal(cfg.initializer_range)

        x = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dt, param_dtype=pdt,
                     embedding_init=nn.with_logical_partitioning(init, ('vocab', 'embed')),
                     name='wte')(tokens)  # [batch, seq, d]
        x = nn.with_logical_constraint(x, ('act_batch', 'act_length', 'act_embed'))
        # Computed once, shared by every layer.
        cos, sin = layers.rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)  # [batch, seq, head_dim]
        mask = layers.make_attention_mask(segment_ids)  # [batch, 1, seq, seq]
        valid = segment_ids != 0  # [batch, seq]

        block = DbrxBlock
        if cfg.remat != 'none':
            block = nn.remat(block, policy=_remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers)
        return_kv = kv_cache is not None
        # Extra block inputs when appending to a cache: the layer's cache (scanned over layers) and which
        # cached slots each new token may see (the same for every layer).
        extra, extra_axes = (), ()
        gather = False
        if cache_index is not None:
            slots = jnp.arange(kv_cache['k'].shape[2], dtype=jnp.int32)  # [cache_len]
            cache_mask = (slots[None, None, :] < cache_index.astype(jnp.int32)[:, None, None])[:, None]
            cache_mask = jnp.broadcast_to(cache_mask, (b, 1, t, slots.shape[0]))  # [batch, 1, seq, cache_len]
            extra, extra_axes = ((kv_cache['k'], kv_cache['v']), cache_mask), (0, nn.broadcast)
            # A few tokens on one device (a multi-device mesh keeps the sharded dispatch): gather the routed
            # experts' rows straight from the stacked params (see gather_experts).
            gather = (b * t * cfg.moe_top_k <= cfg.moe_num_experts and not self.is_initializing()
                      and expert_parallel.context_plan(cfg.moe_num_experts) is None)
        if cfg.scan_layers:
            if gather:
                stacked = nn.meta.unbox(self.variables['params']['blocks']['experts'])  # each [L, E*F, D]
                extra += (stacked, jnp.arange(cfg.n_layers, dtype=jnp.int32))
                extra_axes += (nn.broadcast, 0)
            blocks = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True, 'jitter': True},
                             in_axes=(nn.broadcast,) * 4 + extra_axes, length=cfg.n_layers,
                             metadata_params={nn.PARTITION_NAME: 'layers'})
            x, aux = blocks(cfg, deterministic, return_kv, name='blocks')(
                x, cos, sin, mask, valid, *extra)  # aux leaves [L, ...]
        else:
            per_layer = []
            for i in range(cfg.n_layers):
                layer_extra = () if not extra else ((extra[0][0][i], extra[0][1][i]), extra[1])
                if gather:
                    w = nn.meta.unbox(self.variables['params'][f'blocks_{i}']['experts'])  # each [E*F, D]
                    layer_extra += ({n: a[None] for n, a in w.items()}, jnp.zeros((), jnp.int32))
                x, a = block(cfg, deterministic, return_kv, name=f'blocks_{i}')(
                    x, cos, sin, mask, valid, *layer_extra)
                per_layer.append(a)
            aux = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)  # leaves [L, ...]

        if logits_index is not None:
            x = x[jnp.arange(b), logits_index.astype(jnp.int32)][:, None]  # [batch, 1, d]
        x = layers.LayerNorm(cfg.layer_norm_eps, dt, pdt, name='norm_f')(x)
        logits = quantize_lib.dense(cfg.vocab_size, cfg.quantize, kernel_axes=('embed', 'vocab'), kernel_init=init,
                                    dtype=dt, param_dtype=pdt, dot_general=layers.dense_dot_general,
                                    name='lm_head')(x)  # [batch, seq, vocab]
        logits = nn.with_logical_constraint(logits, ('act_batch', 'act_length', 'act_vocab'))
        out_aux = {
            'moe_lb_loss': jnp.mean(aux['lb_loss']),
            'router_z_loss': jnp.mean(aux['z_loss']),
            'expert_load': aux['expert_load'].astype(jnp.float32),  # [n_layers, E]
            'dropped_fraction': jnp.mean(aux['dropped_fraction']),
        }
        if kv_cache is not None:
            out_aux['kv_cache'] = write_kv_cache(kv_cache, aux['k'], aux['v'], cache_index)
        return logits.astype(jnp.float32), out_aux


def write_kv_cache(kv_cache: dict, k, v, cache_index=None) -> dict:
    """Writes new keys/values k, v [L, batch, seq, kv_heads, hd] into kv_cache {'k', 'v'} [L, batch, S, kv, hd].

    cache_index None: at slots [0, seq) (prefill; one static slice update). Else int32 [batch]: row b at
    slots cache_index[b] + t; slots >= S are dropped (a finished row may run past the end harmlessly).
    Under jit with the cache donated both update in place.
    """
    out = {}
    for name, new in (('k', k), ('v', v)):
        cache = kv_cache[name]
        new = new.astype(cache.dtype)
        if cache_index is None:
            out[name] = jax.lax.dynamic_update_slice(cache, new, (0, 0, 0, 0, 0))
        else:
            b, t = new.shape[1], new.shape[2]
            rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))  # [batch, seq]
            slots = cache_index.astype(jnp.int32)[:, None] + jnp.arange(t, dtype=jnp.int32)  # [batch, seq]
            out[name] = cache.at[:, rows, slots].set(new, mode='drop')  # [L, batch, S, kv, hd]
    return out


def make_model(cfg: DbrxConfig) -> Dbrx:
    return Dbrx(cfg)


# ----------------------------------------------------------------------------------------------------------
# Layer-stacking helpers (scan <-> unrolled parameter layouts)


def unstack_block_params(params: dict, n_layers: int) -> dict:
    """scan layout (blocks/... [L, ...]) -> unrolled layout (blocks_i/...). Other entries are kept."""
    out = {k: v for k, v in params.items() if k != 'blocks'}
    for i in range(n_layers):
        out[f'blocks_{i}'] = jax.tree.map(lambda a, i=i: a[i], params['blocks'])
    return out


def stack_block_params(params: dict, n_layers: int) -> dict:
    """unrolled layout (blocks_i/...) -> scan layout (blocks/... [L, ...]). Other entries are kept."""
    names = [f'blocks_{i}' for i in range(n_layers)]
    out = {k: v for k, v in params.items() if k not in names}
    out['blocks'] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[n] for n in names])
    return out


# ----------------------------------------------------------------------------------------------------------
# Size and cost


def count_params(cfg: DbrxConfig) -> dict:
    """Analytic parameter counts: total, active (per token) and embedding (input wte only).

    active = everything except the experts + top_k / E of the expert weights (a token runs k of E experts).
    """
    d, hd, e, f = cfg.d_model, cfg.head_dim, cfg.moe_num_experts, cfg.ffn_hidden_size
    attn = d * (cfg.n_heads + 2 * cfg.kv_n_heads) * hd + d * d  # Wqkv + out_proj
    per_layer_dense = attn + 2 * d + d * e  # + norm_1, norm_2, router
    per_layer_experts = 3 * e * f * d  # w1, v1, w2
    embedding = cfg.vocab_size * d
    dense = embedding + cfg.n_layers * per_layer_dense + d + d * cfg.vocab_size  # + norm_f, lm_head
    experts = cfg.n_layers * per_layer_experts
    return {
        'total': dense + experts,
        'active': dense + experts * cfg.moe_top_k // e,
        'embedding': embedding,
    }


def flops_per_token(cfg: DbrxConfig, seq_len: int) -> float:
    """Training FLOPs per token, PaLM appendix B: 6 * N_active + 12 * n_layers * d_model * seq_len.

    N_active: active parameters without the input embedding (a lookup, no matmul; lm_head is counted).
    6N: forward (2N) + backward (4N) matmul FLOPs. The attention term counts QK^T and AV (2 * 2 * d * seq
    per token forward, x3 for training) over the full square (no causal halving), as PaLM and MaxText do,
    so MFU numbers are comparable with theirs. With GQA the score/value matmuls still use n_heads*head_dim
    = d_model, so the term is unchanged. The router's and norms' elementwise work is ignored.
    """
    n = count_params(cfg)
    return float(6 * (n['active'] - n['embedding']) + 12 * cfg.n_layers * cfg.d_model * seq_len)
