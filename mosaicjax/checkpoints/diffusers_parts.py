"""diffusers / transformers state dicts <-> mosaicjax param trees for the CLIP text encoders and the VAE.

Pure numpy, exact both ways (float32 in, float32 out; other dtypes are kept). Our trees are the contents of the
'params' collection (no 'params' wrapper, no Flax boxes; both are accepted on input) as nested dicts.

Names follow the reference modules one to one: a dotted key's list indices fold into the preceding name
(`encoder.layers.3.mlp.fc1.weight` -> `encoder/layers_3/mlp/fc1/...`, `to_out.0` -> `to_out_0`), and the leaf is
renamed and laid out by the kind of module:
  torch Linear weight [out, in]          -> kernel [in, out]              (.T)
  torch Conv2d weight [out, in, kh, kw]  -> kernel [kh, kw, in, out]      (NCHW -> NHWC: transpose(2, 3, 1, 0))
  Embedding weight [n, d]                -> embedding [n, d]
  LayerNorm / GroupNorm weight [d]       -> scale [d]
  bias                                   -> bias
CLIP (transformers CLIPTextModel / CLIPTextModelWithProjection, text_encoder*/model.safetensors):
  text_model.embeddings.{token,position}_embedding.weight, text_model.encoder.layers.{i}.{layer_norm1,
  self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1, mlp.fc2}.*, text_model.final_layer_norm.*,
  text_projection.weight (with projection). text_model.embeddings.position_ids (a buffer) is ignored.
VAE (diffusers AutoencoderKL, vae/diffusion_pytorch_model.safetensors): encoder.*, decoder.*, quant_conv.*,
  post_quant_conv.*. Old checkpoints name the mid-block attention query/key/value/proj_attn (sometimes as 1x1
  convs [C, C, 1, 1]); they load as to_q/to_k/to_v/to_out.0, and export writes the current names.

Config readers take the component's config.json (a dict or a path to the file or its folder).
"""
from __future__ import annotations

import functools
import json
import os
import re
import struct
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mosaicjax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from mosaicjax.models.vae import AutoencoderKL, VAEConfig

# ------------------------------------------------------------------------------------------------ safetensors

_ST_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'I64': np.int64, 'I32': np.int32,
              'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_}


def _read_safetensors_raw(path: str) -> dict[str, np.ndarray]:
    """The safetensors format by hand (8-byte header length, JSON header, raw little-endian data), for the
    dtypes numpy lacks (BF16 via ml_dtypes)."""
    import ml_dtypes
    with open(path, 'rb') as f:
        (n,) = struct.unpack('<Q', f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for key, info in header.items():
        if key == '__metadata__':
            continue
        dt = ml_dtypes.bfloat16 if info['dtype'] == 'BF16' else _ST_DTYPES[info['dtype']]
        start, end = info['data_offsets']
        out[key] = np.frombuffer(data[start:end], dtype=dt).reshape(info['shape']).copy()
    return out


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """State dict from a .safetensors file, a sharded checkpoint's *.safetensors.index.json, or a component
    folder holding one of model.safetensors / diffusion_pytorch_model.safetensors (or their index). No pickle."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ('model.safetensors', 'diffusion_pytorch_model.safetensors'):
            for cand in (name, name + '.index.json'):
                if os.path.isfile(os.path.join(path, cand)):
                    return load_safetensors(os.path.join(path, cand))
        raise FileNotFoundError(f'{path}: no model.safetensors or diffusion_pytorch_model.safetensors')
    if path.endswith('.index.json'):
        with open(path) as f:
            shards = sorted(set(json.load(f)['weight_map'].values()))
        out: dict[str, np.ndarray] = {}
        for shard in shards:
            out.update(load_safetensors(os.path.join(os.path.dirname(path), shard)))
        return out
    from safetensors.numpy import load_file
    try:
        return dict(load_file(path))
    except TypeError:  # bfloat16: numpy has no such dtype; safetensors.numpy refuses it
        return _read_safetensors_raw(path)


def _read_config(config: Mapping[str, Any] | str | os.PathLike) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    path = os.fspath(config)
    if os.path.isdir(path):
        path = os.path.join(path, 'config.json')
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------- tree helpers

def _unwrap(params) -> dict:
    """Accepts {'params': tree} or tree, boxed (nn.Partitioned) or not; returns a plain nested dict."""
    params = nn.unbox(params)
    if isinstance(params, Mapping) and set(params) == {'params'}:
        params = params['params']
    return params


def _key_to_path(key: str) -> list[str]:
    """'a.layers.3.fc1' -> ['a', 'layers_3', 'fc1']: list indices fold into the list's name."""
    out: list[str] = []
    for part in key.split('.'):
        if part.isdigit() and out:
            out[-1] = f'{out[-1]}_{part}'
        else:
            out.append(part)
    return out


_INDEXED = re.compile(r'^(.*)_(\d+)$')


def _path_to_key(path: list[str]) -> str:
    parts = []
    for p in path:
        m = _INDEXED.match(p)
        parts.append(f'{m.group(1)}.{m.group(2)}' if m else p)
    return '.'.join(parts)


def _set(tree: dict, path: list[str], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    if path[-1] in tree:
        raise ValueError(f'duplicate parameter {"/".join(path)}')
    tree[path[-1]] = value


def _flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _to_numpy(x) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def _weight_to_flax(module: str, w: np.ndarray) -> tuple[str, np.ndarray]:
    """Leaf name and layout of a torch `weight` by the module kind."""
    if module.endswith('embedding'):
        return 'embedding', w
    if w.ndim == 1:  # LayerNorm / GroupNorm
        return 'scale', w
    if w.ndim == 2:  # Linear [out, in]
        return 'kernel', w.T
    if w.ndim == 4:  # Conv2d [out, in, kh, kw]
        return 'kernel', w.transpose(2, 3, 1, 0)
    raise ValueError(f'{module}.weight: unexpected rank {w.ndim}')


def _weight_to_torch(leaf: str, w: np.ndarray) -> np.ndarray:
    if leaf == 'kernel':
        return w.T if w.ndim == 2 else w.transpose(3, 2, 0, 1)
    return w


def _check_shapes(params: dict, expected: dict, what: str) -> None:
    got, want = _flatten(params), _flatten(expected)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise ValueError(f'{what}: missing {["/".join(p) for p in missing][:8]} '
                         f'unexpected {["/".join(p) for p in extra][:8]}')
    for p, v in want.items():
        if tuple(got[p].shape) != tuple(v.shape):
            raise ValueError(f'{what}: {"/".join(p)} has shape {tuple(got[p].shape)}, expected {tuple(v.shape)}')


def _from_torch(sd: Mapping[str, np.ndarray], ignore=()) -> dict:
    tree: dict = {}
    for key, w in sd.items():
        if key in ignore:
            continue
        path = _key_to_path(key)
        w = np.asarray(w)
        if path[-1] == 'weight':
            leaf, w = _weight_to_flax(path[-2], w)
            path[-1] = leaf
        _set(tree, path, w)
    return tree


def _to_torch(params: Mapping) -> dict[str, np.ndarray]:
    sd = {}
    for path, w in _flatten(params).items():
        w = _to_numpy(w)
        leaf = path[-1]
        key = _path_to_key(list(path[:-1])) + '.' + ('bias' if leaf == 'bias' else 'weight')
        sd[key] = np.ascontiguousarray(_weight_to_torch(leaf, w))
    return sd


# ------------------------------------------------------------------------------------------------------ CLIP

_CLIP_FIELDS = ('vocab_size', 'hidden_size', 'intermediate_size', 'projection_dim', 'num_hidden_layers',
                'num_attention_heads', 'max_position_embeddings', 'hidden_act', 'layer_norm_eps', 'eos_token_id')


def clip_config_from_hf(config: Mapping[str, Any] | str | os.PathLike, **overrides) -> CLIPTextConfig:
    """CLIPTextConfig from a text_encoder/config.json (a CLIPConfig's text_config is accepted too).
    Missing keys take transformers' defaults; `overrides` set any field (e.g. dtype)."""
    hf = _read_config(config)
    if 'text_config' in hf and 'hidden_size' not in hf:
        hf = dict(hf['text_config'], projection_dim=hf.get('projection_dim', hf['text_config'].get('projection_dim')))
    fields = {k: hf[k] for k in _CLIP_FIELDS if hf.get(k) is not None}
    if isinstance(fields.get('eos_token_id'), (list, tuple)):
        fields['eos_token_id'] = fields['eos_token_id'][0]
    fields.update(overrides)
    return CLIPTextConfig(**fields)


def clip_config_to_hf(cfg: CLIPTextConfig, with_projection: bool = False) -> dict:
    """text_encoder/config.json dict for `cfg` (loads in transformers' CLIPTextModel[WithProjection])."""
    out = {f: getattr(cfg, f) for f in _CLIP_FIELDS}
    out.update(architectures=['CLIPTextModelWithProjection' if with_projection else 'CLIPTextModel'],
               model_type='clip_text_model', attention_dropout=0.0, dropout=0.0, initializer_factor=1.0,
               initializer_range=0.02, pad_token_id=1, bos_token_id=0 if cfg.eos_token_id == 2 else 49406,
               torch_dtype='float32')
    return out


def clip_model(cfg: CLIPTextConfig, with_projection: bool):
    """The Flax module for a text encoder: CLIPTextModelWithProjection (SDXL text_encoder_2) or CLIPTextModel."""
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def clip_param_shapes(cfg: CLIPTextConfig, with_projection: bool) -> dict:
    """Tree of jax.ShapeDtypeStruct of the model's params (no memory used)."""
    return jax.tree_util.tree_map(lambda x: x, _clip_param_shapes(cfg, with_projection))


@functools.lru_cache(maxsize=16)
def _clip_param_shapes(cfg: CLIPTextConfig, with_projection: bool) -> dict:
    ids = jnp.zeros((1, 1), jnp.int32)
    shapes = jax.eval_shape(clip_model(cfg, with_projection).init, jax.random.PRNGKey(0), ids)
    return nn.unbox(shapes)['params']


def clip_params_from_hf(sd: Mapping[str, np.ndarray], cfg: CLIPTextConfig,
                        with_projection: bool | None = None) -> dict:
    """Our CLIP param tree from a transformers CLIPTextModel[WithProjection] state dict.

    with_projection defaults to whether `text_projection.weight` is present. A full CLIPModel state dict works
    too: its vision tower, visual_projection and logit_scale are skipped.
    """
    if with_projection is None:
        with_projection = 'text_projection.weight' in sd
    # transformers 5 saves CLIPTextModel without the `text_model.` prefix (and loads both); Hub files have it.
    bare = ('embeddings.', 'encoder.', 'final_layer_norm.')
    sd = {('text_model.' + k if k.startswith(bare) else k): v for k, v in sd.items()}
    keep = {k: v for k, v in sd.items()
            if k.startswith('text_model.') or (with_projection and k == 'text_projection.weight')}
    if not any(k.startswith('text_model.') for k in keep):
        raise ValueError('no text_model.* keys: not a transformers CLIP text encoder state dict')
    params = _from_torch(keep, ignore=('text_model.embeddings.position_ids',))
    _check_shapes(params, clip_param_shapes(cfg, with_projection), 'CLIP text encoder')
    return params


def clip_params_to_hf(params, cfg: CLIPTextConfig) -> dict[str, np.ndarray]:
    """transformers state dict (numpy) from our CLIP params; includes text_projection.weight when present.

    Keys carry the `text_model.` prefix (the Hub layout, which transformers 4 needs and 5 accepts)."""
    params = _unwrap(params)
    _check_shapes(params, clip_param_shapes(cfg, 'text_projection' in params), 'CLIP text encoder')
    return _to_torch(params)


# ------------------------------------------------------------------------------------------------------- VAE

_VAE_FIELDS = ('in_channels', 'out_channels', 'down_block_types', 'up_block_types', 'block_out_channels',
               'layers_per_block', 'act_fn', 'latent_channels', 'norm_num_groups', 'sample_size', 'scaling_factor',
               'shift_factor', 'latents_mean', 'latents_std', 'force_upcast', 'use_quant_conv',
               'use_post_quant_conv', 'mid_block_add_attention')


def vae_config_from_diffusers(config: Mapping[str, Any] | str | os.PathLike, **overrides) -> VAEConfig:
    """VAEConfig from vae/config.json (diffusers AutoencoderKL); missing keys take diffusers' defaults."""
    d = _read_config(config)
    cls = d.get('_class_name', 'AutoencoderKL')
    if cls != 'AutoencoderKL':
        raise ValueError(f'only AutoencoderKL is supported, got {cls}')
    fields = {k: d[k] for k in _VAE_FIELDS if k in d}
    for k in ('down_block_types', 'up_block_types', 'block_out_channels', 'latents_mean', 'latents_std'):
        if fields.get(k) is not None:
            fields[k] = tuple(fields[k])
    if isinstance(fields.get('sample_size'), (list, tuple)):
        fields['sample_size'] = tuple(fields['sample_size'])
    fields.update(overrides)
    return VAEConfig(**fields)


def vae_config_to_diffusers(cfg: VAEConfig) -> dict:
    """vae/config.json dict for `cfg`."""
    out = {'_class_name': 'AutoencoderKL'}
    for k in _VAE_FIELDS:
        v = getattr(cfg, k)
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


def vae_param_shapes(cfg: VAEConfig) -> dict:
    """Tree of jax.ShapeDtypeStruct of the VAE's params (no memory used)."""
    return jax.tree_util.tree_map(lambda x: x, _vae_param_shapes(cfg))


@functools.lru_cache(maxsize=16)
def _vae_param_shapes(cfg: VAEConfig) -> dict:
    x = jnp.zeros((1, 8, 8, cfg.in_channels), jnp.float32)
    shapes = jax.eval_shape(AutoencoderKL(cfg).init, jax.random.PRNGKey(0), x)
    return nn.unbox(shapes)['params']


_LEGACY_ATTN = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v', 'proj_attn': 'to_out.0'}


def _modern_vae_key(key: str) -> str:
    m = re.match(r'^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$', key)
    return f'{m.group(1)}{_LEGACY_ATTN[m.group(2)]}.{m.group(3)}' if m else key


def vae_params_from_diffusers(sd: Mapping[str, np.ndarray], cfg: VAEConfig) -> dict:
    """Our VAE param tree from a diffusers AutoencoderKL state dict (legacy attention names accepted)."""
    modern = {}
    for k, v in sd.items():
        k2 = _modern_vae_key(k)
        v = np.asarray(v)
        if '.attentions.' in k2 and k2.endswith('.weight') and v.ndim == 4:  # 1x1-conv attention projections
            v = v[:, :, 0, 0]
        if k2 in modern:
            raise ValueError(f'{k} duplicates {k2}')
        modern[k2] = v
    params = _from_torch(modern)
    _check_shapes(params, vae_param_shapes(cfg), 'VAE')
    return params


def vae_params_to_diffusers(params, cfg: VAEConfig) -> dict[str, np.ndarray]:
    """diffusers AutoencoderKL state dict (numpy, current key names) from our VAE params."""
    params = _unwrap(params)
    _check_shapes(params, vae_param_shapes(cfg), 'VAE')
    return _to_torch(params)


# ------------------------------------------------------------------------------------------ component folders

def _cast(params: dict, dtype) -> dict:
    """Floating leaves to `dtype` (numpy; bfloat16 through ml_dtypes); others unchanged."""
    if dtype is None:
        return params
    dt = jnp.dtype(dtype)
    return jax.tree_util.tree_map(
        lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def load_clip_text_encoder(folder: str | os.PathLike, param_dtype: str | None = 'float32', **overrides):
    """(CLIPTextConfig, params, with_projection) from a text_encoder/ or text_encoder_2/ folder (config.json +
    model.safetensors or its sharded index). Weights are cast to `param_dtype` (None keeps the file's)."""
    hf = _read_config(folder)
    if param_dtype is not None:
        overrides.setdefault('param_dtype', param_dtype)
    cfg = clip_config_from_hf(hf, **overrides)
    sd = load_safetensors(folder)
    with_projection = 'text_projection.weight' in sd
    return cfg, _cast(clip_params_from_hf(sd, cfg, with_projection), param_dtype), with_projection


def save_clip_text_encoder(folder: str | os.PathLike, params, cfg: CLIPTextConfig) -> None:
    """Writes config.json + model.safetensors that transformers' from_pretrained (and load_clip_text_encoder)
    read back."""
    from safetensors.numpy import save_file
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    sd = clip_params_to_hf(params, cfg)
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump(clip_config_to_hf(cfg, with_projection='text_projection.weight' in sd), f, indent=2)
    save_file(sd, os.path.join(folder, 'model.safetensors'), metadata={'format': 'pt'})


def load_vae(folder: str | os.PathLike, param_dtype: str | None = 'float32', **overrides):
    """(VAEConfig, params) from a vae/ folder (config.json + diffusion_pytorch_model.safetensors)."""
    if param_dtype is not None:
        overrides.setdefault('param_dtype', param_dtype)
    cfg = vae_config_from_diffusers(folder, **overrides)
    return cfg, _cast(vae_params_from_diffusers(load_safetensors(folder), cfg), param_dtype)


def save_vae(folder: str | os.PathLike, params, cfg: VAEConfig) -> None:
    """Writes config.json + diffusion_pytorch_model.safetensors (diffusers' AutoencoderKL layout)."""
    from safetensors.numpy import save_file
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump(vae_config_to_diffusers(cfg), f, indent=2)
    save_file(vae_params_to_diffusers(params, cfg), os.path.join(folder, 'diffusion_pytorch_model.safetensors'),
              metadata={'format': 'pt'})
