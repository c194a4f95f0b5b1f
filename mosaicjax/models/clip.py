"""CLIP text encoders (Stable Diffusion's text_encoder / text_encoder_2) in Flax linen, numerically transformers'.

Architecture as transformers' CLIPTextModel: token + learned position embeddings; pre-LN transformer blocks
(LayerNorm -> causal multi-head self-attention with separate biased q/k/v/out projections -> residual;
LayerNorm -> fc1 -> activation -> fc2 -> residual); a final LayerNorm. Softmax scale 1/sqrt(head_dim), softmax in
float32. The pooled output is the final-normed state at the end token: when `eos_token_id == 2` (configs
written before transformers PR #24773, which is every SD1/SD2/SDXL text encoder on the Hub) it is the argmax of
the ids (the end token has the largest id in CLIP's vocabulary), else the first position equal to
`eos_token_id`, exactly as transformers picks it.

Parameter tree mirrors the transformers state dict (`text_model.encoder.layers.3.self_attn.q_proj.weight` ->
`text_model/encoder/layers_3/self_attn/q_proj/kernel`, transposed to Flax's [in, out]); see
mosaicjax/checkpoints/diffusers_parts.py. Logical axes: embeddings ('vocab', 'embed') / (None, 'embed'); q/k/v
kernels ('embed', 'heads'), out_proj ('heads', 'embed'); fc1 ('embed', 'mlp'), fc2 ('mlp', 'embed');
LayerNorm ('norm',); text_projection ('embed', None).

Forward passes return `(last_hidden_state, aux)`; aux['hidden_states'] holds the embeddings and every layer's
output (num_hidden_layers + 1 entries, before the final LayerNorm, as transformers returns them: SDXL conditions
on hidden_states[-2]; SD2's checkpoint already stops one layer early and uses the last state; SD1's clip_skip is
`apply_final_layer_norm(hidden_states[-(clip_skip + 1)])`); aux['pooler_output'] the pooled state;
WithProjection adds aux['text_embeds'] (SDXL's pooled prompt embedding).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS = ('quick_gelu', 'gelu', 'gelu_new', 'gelu_pytorch_tanh')


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """A CLIP text encoder; field names and defaults are transformers' CLIPTextConfig (text_encoder/config.json).

    Attributes:
      vocab_size: token embedding rows (49408 for every SD text encoder).
      hidden_size: model width (SD1: 768, SD2 / SDXL text_encoder_2: 1024 / 1280).
      intermediate_size: MLP hidden width.
      projection_dim: output width of text_projection (CLIPTextModelWithProjection only).
      num_hidden_layers: transformer blocks.
      num_attention_heads: heads; head_dim = hidden_size // num_attention_heads.
      max_position_embeddings: learned positions (77).
      hidden_act: MLP activation: 'quick_gelu' (x * sigmoid(1.702 x), OpenAI CLIP: SD1, SDXL text_encoder),
        'gelu' (exact erf GELU, OpenCLIP: SD2, SDXL text_encoder_2), 'gelu_new' / 'gelu_pytorch_tanh' (tanh).
      layer_norm_eps: LayerNorm epsilon.
      eos_token_id: end token id for the pooled output; 2 selects the legacy argmax(input_ids) rule.
      dtype: compute dtype (activations); LayerNorm statistics and softmax are float32 regardless.
      param_dtype: parameter dtype.
    """
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = 'quick_gelu'
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    dtype: str = 'float32'
    param_dtype: str = 'float32'

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f'hidden_size {self.hidden_size} is not a multiple of num_attention_heads '
                             f'{self.num_attention_heads}')
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f'hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}')

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def _act(name: str, x: jax.Array) -> jax.Array:
    if name == 'quick_gelu':
        return x * jax.nn.sigmoid(1.702 * x)
    if name == 'gelu':
        return jax.nn.gelu(x, approximate=False)
    return jax.nn.gelu(x, approximate=True)  # gelu_new / gelu_pytorch_tanh


def _dense(features: int, names: tuple, cfg: CLIPTextConfig, name: str, use_bias: bool = True) -> nn.Dense:
    init = nn.initializers.normal(0.02)
    return nn.Dense(features, use_bias=use_bias, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                    name=name,
                    kernel_init=nn.with_logical_partitioning(init, names),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[-1:]))


def _layer_norm(cfg: CLIPTextConfig, name: str) -> nn.LayerNorm:
    # Flax LayerNorm computes its statistics in float32 for low-precision inputs.
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                        name=name,
                        use_fast_variance=False,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('norm',)))


class CLIPAttention(nn.Module):
    """Multi-head self-attention with separate biased q/k/v/out projections."""
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.config
        b, t, _ = x.shape
        heads, hd = cfg.num_attention_heads, cfg.head_dim

        def proj(name):
            y = _dense(cfg.hidden_size, ('embed', 'heads'), cfg, name)(x)
            y = y.reshape(b, t, heads, hd)  # [batch, seq, heads, head_dim]
            return nn.with_logical_constraint(y, ('act_batch', 'act_length', 'act_heads', 'act_head_dim'))

        q, k, v = proj('q_proj'), proj('k_proj'), proj('v_proj')
        logits = jnp.einsum('bqhd,bkhd->bhqk', q, k,
                            preferred_element_type=jnp.float32) * hd ** -0.5  # [batch, heads, q, k]
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum('bhqk,bkhd->bqhd', probs, v)  # [batch, seq, heads, head_dim]
        out = out.reshape(b, t, heads * hd)  # [batch, seq, hidden]
        return _dense(cfg.hidden_size, ('heads', 'embed'), cfg, 'out_proj')(out)


class CLIPMLP(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = _dense(cfg.intermediate_size, ('embed', 'mlp'), cfg, 'fc1')(x)
        h = nn.with_logical_constraint(_act(cfg.hidden_act, h), ('act_batch', 'act_length', 'act_mlp'))
        return _dense(cfg.hidden_size, ('mlp', 'embed'), cfg, 'fc2')(h)


class CLIPEncoderLayer(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.config
        act = ('act_batch', 'act_length', 'act_embed')
        h = CLIPAttention(cfg, name='self_attn')(_layer_norm(cfg, 'layer_norm1')(x), mask)
        x = nn.with_logical_constraint(x + h, act)
        x = nn.with_logical_constraint(x + CLIPMLP(cfg, name='mlp')(_layer_norm(cfg, 'layer_norm2')(x)), act)
        return x


class CLIPEncoder(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        hidden = [x]
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(self.config, name=f'layers_{i}')(x, mask)
            hidden.append(x)
        return x, tuple(hidden)


class CLIPEmbeddings(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, position_ids: jax.Array) -> jax.Array:
        cfg = self.config
        init = nn.initializers.normal(0.02)
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        tok = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=pdt,
                       embedding_init=nn.with_logical_partitioning(init, ('vocab', 'embed')),
                       name='token_embedding')(input_ids)
        pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dt, param_dtype=pdt,
                       embedding_init=nn.with_logical_partitioning(init, (None, 'embed')),
                       name='position_embedding')(position_ids)
        return tok + pos  # [batch, seq, hidden]


class CLIPTextTransformer(nn.Module):
    """The `text_model` of transformers' CLIPTextModel: embeddings, encoder, final LayerNorm, pooling."""
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None) -> tuple[jax.Array, dict]:
        cfg = self.config
        b, t = input_ids.shape
        if t > cfg.max_position_embeddings:
            raise ValueError(f'sequence length {t} > max_position_embeddings {cfg.max_position_embeddings}')
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(t), (b, t))
        x = CLIPEmbeddings(cfg, name='embeddings')(input_ids, position_ids)
        x = nn.with_logical_constraint(x, ('act_batch', 'act_length', 'act_embed'))
        # Causal mask; padding keys (attention_mask == 0) are masked as well when a mask is given.
        mask = jnp.tril(jnp.ones((t, t), bool))[None, None]  # [1, 1, q, k]
        if attention_mask is not None:
            mask = mask & (attention_mask[:, None, None, :] != 0)  # [batch, 1, q, k]
        x, hidden = CLIPEncoder(cfg, name='encoder')(x, mask)
        last = _layer_norm(cfg, 'final_layer_norm')(x)
        if cfg.eos_token_id == 2:
            # Legacy configs: the end token is the largest id (first occurrence on ties, like torch.argmax).
            eos_pos = jnp.argmax(input_ids, axis=-1)
        else:
            eos_pos = jnp.argmax((input_ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(last, eos_pos[:, None, None], axis=1)[:, 0]  # [batch, hidden]
        return last, {'hidden_states': hidden, 'pooler_output': pooled}


class CLIPTextModel(nn.Module):
    """transformers' CLIPTextModel (SD1/SD2 text_encoder, SDXL text_encoder). Returns (last_hidden_state, aux)."""
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None) -> tuple[jax.Array, dict]:
        return CLIPTextTransformer(self.config, name='text_model')(input_ids, attention_mask, position_ids)


class CLIPTextModelWithProjection(nn.Module):
    """transformers' CLIPTextModelWithProjection (SDXL text_encoder_2): aux['text_embeds'] = pooled @ projection."""
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None) -> tuple[jax.Array, dict]:
        cfg = self.config
        last, aux = CLIPTextTransformer(cfg, name='text_model')(input_ids, attention_mask, position_ids)
        aux['text_embeds'] = _dense(cfg.projection_dim, ('embed', None), cfg, 'text_projection',
                                    use_bias=False)(aux['pooler_output'])
        return last, aux


def apply_final_layer_norm(params, cfg: CLIPTextConfig, hidden: jax.Array) -> jax.Array:
    """The encoder's final LayerNorm applied to any of aux['hidden_states'] (diffusers' `clip_skip` for SD1:
    hidden_states[-(clip_skip + 1)] then final_layer_norm). `params`: the model's params (with or without
    the 'params' wrapper)."""
    params = params.get('params', params)
    ln = _layer_norm(cfg, None)
    return ln.apply({'params': params['text_model']['final_layer_norm']}, hidden)
