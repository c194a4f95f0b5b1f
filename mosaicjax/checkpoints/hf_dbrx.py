"""Hugging Face DBRX <-> mosaicjax: config dicts and (pure numpy) weight mapping, both directions, exact.

Weights (HF torch Linear stores [out, in]; our Flax kernels are [in, out]):
  transformer.wte.weight                                  [V, d]        wte/embedding            (same)
  transformer.blocks.{i}.norm_attn_norm.norm_1.weight     [d]           blocks/norm_1/scale      (same)
  transformer.blocks.{i}.norm_attn_norm.attn.Wqkv.weight  [qkv, d]      blocks/attn/Wqkv/kernel  (.T)
  transformer.blocks.{i}.norm_attn_norm.attn.out_proj.weight [d, d]     blocks/attn/out_proj/kernel (.T)
  transformer.blocks.{i}.norm_attn_norm.norm_2.weight     [d]           blocks/norm_2/scale      (same)
  transformer.blocks.{i}.ffn.router.layer.weight          [E, d]        blocks/router/kernel     (.T)
  transformer.blocks.{i}.ffn.experts.mlp.{w1,v1,w2}       [E*ffn, d]    blocks/experts/{w1,v1,w2} (same)
  transformer.norm_f.weight                               [d]           norm_f/scale             (same)
  lm_head.weight                                          [V, d]        lm_head/kernel           (.T)
Block params are stacked on a leading layer axis ('blocks') when cfg.scan_layers, else blocks_{i}.
Our param trees here are the contents of the 'params' collection (no 'params' wrapper, no flax boxes);
both are accepted on input.

Config: the published config.json nests attn_config / ffn_config. RoPE's base is attn_config.rope_theta
(the checkpoint's meaning); transformers 5 reads `rope_parameters` instead, so we accept that as a fallback
and write both on export.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from mosaicjax.models.dbrx import DbrxConfig

# transformers' DbrxConfig defaults, for keys a config.json leaves out.
_HF_DEFAULTS = dict(d_model=2048, n_heads=16, n_layers=24, max_seq_len=2048, vocab_size=32000,
                    initializer_range=0.02)
_HF_ATTN_DEFAULTS = dict(clip_qkv=None, kv_n_heads=1, rope_theta=10000.0)
_HF_FFN_DEFAULTS = dict(ffn_hidden_size=3584, moe_num_experts=4, moe_top_k=1, moe_jitter_eps=None,
                        moe_loss_weight=0.01, moe_normalize_expert_weights=1.0)


def _rope_theta(hf: Mapping[str, Any], attn: Mapping[str, Any]) -> float:
    rope = hf.get('rope_parameters') or attn.get('rope_parameters') or {}
    scaling = hf.get('rope_scaling') or attn.get('rope_scaling')
    if rope.get('rope_type', 'default') != 'default' or scaling:
        raise ValueError(f'only default RoPE is supported, got rope_parameters={rope} rope_scaling={scaling}')
    for theta in (attn.get('rope_theta'), rope.get('rope_theta'), hf.get('rope_theta')):
        if theta is not None:
            return float(theta)
    return _HF_ATTN_DEFAULTS['rope_theta']


def config_from_hf(hf: Mapping[str, Any], **overrides) -> DbrxConfig:
    """DbrxConfig from a HF DBRX config dict; `overrides` set any field (e.g. dtype, moe_dispatch)."""
    attn = dict(hf.get('attn_config') or {})
    ffn = dict(hf.get('ffn_config') or {})
    act = (ffn.get('ffn_act_fn') or {'name': 'silu'}).get('name', 'silu')
    if act != 'silu':
        raise ValueError(f'only SiLU-GLU experts are supported, got ffn_act_fn={act!r}')
    if ffn.get('uniform_expert_assignment'):
        raise ValueError('uniform_expert_assignment=True is not supported')
    if hf.get('tie_word_embeddings'):
        raise ValueError('DBRX does not tie embeddings (tie_word_embeddings=True)')
    fields = {k: hf.get(k, v) for k, v in _HF_DEFAULTS.items()}
    fields.update({k: attn.get(k, v) for k, v in _HF_ATTN_DEFAULTS.items()})
    fields.update({k: ffn.get(k, v) for k, v in _HF_FFN_DEFAULTS.items()})
    fields['rope_theta'] = _rope_theta(hf, attn)
    for k in ('clip_qkv', 'moe_jitter_eps', 'moe_normalize_expert_weights'):
        if fields[k] is not None:
            fields[k] = float(fields[k])
    fields.update(overrides)
    return DbrxConfig(**fields)


def config_to_hf(cfg: DbrxConfig) -> dict:
    """HF config.json dict for `cfg` (loads in transformers 4.x and 5.x with the same RoPE base)."""
    return {
        'architectures': ['DbrxForCausalLM'],
        'model_type': 'dbrx',
        'd_model': cfg.d_model,
        'n_heads': cfg.n_heads,
        'n_layers': cfg.n_layers,
        'max_seq_len': cfg.max_seq_len,
        'vocab_size': cfg.vocab_size,
        'resid_pdrop': 0.0,
        'emb_pdrop': 0.0,
        'initializer_range': cfg.initializer_range,
        'tie_word_embeddings': False,
        'use_cache': True,
        'output_router_logits': False,
        'router_aux_loss_coef': cfg.moe_loss_weight,
        'torch_dtype': cfg.param_dtype,
        'attn_config': {
            'attn_pdrop': 0.0,
            'clip_qkv': cfg.clip_qkv,
            'kv_n_heads': cfg.kv_n_heads,
            'rope_theta': cfg.rope_theta,
        },
        'ffn_config': {
            'ffn_act_fn': {'name': 'silu'},
            'ffn_hidden_size': cfg.ffn_hidden_size,
            'moe_num_experts': cfg.moe_num_experts,
            'moe_top_k': cfg.moe_top_k,
            'moe_jitter_eps': cfg.moe_jitter_eps,
            'moe_loss_weight': cfg.moe_loss_weight,
            'moe_normalize_expert_weights': cfg.moe_normalize_expert_weights,
        },
        # transformers >= 5 takes the RoPE base from here and ignores attn_config.rope_theta.
        'rope_parameters': {'rope_type': 'default', 'rope_theta': cfg.rope_theta},
    }


# ----------------------------------------------------------------------------------------------------------
# Weights

_BLOCK = 'transformer.blocks.{i}.'
# (HF suffix under a block, our path under the block, transpose?)
_BLOCK_MAP = (
    ('norm_attn_norm.norm_1.weight', ('norm_1', 'scale'), False),
    ('norm_attn_norm.attn.Wqkv.weight', ('attn', 'Wqkv', 'kernel'), True),
    ('norm_attn_norm.attn.out_proj.weight', ('attn', 'out_proj', 'kernel'), True),
    ('norm_attn_norm.norm_2.weight', ('norm_2', 'scale'), False),
    ('ffn.router.layer.weight', ('router', 'kernel'), True),
    ('ffn.experts.mlp.w1', ('experts', 'w1'), False),
    ('ffn.experts.mlp.v1', ('experts', 'v1'), False),
    ('ffn.experts.mlp.w2', ('experts', 'w2'), False),
)
_TOP_MAP = (
    ('transformer.wte.weight', ('wte', 'embedding'), False),
    ('transformer.norm_f.weight', ('norm_f', 'scale'), False),
    ('lm_head.weight', ('lm_head', 'kernel'), True),
)
# Non-persistent buffers some exports carry; they hold no weights.
_IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)


def _np_dtype(name):
    if name == 'bfloat16':
        import ml_dtypes  # pylint: disable=import-outside-toplevel
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _to_numpy(x) -> np.ndarray:
    """numpy view of a numpy/jax array, a flax box, or a torch tensor (bf16 tensors become float32)."""
    if hasattr(x, 'unbox'):  # flax LogicallyPartitioned and friends
        x = x.unbox()
    if hasattr(x, 'detach'):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) == 'torch.bfloat16':
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def hf_shapes(cfg: DbrxConfig) -> dict[str, tuple[int, ...]]:
    """Expected shape of every HF state-dict entry for `cfg`."""
    d, v, e, f = cfg.d_model, cfg.vocab_size, cfg.moe_num_experts, cfg.ffn_hidden_size
    qkv = (cfg.n_heads + 2 * cfg.kv_n_heads) * cfg.head_dim
    block = {'norm_attn_norm.norm_1.weight': (d,), 'norm_attn_norm.attn.Wqkv.weight': (qkv, d),
             'norm_attn_norm.attn.out_proj.weight': (d, d), 'norm_attn_norm.norm_2.weight': (d,),
             'ffn.router.layer.weight': (e, d), 'ffn.experts.mlp.w1': (e * f, d),
             'ffn.experts.mlp.v1': (e * f, d), 'ffn.experts.mlp.w2': (e * f, d)}
    shapes = {'transformer.wte.weight': (v, d), 'transformer.norm_f.weight': (d,), 'lm_head.weight': (v, d)}
    for i in range(cfg.n_layers):
        shapes.update({_BLOCK.format(i=i) + k: s for k, s in block.items()})
    return shapes


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


def params_from_hf(state_dict: Mapping[str, Any], cfg: DbrxConfig, *, dtype: str | None = None) -> dict:
    """HF DBRX state dict -> our param tree (numpy, cfg.param_dtype unless `dtype`); validates names/shapes."""
    out_dtype = _np_dtype(dtype or cfg.param_dtype)
    expected = hf_shapes(cfg)
    sd = {k: v for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIXES)}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(f'HF DBRX state dict does not match the config: missing={missing[:8]} '
                         f'({len(missing)}), unexpected={unexpected[:8]} ({len(unexpected)})')
    arrays = {}
    for k, shape in expected.items():
        a = _to_numpy(sd[k])
        if a.shape != shape:
            raise ValueError(f'{k}: shape {a.shape}, expected {shape} for this config')
        arrays[k] = a

    def conv(a, transpose):
        return np.ascontiguousarray(a.T if transpose else a).astype(out_dtype)

    params: dict = {}
    for hf_key, path, tr in _TOP_MAP:
        _set(params, path, conv(arrays[hf_key], tr))
    for suffix, path, tr in _BLOCK_MAP:
        per_layer = [conv(arrays[_BLOCK.format(i=i) + suffix], tr) for i in range(cfg.n_layers)]
        if cfg.scan_layers:
            _set(params, ('blocks',) + path, np.stack(per_layer))  # [L, ...]
        else:
            for i, a in enumerate(per_layer):
                _set(params, (f'blocks_{i}',) + path, a)
    return params


def params_to_hf(params: Mapping, cfg: DbrxConfig, *, dtype: str | None = None) -> dict[str, np.ndarray]:
    """Our param tree -> HF DBRX state dict of numpy arrays (arrays keep their dtype unless `dtype` is given).

    The layer layout is read from the tree itself ('blocks' stacked, or blocks_0..), whatever cfg.scan_layers says.
    """
    if 'params' in params and 'wte' not in params:
        params = params['params']
    stacked_layout = 'blocks' in params
    out_dtype = None if dtype is None else _np_dtype(dtype)

    def conv(x, transpose):
        a = _to_numpy(x)
        a = np.ascontiguousarray(a.T if transpose else a)
        return a if out_dtype is None else a.astype(out_dtype)

    sd = {}
    for hf_key, path, tr in _TOP_MAP:
        sd[hf_key] = conv(_get(params, path), tr)
    for suffix, path, tr in _BLOCK_MAP:
        if stacked_layout:
            stacked = _to_numpy(_get(params, ('blocks',) + path))  # [L, ...]
            layer_arrays = [stacked[i] for i in range(cfg.n_layers)]
        else:
            layer_arrays = [_get(params, (f'blocks_{i}',) + path) for i in range(cfg.n_layers)]
        for i, a in enumerate(layer_arrays):
            sd[_BLOCK.format(i=i) + suffix] = conv(a, tr)
    expected = hf_shapes(cfg)
    for k, a in sd.items():
        if a.shape != expected[k]:
            raise ValueError(f'{k}: shape {a.shape}, expected {expected[k]}: params do not match the config')
    return sd
