"""diffusers UNet2DConditionModel <-> mosaicjax UNet: config dicts and (pure numpy) weights, both directions, exact.

Names: a diffusers key's list indices join the list's name with '_' and the leaf is renamed by kind:
  down_blocks.0.resnets.1.conv1.weight  [O, I, kh, kw]   down_blocks_0/resnets_1/conv1/kernel  [kh, kw, I, O]
  ...attentions.0.transformer_blocks.0.attn1.to_q.weight [O, I]   .../attn1/to_q/kernel  [I, O]
  ...attn1.to_out.0.weight / .bias                                 .../attn1/to_out_0/kernel / bias
  ...ff.net.0.proj.weight, ff.net.2.weight                         .../ff/net_0/proj/kernel, ff/net_2/kernel
  ...norm1.weight / conv_norm_out.weight (GroupNorm, LayerNorm)    .../norm1/scale, conv_norm_out/scale
  time_embedding.linear_1.weight, add_embedding.linear_2.weight   time_embedding/linear_1/kernel, ...
  conv_in, conv_out, mid_block.resnets.0..., up_blocks.0.upsamplers.0.conv, down_blocks.0.downsamplers.0.conv
Only the list modules below take an index ('linear_1' is a name, not linear[1]), which makes the mapping a
bijection. Kind of a 'weight': 4-D -> conv (HWIO transpose), 2-D -> dense (transpose), 1-D -> norm scale.
Every import is checked against the parameter shapes our model builds for the config: a missing, unexpected
or mis-shaped tensor is an error, never a silent skip. Param trees here are the contents of the 'params'
collection (a {'params': ...} wrapper and flax partitioning boxes are accepted on input).
"""
from __future__ import annotations

import logging
import re
from typing import Any, Mapping

import flax.linen as nn
import numpy as np
from flax import traverse_util

from mosaicjax.models.unet import UNetConfig, param_shapes

# diffusers modules that are nn.ModuleLists (an index follows them in a key).
_LIST_MODULES = ('down_blocks', 'up_blocks', 'resnets', 'attentions', 'downsamplers', 'upsamplers',
                 'transformer_blocks', 'to_out', 'net')
_INDEXED = re.compile(r'^(%s)_(\d+)$' % '|'.join(_LIST_MODULES))

# config.json keys we read into UNetConfig (same names).
_CONFIG_KEYS = tuple(f for f in UNetConfig.__dataclass_fields__
                     if f not in ('dtype', 'param_dtype', 'remat', 'attention_impl'))
# Keys whose value must be the diffusers default for the model to mean what we compute.
_MUST_BE_DEFAULT = {
    'encoder_hid_dim': None, 'encoder_hid_dim_type': None, 'num_class_embeds': None,
    'class_embeddings_concat': False, 'time_embedding_act_fn': None, 'timestep_post_act': None,
    'time_cond_proj_dim': None, 'attention_type': 'default', 'cross_attention_norm': None,
}
# Keys that do not affect the blocks we build: CrossAttn/Down/Up blocks and UNetMidBlock2DCrossAttn never
# receive them (or, for dropout, inference is deterministic).
_IGNORED = ('resnet_skip_time_act', 'resnet_out_scale_factor', 'mid_block_only_cross_attention',
            'addition_embed_type_num_heads', 'dropout')


# ----------------------------------------------------------------------------------------------------------
# Config


def unet_config_from_diffusers(d: Mapping[str, Any], **overrides) -> UNetConfig:
    """UNetConfig from a diffusers unet/config.json dict; `overrides` set any field (dtype, remat, ...)."""
    for k, default in _MUST_BE_DEFAULT.items():
        if d.get(k, default) != default:
            raise ValueError(f'unsupported UNet config: {k}={d[k]!r} (only {default!r} is implemented)')
    cls = d.get('_class_name', 'UNet2DConditionModel')
    if cls != 'UNet2DConditionModel':
        raise ValueError(f'expected a UNet2DConditionModel config, got _class_name={cls!r}')
    unknown = sorted(k for k in d if not k.startswith('_') and k not in _CONFIG_KEYS
                     and k not in _MUST_BE_DEFAULT and k not in _IGNORED)
    if unknown:
        logging.warning('ignoring unknown diffusers UNet config keys: %s', unknown)
    fields = {k: d[k] for k in _CONFIG_KEYS if k in d}
    fields.update(overrides)
    return UNetConfig(**fields)


def _jsonable(v):
    return [_jsonable(x) for x in v] if isinstance(v, tuple) else v


def unet_config_to_diffusers(cfg: UNetConfig) -> dict:
    """diffusers unet/config.json dict for `cfg` (loads with UNet2DConditionModel.from_config)."""
    d = {'_class_name': 'UNet2DConditionModel'}
    d.update({k: _jsonable(getattr(cfg, k)) for k in _CONFIG_KEYS})
    if d['num_attention_heads'] is None:
        del d['num_attention_heads']  # diffusers 0.x rejects an explicit num_attention_heads
    return d


# ----------------------------------------------------------------------------------------------------------
# Names


def flax_path(key: str, ndim: int) -> tuple[str, ...]:
    """diffusers state-dict key (+ the tensor's ndim) -> our parameter path."""
    *mods, leaf = key.split('.')
    path, i = [], 0
    while i < len(mods):
        if mods[i] in _LIST_MODULES and i + 1 < len(mods) and mods[i + 1].isdigit():
            path.append(f'{mods[i]}_{mods[i + 1]}')
            i += 2
        else:
            path.append(mods[i])
            i += 1
    if leaf == 'weight':
        leaf = 'scale' if ndim == 1 else 'kernel'
    elif leaf != 'bias':
        raise ValueError(f'unexpected diffusers UNet parameter {key!r}')
    return tuple(path) + (leaf,)


def diffusers_key(path: tuple[str, ...]) -> str:
    """Our parameter path -> diffusers state-dict key."""
    *mods, leaf = path
    parts = []
    for m in mods:
        match = _INDEXED.match(m)
        parts.extend([match.group(1), match.group(2)] if match else [m])
    parts.append('bias' if leaf == 'bias' else 'weight')
    return '.'.join(parts)


def _to_numpy(v) -> np.ndarray:
    if hasattr(v, 'detach'):  # a torch tensor; bf16 has no numpy dtype, so go through float32
        v = v.detach().cpu()
        if str(v.dtype) == 'torch.bfloat16':
            v = v.float()
        return v.numpy()
    return np.asarray(v)


def _flax_layout(a: np.ndarray) -> np.ndarray:
    if a.ndim == 4:  # conv [out, in, kh, kw] -> [kh, kw, in, out]
        return np.ascontiguousarray(a.transpose(2, 3, 1, 0))
    if a.ndim == 2:  # dense [out, in] -> [in, out]
        return np.ascontiguousarray(a.T)
    return a


def _torch_layout(a: np.ndarray) -> np.ndarray:
    if a.ndim == 4:  # [kh, kw, in, out] -> [out, in, kh, kw]
        return np.ascontiguousarray(a.transpose(3, 2, 0, 1))
    if a.ndim == 2:
        return np.ascontiguousarray(a.T)
    return a


# ----------------------------------------------------------------------------------------------------------
# Weights


def params_from_diffusers(state_dict: Mapping[str, Any], cfg: UNetConfig, *, dtype=None) -> dict:
    """diffusers UNet state dict (numpy arrays or torch tensors) -> our nested param dict of numpy arrays.

    Checked against the shapes our model builds for `cfg`. `dtype` casts every array (default: keep).
    """
    expected = traverse_util.flatten_dict(param_shapes(cfg))
    flat, problems = {}, []
    for key, value in state_dict.items():
        a = _to_numpy(value)
        path = flax_path(key, a.ndim)
        if path not in expected:
            problems.append(f'unexpected {key} {tuple(a.shape)}')
            continue
        a = _flax_layout(a)
        if a.shape != tuple(expected[path].shape):
            problems.append(f'{key}: shape {a.shape} (our layout) != expected {tuple(expected[path].shape)}')
            continue
        flat[path] = a.astype(dtype) if dtype is not None else a
    problems += [f'missing {diffusers_key(p)} (ours {"/".join(p)})' for p in expected if p not in flat]
    if problems:
        raise ValueError(f'diffusers UNet weights do not match the config ({len(problems)} problems):\n  '
                         + '\n  '.join(problems[:50]))
    return traverse_util.unflatten_dict(flat)


def params_to_diffusers(params: Mapping[str, Any], *, dtype=None) -> dict[str, np.ndarray]:
    """Our param tree -> diffusers state dict {key: numpy array} (torch layouts)."""
    params = nn.meta.unbox(params)
    if set(params) == {'params'}:
        params = params['params']
    out = {}
    for path, v in traverse_util.flatten_dict(dict(params)).items():
        a = _torch_layout(np.asarray(v))
        out[diffusers_key(path)] = a.astype(dtype) if dtype is not None else a
    return out


def diffusers_shapes(cfg: UNetConfig) -> dict[str, tuple[int, ...]]:
    """The diffusers state-dict keys and shapes a checkpoint for `cfg` has (no memory)."""
    def torch_shape(shape):
        if len(shape) == 4:  # [kh, kw, in, out] -> [out, in, kh, kw]
            return (shape[3], shape[2], shape[0], shape[1])
        return tuple(reversed(shape))  # dense [in, out] -> [out, in]; 1-D unchanged
    flat = traverse_util.flatten_dict(param_shapes(cfg))
    return {diffusers_key(p): torch_shape(tuple(s.shape)) for p, s in flat.items()}
