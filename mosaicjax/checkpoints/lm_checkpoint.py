"""The mosaicjax LM checkpoint: a directory that `load_lm` and `convert --to=hf` read back exactly.

    DIR/mosaicjax.json   {"kind": "lm", "format_version": 1, "config": {DbrxConfig fields}, "tokenizer_file":
                          "tokenizer.json" | "<name>.tiktoken" | "tokenizer.model" | null, "params_dtype": ...,
                          "chat_template": str | null, "source": where it was converted from}
    DIR/params/          the parameter tree (scan layout, no 'params' wrapper) saved with Orbax's
                         StandardCheckpointer: restored straight onto any mesh's shardings, in any dtype
    DIR/<tokenizer files> copied from the source (tokenizer.json, tokenizer_config.json, ...)

mosaicjax.json is written last, so a directory that has it is complete.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

from mosaicjax.checkpoints.meta import META_NAME, read_meta  # noqa: F401  (loaders use these names here)

PARAMS_DIR = 'params'
FORMAT_VERSION = 1


def is_lm_checkpoint(path: str) -> bool:
    meta = read_meta(path)
    return bool(meta) and meta.get('kind') == 'lm'


def config_from_meta(meta: Mapping, **overrides):
    """DbrxConfig from mosaicjax.json (fields this version does not know are ignored; overrides win)."""
    from mosaicjax.models import dbrx  # pylint: disable=import-outside-toplevel
    if meta.get('format_version', 0) > FORMAT_VERSION:
        raise ValueError(f'checkpoint format_version {meta["format_version"]} is newer than this mosaicjax '
                         f'understands ({FORMAT_VERSION}); upgrade mosaicjax')
    known = {f.name for f in dataclasses.fields(dbrx.DbrxConfig)}
    fields = {k: v for k, v in dict(meta['config']).items() if k in known}
    fields.update(overrides)
    return dbrx.DbrxConfig(**fields)


def save_lm_checkpoint(path: str, config, params: Any, *, tokenizer_files: Sequence[str] = (),
                       tokenizer_file: str | None = None, chat_template: str | None = None,
                       source: str | None = None) -> str:
    """Saves `params` (the tree inside 'params', any sharding) with their config and tokenizer files.

    tokenizer_file: the name (among the copied files) the tokenizer is loaded from; None picks tokenizer.json,
    a *.tiktoken file or tokenizer.model among them.
    """
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel

    from mosaicjax.checkpoints import hf_folder  # pylint: disable=import-outside-toplevel
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    if os.path.exists(os.path.join(path, META_NAME)):
        os.remove(os.path.join(path, META_NAME))  # the directory is incomplete until the new one is written
    if 'params' in params and 'wte' not in params:
        params = params['params']
    params = jax.tree.map(lambda x: x.unbox() if hasattr(x, 'unbox') else x, params,
                          is_leaf=lambda x: hasattr(x, 'unbox'))
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(path, PARAMS_DIR), params, force=True)
    ckptr.wait_until_finished()
    copied = hf_folder.copy_files(tokenizer_files, path)
    if tokenizer_file is None:
        tokenizer_file = hf_folder.tokenizer_file_of(path)
    elif tokenizer_file not in copied and not os.path.exists(os.path.join(path, tokenizer_file)):
        raise ValueError(f'tokenizer_file={tokenizer_file!r} is not among the copied files {copied}')
    wte = params['wte']['embedding']
    meta = {
        'kind': 'lm',
        'format_version': FORMAT_VERSION,
        'config': dataclasses.asdict(config),
        'params_dtype': str(wte.dtype),
        'tokenizer_file': tokenizer_file,
        'chat_template': chat_template,
        'source': source,
    }
    tmp = os.path.join(path, META_NAME + '.tmp')
    with open(tmp, 'w') as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, os.path.join(path, META_NAME))
    return path


def restore_params(path: str, abstract_params: Any) -> Any:
    """The checkpoint's params laid onto `abstract_params` (ShapeDtypeStructs with shardings; dtype cast)."""
    import jax  # pylint: disable=import-outside-toplevel
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    params_dir = os.path.join(os.path.abspath(path), PARAMS_DIR)
    ckptr = ocp.PyTreeCheckpointer()
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, dtype=s.dtype),
                                abstract_params)
    return ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(item=abstract_params, restore_args=restore_args))
