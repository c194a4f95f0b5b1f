"""load_lm: a LanguageModel from a Hugging Face DBRX folder, a mosaicjax LM checkpoint or a training workdir.

Parameters are laid straight into their shardings on `mesh` (default: one device): the model's logical axis
names go through the rules table to NamedShardings, and every device shard of every parameter is read from the
files on its own. From a Hugging Face folder that means reading only the bytes of that shard (safetensors
slices), transposing [out, in] -> [in, out], casting, stacking the per-layer tensors into the scanned
[L, ...] layout, and copying it to its device(s) before the next shard is read. At most one device shard of
one parameter is in host memory at a time, never the whole checkpoint; each distinct shard is read once, even
when it is replicated on several devices.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable

import numpy as np

from mosaicjax.checkpoints import hf_dbrx
from mosaicjax.checkpoints import hf_folder
from mosaicjax.checkpoints import lm_checkpoint
from mosaicjax.checkpoints import safetensors_io


def detect_kind(path: str) -> str:
    """'mosaicjax' | 'workdir' | 'hf' | 'diffusers' | 'mosaicjax_image'; errors say what was looked for."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f'{path}: no such directory')
    meta = lm_checkpoint.read_meta(path)
    if meta is not None:
        return 'mosaicjax' if meta.get('kind') == 'lm' else f'mosaicjax_{meta.get("kind")}'
    if os.path.exists(os.path.join(path, 'config.gin')):
        return 'workdir'
    if os.path.exists(os.path.join(path, 'model_index.json')):
        return 'diffusers'
    if os.path.exists(os.path.join(path, 'config.json')):
        return 'hf'
    raise ValueError(f'{path} is not a model: expected a Hugging Face folder (config.json), a mosaicjax checkpoint '
                     f'({lm_checkpoint.META_NAME}) or a training workdir (config.gin + checkpoints/)')


def default_mesh():
    from mosaicjax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel
    return mesh_lib.make_mesh(mesh_lib.MeshConfig({'data': 1, 'fsdp': 1, 'expert': 1, 'tensor': 1}),
                              devices=jax.devices()[:1])


def param_shardings(cfg, mesh, rules) -> tuple[dict, dict]:
    """(abstract params, shardings) as flat {path tuple: ...} dicts, from the model's logical axis names."""
    import flax.linen as nn  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from flax import traverse_util  # pylint: disable=import-outside-toplevel

    from mosaicjax.models import dbrx  # pylint: disable=import-outside-toplevel
    from mosaicjax.parallel import rules as rules_lib  # pylint: disable=import-outside-toplevel
    model = dbrx.Dbrx(cfg)
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)))['params']
    shardings = rules_lib.logical_to_sharding(nn.get_partition_spec(boxed), mesh, rules)
    shapes = nn.unbox(boxed)
    return traverse_util.flatten_dict(shapes), traverse_util.flatten_dict(shardings)


def _unflatten(flat: dict) -> dict:
    from flax import traverse_util  # pylint: disable=import-outside-toplevel
    return traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------------------------------------
# Hugging Face folders


@dataclasses.dataclass(frozen=True)
class _Source:
    keys: tuple[str, ...]  # HF tensor per layer (stacked) or the one tensor
    stacked: bool  # our array has a leading [L] axis over `keys`
    transpose: bool  # HF [out, in] -> ours [in, out]


def _sources(cfg) -> dict[tuple[str, ...], _Source]:
    """Our parameter path -> the HF tensors it is made of (hf_dbrx's mapping tables)."""
    out = {}
    for hf_key, path, tr in hf_dbrx._TOP_MAP:  # pylint: disable=protected-access
        out[path] = _Source((hf_key,), False, tr)
    block = hf_dbrx._BLOCK  # pylint: disable=protected-access
    for suffix, path, tr in hf_dbrx._BLOCK_MAP:  # pylint: disable=protected-access
        keys = tuple(block.format(i=i) + suffix for i in range(cfg.n_layers))
        if cfg.scan_layers:
            out[('blocks',) + path] = _Source(keys, True, tr)
        else:
            for i, k in enumerate(keys):
                out[(f'blocks_{i}',) + path] = _Source((k,), False, tr)
    return out


def _read_block(reader, src: _Source, shape, index, dtype) -> np.ndarray:
    """The sub-block `index` (slices over our layout `shape`) of one parameter, read from the HF tensors."""
    index = tuple(slice(*s.indices(d)) for s, d in zip(index, shape))

    def read_one(key, inner):  # inner: slices over our per-layer layout
        full = all(s == slice(0, d, 1) for s, d in zip(inner, reader.shape(key)[::-1] if src.transpose
                                                        else reader.shape(key)))
        hf_index = None if full else (inner[::-1] if src.transpose else inner)
        a = reader.read(key, hf_index)  # HF layout, e.g. Wqkv [qkv_block, d_block]
        return a.T if src.transpose else a  # ours, e.g. [d_block, qkv_block]

    if not src.stacked:
        return np.ascontiguousarray(read_one(src.keys[0], index).astype(dtype, copy=False))
    layers = range(*index[0].indices(shape[0]))
    out = None
    for j, layer in enumerate(layers):
        a = read_one(src.keys[layer], index[1:])
        if out is None:  # filled layer by layer: one layer's temporaries on top of the block
            out = np.empty((len(layers),) + a.shape, dtype)  # [layers_block, ...per-layer block]
        out[j] = a  # casts on assignment
    return out


def _place(read: Callable[[tuple], np.ndarray], shape, sharding):
    """A global jax.Array on `sharding` whose device shards come from read(index), one distinct index at a time."""
    import jax  # pylint: disable=import-outside-toplevel
    groups: dict[tuple, tuple[tuple, list]] = {}
    for device, index in sharding.addressable_devices_indices_map(tuple(shape)).items():
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        key = tuple(s.indices(d) for s, d in zip(index, shape))
        groups.setdefault(key, (index, []))[1].append(device)
    arrays = []
    for index, devices in groups.values():
        host = read(index)
        arrays += [jax.device_put(host, d) for d in devices]
        del host
    return jax.make_array_from_single_device_arrays(tuple(shape), sharding, arrays)


def load_hf_params(reader: safetensors_io.WeightReader, cfg, mesh, rules, *, progress: bool = True) -> dict:
    """Streams a HF DBRX state dict onto `mesh` as our param tree (cfg.param_dtype); validates names/shapes."""
    expected = hf_dbrx.hf_shapes(cfg)
    present = {k for k in reader.keys() if not k.endswith(hf_dbrx._IGNORED_SUFFIXES)}  # pylint: disable=protected-access
    missing, unexpected = sorted(set(expected) - present), sorted(present - set(expected))
    if missing or unexpected:
        raise ValueError(f'the checkpoint does not match its config.json: missing={missing[:6]} ({len(missing)}), '
                         f'unexpected={unexpected[:6]} ({len(unexpected)})')
    for k, shape in expected.items():
        if reader.shape(k) != shape:
            raise ValueError(f'{k}: shape {reader.shape(k)}, expected {shape} for this config.json')
    abstract, shardings = param_shardings(cfg, mesh, rules)
    sources = _sources(cfg)
    if set(sources) != set(abstract):
        raise AssertionError(f'mapping/model mismatch: {sorted(set(sources) ^ set(abstract))}')
    dtype = safetensors_io.np_dtype(cfg.param_dtype)
    report = safetensors_io.Progress('loading', len(expected), sum(reader.nbytes(k) for k in expected),
                                     enabled=progress)
    flat = {}
    for path, src in sources.items():
        shape = abstract[path].shape
        flat[path] = _place(lambda idx, src=src, shape=shape: _read_block(reader, src, shape, idx, dtype),
                            shape, shardings[path])
        report.update(sum(reader.nbytes(k) for k in src.keys), items=len(src.keys))
    report.done()
    return _unflatten(flat)


def _load_hf(path, dtype, mesh, rules, allow_pickle, progress, overrides):
    hf = hf_folder.read_config(path)
    with safetensors_io.open_weights(path, allow_pickle=allow_pickle) as reader:
        dtype = dtype or hf_folder.checkpoint_dtype(hf, reader)
        cfg = hf_dbrx.config_from_hf(hf, **{'dtype': dtype, 'param_dtype': dtype, **overrides})
        params = load_hf_params(reader, cfg, mesh, rules, progress=progress)
    tokenizer = hf_folder.load_tokenizer(path)
    return cfg, params, tokenizer, hf_folder.load_chat_template(path)


# ----------------------------------------------------------------------------------------------------------
# mosaicjax checkpoints and training workdirs


def _abstract_targets(cfg, mesh, rules):
    import jax  # pylint: disable=import-outside-toplevel
    abstract, shardings = param_shardings(cfg, mesh, rules)
    return _unflatten({p: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=shardings[p]) for p, a in abstract.items()})


def _with_overrides(saved, dtype, overrides):
    fields = {'dtype': dtype, 'param_dtype': dtype, **overrides}
    if fields.pop('scan_layers', saved.scan_layers) != saved.scan_layers:
        # Orbax restores the tree as it was written, so the saved layout decides.
        print(f'note: scan_layers={saved.scan_layers} as saved', file=sys.stderr)
    return dataclasses.replace(saved, **fields)


def _load_mosaicjax(path, dtype, mesh, rules, overrides):
    meta = lm_checkpoint.read_meta(path)
    saved = lm_checkpoint.config_from_meta(meta)
    dtype = dtype or meta.get('params_dtype') or saved.param_dtype
    cfg = _with_overrides(saved, dtype, overrides)
    params = lm_checkpoint.restore_params(path, _abstract_targets(cfg, mesh, rules))
    tok_file = meta.get('tokenizer_file')
    tokenizer = hf_folder.load_tokenizer(os.path.join(path, tok_file)) if tok_file else None
    template = meta.get('chat_template') or hf_folder.load_chat_template(path)
    return cfg, params, tokenizer, template


def read_workdir_config(workdir: str):
    """(DbrxConfig, TokenizerConfig, checkpoint subdir) of a training workdir, from its operative config.gin.

    Gin is global: the bindings in effect before the call are put back afterwards.
    """
    import gin  # pylint: disable=import-outside-toplevel

    from mosaicjax import config as config_lib  # pylint: disable=import-outside-toplevel
    from mosaicjax.data import tokenizers  # pylint: disable=import-outside-toplevel
    from mosaicjax.models import dbrx  # pylint: disable=import-outside-toplevel
    from mosaicjax.trainer import checkpointing  # pylint: disable=import-outside-toplevel
    previous = gin.config_str()
    try:
        config_lib.parse([os.path.join(workdir, 'config.gin')])
        return dbrx.DbrxConfig(), tokenizers.TokenizerConfig(), checkpointing.CheckpointConfig().subdir
    finally:
        gin.clear_config()
        if previous.strip():
            try:
                gin.parse_config(previous)
            except Exception as e:  # pylint: disable=broad-except
                print(f'warning: could not restore the previous gin bindings: {e}', file=sys.stderr)


def latest_workdir_step(ckpt_dir: str) -> tuple[Any, int]:
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    # read_only: never create, and never clean up temporary step dirs a running training is writing.
    manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f'{ckpt_dir} holds no complete checkpoint yet')
    return manager, step


def restore_workdir_params(ckpt_dir: str, abstract_params, step: int | None = None) -> tuple[Any, int]:
    """Only the params of the train state (no optimizer state, step or RNG) of `step` (default: newest)."""
    import jax  # pylint: disable=import-outside-toplevel
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    manager, latest = latest_workdir_step(ckpt_dir)
    step = latest if step is None else step
    target = {'params': abstract_params}
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, dtype=s.dtype), target)
    # partial_restore: the saved state also holds opt_state/step/rng; only the keys of `target` are read.
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True)))
    manager.close()
    return restored['state']['params'], step


def _load_workdir(path, dtype, mesh, rules, overrides):
    from mosaicjax.data import tokenizers  # pylint: disable=import-outside-toplevel
    saved, tok_cfg, subdir = read_workdir_config(path)
    dtype = dtype or saved.param_dtype
    cfg = _with_overrides(saved, dtype, overrides)
    params, step = restore_workdir_params(os.path.join(path, subdir), _abstract_targets(cfg, mesh, rules))
    print(f'loaded step {step} of {path}', file=sys.stderr)
    if tok_cfg.kind == 'hf':
        tokenizer = tokenizers.HFTokenizer(tok_cfg.path)
    elif tok_cfg.path:
        tokenizer = tokenizers.SentencePieceTokenizer(tok_cfg.path)
    elif os.path.exists(os.path.join(path, 'tokenizer.model')):
        tokenizer = tokenizers.SentencePieceTokenizer(os.path.join(path, 'tokenizer.model'))
    else:
        tokenizer = None
    return cfg, params, tokenizer, None


def workdir_tokenizer_files(path: str) -> list[str]:
    """Tokenizer files of a training workdir, for export (tokenizer.model, or the configured file's folder)."""
    _, tok_cfg, _ = read_workdir_config(path)
    if tok_cfg.kind == 'hf':
        folder = tok_cfg.path if os.path.isdir(tok_cfg.path) else os.path.dirname(tok_cfg.path)
        return hf_folder.tokenizer_files(folder)
    model = tok_cfg.path or os.path.join(path, 'tokenizer.model')
    return [model] if os.path.exists(model) else []


# ----------------------------------------------------------------------------------------------------------


_DTYPE_ALIASES = {'fp32': 'float32', 'f32': 'float32', 'bf16': 'bfloat16', 'fp16': 'float16', 'f16': 'float16',
                  'half': 'float16', 'float': 'float32'}


def peek_config(path: str):
    """The DbrxConfig stored at `path` (any supported kind), without reading weights."""
    kind = detect_kind(path)
    if kind == 'hf':
        return hf_dbrx.config_from_hf(hf_folder.read_config(path))
    if kind == 'mosaicjax':
        return lm_checkpoint.config_from_meta(lm_checkpoint.read_meta(path))
    if kind == 'workdir':
        return read_workdir_config(path)[0]
    raise ValueError(f'{path} is an image model ({kind}), not an LM')


def load_params(path: str, dtype: str | None = 'float32', mesh=None, *, rules=None, allow_pickle: bool = False,
                progress: bool = True, **config_overrides):
    """(kind, DbrxConfig, params, tokenizer or None, chat template or None) from any supported path."""
    from mosaicjax.parallel import rules as rules_lib  # pylint: disable=import-outside-toplevel
    mesh = mesh if mesh is not None else default_mesh()
    rules = rules if rules is not None else rules_lib.get_rules()
    dtype = _DTYPE_ALIASES.get(str(dtype).lower(), dtype) if dtype is not None else None
    if dtype not in (None, 'float32', 'bfloat16', 'float16'):
        raise ValueError(f'dtype={dtype!r}; expected float32, bfloat16 or float16')
    kind = detect_kind(path)
    if kind == 'hf':
        out = _load_hf(path, dtype, mesh, rules, allow_pickle, progress, config_overrides)
    elif kind == 'mosaicjax':
        out = _load_mosaicjax(path, dtype, mesh, rules, config_overrides)
    elif kind == 'workdir':
        out = _load_workdir(path, dtype, mesh, rules, config_overrides)
    else:
        raise ValueError(f'{path} is an image model ({kind}); use mosaicjax.load_image_pipeline')
    return (kind,) + out


def load_lm(path: str, dtype: str = 'float32', mesh=None, *, rules=None, allow_pickle: bool = False,
            progress: bool = True, **config_overrides):
    """A LanguageModel (mosaicjax.lm) from a HF DBRX folder, a mosaicjax LM checkpoint or a training workdir.

    dtype: parameter and compute dtype ('float32' or 'bfloat16'; the logits are float32 either way).
    mesh: where the parameters live (default: the first device); rules: logical-axis rules (default: the
    gin-bound table). allow_pickle: also read pickled .bin/.pt weights (runs code from the file; needs torch).
    config_overrides: DbrxConfig framework fields such as moe_dispatch='loop' or attention_impl='einsum'.
    """
    from mosaicjax import lm as lm_lib  # pylint: disable=import-outside-toplevel
    from mosaicjax.parallel import rules as rules_lib  # pylint: disable=import-outside-toplevel
    mesh = mesh if mesh is not None else default_mesh()
    rules = rules if rules is not None else rules_lib.get_rules()
    _, cfg, params, tokenizer, template = load_params(path, dtype, mesh, rules=rules, allow_pickle=allow_pickle,
                                                      progress=progress, **config_overrides)
    if tokenizer is None:
        print(f'warning: {path} has no tokenizer; only token-id inputs will work', file=sys.stderr)
    return lm_lib.LanguageModel(cfg, params, tokenizer, mesh=mesh, rules=rules, chat_template=template)
