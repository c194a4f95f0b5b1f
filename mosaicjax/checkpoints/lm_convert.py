"""LM checkpoint conversion behind `python -m mosaicjax.convert`.

    HF DBRX folder            -> mosaicjax LM checkpoint   (default direction)
    mosaicjax LM checkpoint   -> HF DBRX folder            (to_hf=True)
    training workdir          -> HF DBRX folder            (to_hf=True; newest checkpoint's params)
    training workdir          -> mosaicjax LM checkpoint   (to_hf=False)

Weights pass through device memory on a mesh over all local devices (parameters sharded over 'fsdp'), read
and written one shard at a time, so the host never holds the whole model. dtype None keeps the stored dtype,
so HF -> mosaicjax -> HF reproduces every tensor bit for bit.
"""
from __future__ import annotations

import os
import sys

from mosaicjax.checkpoints import hf_folder
from mosaicjax.checkpoints import lm_checkpoint
from mosaicjax.checkpoints import loading


def conversion_mesh(cfg):
    """Local devices on the fsdp axis (parameters split across them rather than copied): as many as evenly
    divide d_model, the dimension 'embed' names."""
    import jax  # pylint: disable=import-outside-toplevel

    from mosaicjax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
    devices = jax.local_devices()
    n = max(k for k in range(1, len(devices) + 1) if cfg.d_model % k == 0)
    return mesh_lib.make_mesh(mesh_lib.MeshConfig({'data': 1, 'fsdp': n, 'expert': 1, 'tensor': 1}),
                              devices=devices[:n])


def _tokenizer_sources(src: str, kind: str) -> list[str]:
    if kind == 'workdir':
        return loading.workdir_tokenizer_files(src)
    return hf_folder.tokenizer_files(src)


def convert_lm(src: str, dst: str, *, to_hf: bool = False, dtype: str | None = None, allow_pickle: bool = False,
               max_shard_size: int | str = '5GB', mesh=None, progress: bool = True) -> str:
    """Converts an LM checkpoint (see the module docstring); returns `dst`."""
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError('--src and --dst must be different directories')
    kind = loading.detect_kind(src)
    if kind == 'hf' and to_hf:
        raise ValueError(f'{src} is already a Hugging Face folder; drop --to=hf to convert it to mosaicjax')
    if kind == 'mosaicjax' and not to_hf:
        raise ValueError(f'{src} is already a mosaicjax checkpoint; pass --to=hf to export it')
    mesh = mesh if mesh is not None else conversion_mesh(loading.peek_config(src))
    # Framework fields only shape the forward pass; the stored tensors do not depend on them.
    _, cfg, params, _, template = loading.load_params(src, dtype, mesh, allow_pickle=allow_pickle,
                                                      progress=progress)
    tok_files = _tokenizer_sources(src, kind)
    if to_hf:
        hf_folder.save_hf_folder(dst, cfg, params, dtype=None, tokenizer_src=tok_files, chat_template=template,
                                 max_shard_size=max_shard_size, progress=progress)
    else:
        lm_checkpoint.save_lm_checkpoint(dst, cfg, params, tokenizer_files=tok_files, chat_template=template,
                                         source=os.path.abspath(src))
    print(f'wrote {"Hugging Face folder" if to_hf else "mosaicjax checkpoint"} {dst} '
          f'({cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.param_dtype})', file=sys.stderr)
    return dst
