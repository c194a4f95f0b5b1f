"""Hugging Face model folders: what is in them besides weights (config, tokenizer, chat template), and export.

A DBRX folder as published on the Hub:
    config.json                       nested attn_config / ffn_config (RoPE base: attn_config.rope_theta, or
                                      rope_parameters as transformers 5 writes it; see hf_dbrx.config_from_hf)
    model-0000N-of-0000M.safetensors  + model.safetensors.index.json (or one model.safetensors)
    tokenizer.json                    GPT-4's cl100k BPE as a `tokenizers` file (or a *.tiktoken BPE file)
    tokenizer_config.json             bos/eos/pad token names, added_tokens_decoder, chat_template
    chat_template.jinja               newer transformers save the template here instead

`save_hf_folder` writes that layout from a mosaicjax parameter tree, one shard in host memory at a time.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Any, Mapping

import numpy as np

from mosaicjax.checkpoints import hf_dbrx
from mosaicjax.checkpoints import safetensors_io

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'added_tokens.json',
                   'vocab.json', 'merges.txt', 'tokenizer.model', 'chat_template.jinja', 'chat_template.json',
                   'generation_config.json')


def read_config(folder: str) -> dict:
    path = os.path.join(folder, 'config.json')
    with open(path) as f:
        hf = json.load(f)
    model_type = hf.get('model_type')
    if model_type not in (None, 'dbrx'):
        raise ValueError(f'{path}: model_type={model_type!r}; mosaicjax loads DBRX checkpoints (model_type "dbrx")')
    return hf


def checkpoint_dtype(hf_config: Mapping, reader: safetensors_io.WeightReader | None = None) -> str:
    """The dtype the weights are stored in: the files' own dtype, else config.json's (torch_)dtype."""
    if reader is not None:
        for k in reader.keys():
            if k.endswith('wte.weight'):
                return str(reader.dtype(k))
    d = hf_config.get('dtype') or hf_config.get('torch_dtype') or 'float32'
    return str(d).replace('torch.', '')


def tokenizer_files(folder: str) -> list[str]:
    """Tokenizer-related files present in `folder` (to copy along with converted weights)."""
    found = [os.path.join(folder, n) for n in TOKENIZER_FILES if os.path.exists(os.path.join(folder, n))]
    return found + sorted(glob.glob(os.path.join(folder, '*.tiktoken')))


def tokenizer_file_of(folder: str) -> str | None:
    """The main tokenizer file name in `folder`: tokenizer.json, a *.tiktoken file or tokenizer.model."""
    if os.path.exists(os.path.join(folder, 'tokenizer.json')):
        return 'tokenizer.json'
    tk = sorted(glob.glob(os.path.join(folder, '*.tiktoken')))
    if tk:
        return os.path.basename(tk[0])
    if os.path.exists(os.path.join(folder, 'tokenizer.model')):
        return 'tokenizer.model'
    return None


def load_tokenizer(path: str):
    """A mosaicjax Tokenizer from a tokenizer file or from a folder holding one; None when there is none.

    tokenizer.json -> HFTokenizer (special ids from tokenizer_config.json); *.tiktoken -> TiktokenTokenizer
    (specials from tokenizer_config.json's added_tokens_decoder, else DBRX's); *.model -> SentencePieceTokenizer.
    """
    from mosaicjax.data import tokenizers  # pylint: disable=import-outside-toplevel
    if os.path.isdir(path):
        name = tokenizer_file_of(path)
        if name is None:
            return _named_tiktoken_encoding(path)
        path = os.path.join(path, name)
    if path.endswith('.json'):
        return tokenizers.HFTokenizer(path)
    if path.endswith('.tiktoken'):
        from mosaicjax.data import tiktoken_tokenizer  # pylint: disable=import-outside-toplevel
        return tiktoken_tokenizer.TiktokenTokenizer.from_folder(os.path.dirname(path) or '.')
    if path.endswith('.model'):
        return tokenizers.SentencePieceTokenizer(path)
    raise ValueError(f'unknown tokenizer file type: {path} (expected tokenizer.json, *.tiktoken or *.model)')


def _named_tiktoken_encoding(folder: str):
    """DBRX's original Hub layout: no tokenizer file, tokenizer_config.json naming a tiktoken encoding (model_name
    'gpt-4' for llm-foundry's TiktokenTokenizerWrapper). tiktoken fetches the BPE file (or finds it in
    TIKTOKEN_CACHE_DIR); without network access that fails, and the model loads without a tokenizer."""
    from mosaicjax.data import tiktoken_tokenizer  # pylint: disable=import-outside-toplevel
    try:
        if tiktoken_tokenizer.tiktoken_encoding_name(folder) is None:
            return None
        return tiktoken_tokenizer.TiktokenTokenizer.from_folder(folder)
    except Exception as e:  # pylint: disable=broad-except
        import sys  # pylint: disable=import-outside-toplevel
        print(f'warning: {folder} names a tiktoken encoding that could not be loaded: {e}', file=sys.stderr)
        return None


def load_chat_template(folder: str) -> str | None:
    """chat_template.jinja, chat_template.json or tokenizer_config.json's chat_template ('default' if named)."""
    jinja = os.path.join(folder, 'chat_template.jinja')
    if os.path.exists(jinja):
        with open(jinja, encoding='utf-8') as f:
            return f.read()
    for name in ('chat_template.json', 'tokenizer_config.json'):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            continue
        with open(path, encoding='utf-8') as f:
            template = json.load(f).get('chat_template')
        if isinstance(template, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
            named = {t.get('name'): t.get('template') for t in template if isinstance(t, Mapping)}
            template = named.get('default') or next(iter(named.values()), None)
        if template:
            return template
    return None


def copy_files(files, dst: str) -> list[str]:
    os.makedirs(dst, exist_ok=True)
    out = []
    for f in files:
        target = os.path.join(dst, os.path.basename(f))
        if os.path.abspath(f) != os.path.abspath(target):
            shutil.copyfile(f, target)
        out.append(os.path.basename(f))
    return out


# ----------------------------------------------------------------------------------------------------------
# Export


def _flat_params(params: Mapping) -> dict[tuple[str, ...], Any]:
    if 'params' in params and 'wte' not in params:
        params = params['params']
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, Mapping):
                walk(v, prefix + (k,))
            else:
                out[prefix + (k,)] = v.unbox() if hasattr(v, 'unbox') else v
    walk(params, ())
    return out


def hf_tensor_plan(params: Mapping, cfg, dtype: str | None = None):
    """(names, nbytes, get): the HF state dict of `params` as names, byte sizes and a per-tensor fetcher.

    get(name) copies just that tensor (one layer of a stacked [L, ...] parameter) from the devices to the host.
    """
    flat = _flat_params(params)
    stacked = any(k[0] == 'blocks' for k in flat)
    out_dtype = None if dtype is None else safetensors_io.np_dtype(dtype)
    sources: dict[str, tuple[tuple[str, ...], int | None, bool]] = {}
    for hf_key, path, tr in hf_dbrx._TOP_MAP:  # pylint: disable=protected-access
        sources[hf_key] = (path, None, tr)
    for i in range(cfg.n_layers):
        for suffix, path, tr in hf_dbrx._BLOCK_MAP:  # pylint: disable=protected-access
            key = hf_dbrx._BLOCK.format(i=i) + suffix  # pylint: disable=protected-access
            sources[key] = (('blocks',) + path, i, tr) if stacked else ((f'blocks_{i}',) + path, None, tr)
    expected = hf_dbrx.hf_shapes(cfg)
    nbytes = {}
    for key, (path, layer, _) in sources.items():
        if path not in flat:
            raise ValueError(f'parameter {"/".join(path)} (for {key}) is missing from the params')
        arr = flat[path]
        shape = tuple(arr.shape[1:]) if layer is not None else tuple(arr.shape)
        if int(np.prod(shape)) != int(np.prod(expected[key])):
            raise ValueError(f'{"/".join(path)}: shape {tuple(arr.shape)} does not match the config ({key} '
                             f'should be {expected[key]})')
        nbytes[key] = int(np.prod(expected[key])) * (out_dtype or np.dtype(arr.dtype)).itemsize

    def get(key):
        import jax  # pylint: disable=import-outside-toplevel
        path, layer, tr = sources[key]
        arr = flat[path]
        a = np.asarray(jax.device_get(arr[layer] if layer is not None else arr))
        if tr:
            a = a.T
        a = np.ascontiguousarray(a)
        if out_dtype is not None and a.dtype != out_dtype:
            a = a.astype(out_dtype)
        if a.shape != expected[key]:
            raise ValueError(f'{key}: shape {a.shape}, expected {expected[key]}')
        return a

    return list(sources), nbytes, get


def save_hf_folder(dst: str, cfg, params: Mapping, *, dtype: str | None = None, tokenizer_src: list[str] = (),
                   chat_template: str | None = None, max_shard_size: int | str = '5GB',
                   progress: bool = True) -> None:
    """Writes a transformers-loadable DBRX folder: config.json (published nested layout), sharded safetensors
    + index, and the tokenizer files `tokenizer_src` (copied). dtype: storage dtype (None: the params')."""
    import dataclasses  # pylint: disable=import-outside-toplevel
    os.makedirs(dst, exist_ok=True)
    names, nbytes, get = hf_tensor_plan(params, cfg, dtype)
    if dtype is None:
        first = _flat_params(params)[('wte', 'embedding')]
        dtype = str(np.dtype(first.dtype))
    hf_cfg = hf_dbrx.config_to_hf(dataclasses.replace(cfg, param_dtype=str(dtype)))
    safetensors_io.save_sharded(dst, names, nbytes, get, max_shard_size=max_shard_size, progress=progress)
    with open(os.path.join(dst, 'config.json'), 'w') as f:
        json.dump(hf_cfg, f, indent=2)
    copied = copy_files(tokenizer_src, dst)
    if chat_template and not load_chat_template(dst):
        with open(os.path.join(dst, 'chat_template.jinja'), 'w', encoding='utf-8') as f:
            f.write(chat_template)
    if not any(n in copied for n in ('tokenizer.json', 'tokenizer.model')) and not any(
            n.endswith('.tiktoken') for n in copied):
        import sys  # pylint: disable=import-outside-toplevel
        print(f'note: no tokenizer files were written to {dst}', file=sys.stderr)
