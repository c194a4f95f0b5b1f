"""Image models on disk: diffusers folders and mosaicjax image checkpoints, read and written exactly.

diffusers folder (what `StableDiffusion[XL]Pipeline.save_pretrained` writes; read from safetensors only):
    model_index.json                    pipeline class, component classes, SDXL's force_zeros_for_empty_prompt
    unet/config.json + diffusion_pytorch_model.safetensors (or sharded: *.safetensors.index.json)
    vae/config.json  + diffusion_pytorch_model.safetensors
    text_encoder/config.json + model.safetensors           (transformers CLIPTextModel)
    tokenizer/vocab.json + merges.txt (or tokenizer.json), tokenizer_config.json, special_tokens_map.json
    scheduler/scheduler_config.json
    SDXL adds text_encoder_2/ (CLIPTextModelWithProjection) and tokenizer_2/ (pads with '!', id 0).
  Pickled weights (*.bin, *.pt, *.ckpt) are refused: unpickling runs code from the file.

mosaicjax image checkpoint (written by `save_image_checkpoint`, read back bit for bit):
    DIR/mosaicjax.json   {"kind": "image", "format_version": 1, "model_index": {...}, "components": [...],
                          "params_dtype": "float32", "source": where it came from}    (written last)
    DIR/params/          Orbax StandardCheckpointer tree {'unet', 'vae', 'text_encoder'[, 'text_encoder_2']}
                         (Flax layouts: conv kernels HWIO, dense kernels [in, out])
    DIR/<component>/config.json for unet, vae, text_encoder(_2): the source's files, copied verbatim
    DIR/tokenizer(_2)/, DIR/scheduler/: copied verbatim

`convert(src, dst, to_hf=False, dtype=None)` moves between the two (mosaicjax.convert's CLI calls it); exporting
writes safetensors in diffusers' layout (torch layouts, current key names) that `from_pretrained` loads.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import shutil
import warnings
from typing import Any, Mapping

import numpy as np

from mosaicjax.checkpoints.meta import META_NAME, read_meta  # noqa: F401  (the image task uses these names here)

PARAMS_DIR = "params"
FORMAT_VERSION = 1
KIND = "image"

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"
# diffusers' default max_shard_size for save_pretrained: bigger components are split.
MAX_SHARD_BYTES = 10 * 1024 ** 3
_PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
TOKENIZERS = ("tokenizer", "tokenizer_2")
_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass
class ImageModel:
    """A text-to-image model in host memory: configs, parameter trees (numpy) and tokenizer/scheduler files.

    model_index: model_index.json (diffusers' pipeline description; force_zeros_for_empty_prompt lives here).
    configs: component name -> that component's config.json dict, verbatim ('unet', 'vae', 'text_encoder',
      'text_encoder_2').
    params: component name -> our Flax parameter tree (nested dicts of numpy arrays, no 'params' wrapper).
    files_dir: the folder holding tokenizer/, tokenizer_2/ and scheduler/ (the source folder itself).
    source: the path it was loaded from.
    """
    model_index: dict
    configs: dict
    params: dict
    files_dir: str
    source: str

    @property
    def text_encoders(self) -> tuple[str, ...]:
        return tuple(n for n in TEXT_ENCODERS if n in self.configs)

    @property
    def is_sdxl(self) -> bool:
        return "text_encoder_2" in self.configs

    def with_projection(self, name: str) -> bool:
        """Whether a text encoder is a CLIPTextModelWithProjection (SDXL's second one)."""
        entry = self.model_index.get(name) or [None, None]
        if entry[1]:
            return entry[1] == "CLIPTextModelWithProjection"
        return "text_projection" in self.params.get(name, {})

    def scheduler_config(self) -> dict:
        path = os.path.join(self.files_dir, "scheduler", "scheduler_config.json")
        if not os.path.isfile(path):
            return {}
        with open(path) as f:
            return json.load(f)

    def tokenizer_dir(self, name: str) -> str:
        return os.path.join(self.files_dir, name)


# ------------------------------------------------------------------------------------------------- detection

def is_diffusers_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json"))


def is_image_checkpoint(path: str) -> bool:
    meta = read_meta(path)
    return bool(meta) and meta.get("kind") == KIND


def _check_dtype(dtype):
    if dtype is not None and str(dtype) not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES} (or None: keep the stored dtype), got {dtype!r}")
    return None if dtype is None else str(dtype)


def _cast(tree, dtype):
    import jax  # pylint: disable=import-outside-toplevel
    import ml_dtypes  # pylint: disable=import-outside-toplevel
    if dtype is None:
        return tree
    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    return jax.tree.map(lambda a: np.asarray(a).astype(np_dtype) if np.asarray(a).dtype != np_dtype
                        else np.asarray(a), tree)


# --------------------------------------------------------------------------------------------- diffusers in

def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def component_weights(folder: str) -> dict[str, np.ndarray]:
    """The state dict of one component folder, from safetensors only.

    Prefers the plain file (or its sharded index); else a single variant file such as
    diffusion_pytorch_model.fp16.safetensors. A folder with only pickled weights is an error.
    """
    from mosaicjax.checkpoints.diffusers_parts import load_safetensors  # pylint: disable=import-outside-toplevel
    for name in (UNET_WEIGHTS, TRANSFORMERS_WEIGHTS):
        for cand in (name, name.replace(".safetensors", ".safetensors.index.json")):
            if os.path.isfile(os.path.join(folder, cand)):
                return load_safetensors(os.path.join(folder, cand))
    found = sorted(glob.glob(os.path.join(folder, "*.safetensors.index.json"))) or \
        sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if len(found) == 1:
        return load_safetensors(found[0])
    if len(found) > 1:
        raise ValueError(f"{folder}: several weight files {[os.path.basename(p) for p in found]}; keep one "
                         f"(e.g. remove the variants you do not want)")
    pickles = [p for pat in _PICKLE_PATTERNS for p in glob.glob(os.path.join(folder, pat))]
    if pickles:
        raise ValueError(f"{folder}: only pickled weights ({', '.join(os.path.basename(p) for p in pickles)}); "
                         "mosaicjax reads safetensors only, since unpickling runs code from the file. Convert "
                         "them, e.g. with diffusers: Pipeline.from_pretrained(...).save_pretrained(dir, "
                         "safe_serialization=True)")
    raise FileNotFoundError(f"{folder}: no safetensors weights")


def has_weights(folder: str) -> bool:
    """Whether a component folder holds weights at all (safetensors, or pickles that component_weights refuses)."""
    return any(glob.glob(os.path.join(folder, pat)) for pat in ("*.safetensors", "*.safetensors.index.json")
               + _PICKLE_PATTERNS)


def weightless_components(path: str) -> list[str]:
    """Components of a diffusers folder that have a config.json but no weights (an architecture-only folder,
    such as the image quickstart's experiments/imageai/shapes_model/)."""
    model_index = _read_json(os.path.join(path, "model_index.json"))
    return [n for n in _components(model_index) if not has_weights(os.path.join(path, n))]


def _component_params(name: str, config: dict, sd: Mapping[str, np.ndarray], with_projection: bool) -> dict:
    """Our param tree for one component, validated against the shapes our model builds for `config`."""
    # pylint: disable=import-outside-toplevel
    from mosaicjax.checkpoints import diffusers_parts as parts
    from mosaicjax.checkpoints import diffusers_unet
    if name == "unet":
        return diffusers_unet.params_from_diffusers(sd, diffusers_unet.unet_config_from_diffusers(config))
    if name == "vae":
        return parts.vae_params_from_diffusers(sd, parts.vae_config_from_diffusers(config))
    return parts.clip_params_from_hf(sd, parts.clip_config_from_hf(config), with_projection=with_projection)


def _components(model_index: Mapping) -> list[str]:
    names = ["unet", "vae"] + [n for n in TEXT_ENCODERS if (model_index.get(n) or [None])[0]]
    return names


def load_diffusers(path: str, dtype: str | None = None, skip: tuple = ()) -> ImageModel:
    """Reads a diffusers SD1 / SD2 / SDXL folder (safetensors only) into an ImageModel; `dtype` casts.

    `skip`: components whose weights are not read (their configs are): the caller re-initialises them, so an
    architecture-only folder without their weights loads too; `params` then lacks them.
    """
    dtype = _check_dtype(dtype)
    path = os.path.abspath(path)
    model_index = _read_json(os.path.join(path, "model_index.json"))
    if not (model_index.get("unet") or [None])[0]:
        raise ValueError(f"{path}/model_index.json has no unet component; not a text-to-image pipeline")
    configs, params = {}, {}
    for name in _components(model_index):
        folder = os.path.join(path, name)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{path}: model_index.json lists {name} but {folder} is missing")
        configs[name] = _read_json(os.path.join(folder, "config.json"))
        if name in skip:
            continue
        with_proj = (model_index.get(name) or [None, None])[1] == "CLIPTextModelWithProjection"
        params[name] = _cast(_component_params(name, configs[name], component_weights(folder), with_proj), dtype)
    for tok, enc in zip(TOKENIZERS, TEXT_ENCODERS):
        if enc in configs and not os.path.isdir(os.path.join(path, tok)):
            raise FileNotFoundError(f"{path}: {enc} needs a {tok}/ folder")
    return ImageModel(model_index, configs, params, path, path)


# --------------------------------------------------------------------------------- mosaicjax checkpoint

def _abstract_params(configs: Mapping[str, dict], model_index: Mapping, dtype: str):
    """ShapeDtypeStructs of every component's params (no memory), in `dtype`."""
    # pylint: disable=import-outside-toplevel
    import jax
    from mosaicjax.checkpoints import diffusers_parts as parts
    from mosaicjax.checkpoints import diffusers_unet
    from mosaicjax.models import unet as unet_lib
    out = {}
    for name, cfg in configs.items():
        if name == "unet":
            shapes = unet_lib.param_shapes(diffusers_unet.unet_config_from_diffusers(cfg))
        elif name == "vae":
            shapes = parts.vae_param_shapes(parts.vae_config_from_diffusers(cfg))
        else:
            with_proj = (model_index.get(name) or [None, None])[1] == "CLIPTextModelWithProjection"
            shapes = parts.clip_param_shapes(parts.clip_config_from_hf(cfg), with_proj)
        out[name] = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jax.numpy.dtype(dtype)), shapes)
    return out


def _copy_dir(src: str, dst: str) -> None:
    if os.path.isdir(src):
        if os.path.abspath(src) != os.path.abspath(dst):
            shutil.copytree(src, dst, dirs_exist_ok=True)


def _params_dtype(params: Mapping) -> str:
    import jax  # pylint: disable=import-outside-toplevel
    leaf = jax.tree.leaves(params["unet"])[0]
    return str(np.asarray(leaf).dtype if not hasattr(leaf, "dtype") else leaf.dtype)


def save_image_checkpoint(model: ImageModel, dst: str) -> str:
    """Writes `model` as a mosaicjax image checkpoint at `dst` (see the module docstring)."""
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    dst = os.path.abspath(dst)
    os.makedirs(dst, exist_ok=True)
    if os.path.exists(os.path.join(dst, META_NAME)):
        os.remove(os.path.join(dst, META_NAME))  # incomplete until the new metadata is written
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(dst, PARAMS_DIR), dict(model.params), force=True)
    ckptr.wait_until_finished()
    for name, cfg in model.configs.items():
        os.makedirs(os.path.join(dst, name), exist_ok=True)
        with open(os.path.join(dst, name, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
    for name in TOKENIZERS + ("scheduler",):
        _copy_dir(os.path.join(model.files_dir, name), os.path.join(dst, name))
    meta = {"kind": KIND, "format_version": FORMAT_VERSION, "model_index": model.model_index,
            "components": sorted(model.configs), "params_dtype": _params_dtype(model.params),
            "source": model.source}
    tmp = os.path.join(dst, META_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, os.path.join(dst, META_NAME))
    return dst


def load_image_checkpoint(path: str, dtype: str | None = None) -> ImageModel:
    """Reads a mosaicjax image checkpoint (params as numpy, cast to `dtype` when given)."""
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel
    dtype = _check_dtype(dtype)
    path = os.path.abspath(path)
    meta = read_meta(path)
    if not meta or meta.get("kind") != KIND:
        raise ValueError(f"{path} is not a mosaicjax image checkpoint (no {META_NAME} with kind 'image')")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"checkpoint format_version {meta['format_version']} is newer than this mosaicjax "
                         f"understands ({FORMAT_VERSION}); upgrade mosaicjax")
    configs = {n: _read_json(os.path.join(path, n, "config.json")) for n in meta["components"]}
    stored = meta.get("params_dtype", "float32")
    abstract = _abstract_params(configs, meta["model_index"], stored)
    restore_args = jax.tree.map(lambda s: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
    params = ocp.PyTreeCheckpointer().restore(
        os.path.join(path, PARAMS_DIR), args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args))
    params = {k: jax.tree.map(np.asarray, v) for k, v in params.items()}
    return ImageModel(meta["model_index"], configs, _cast(params, dtype), path, meta.get("source") or path)


TRAINING_KIND = "image_training"


def is_training_workdir(path: str) -> bool:
    """A `train.task='image'` workdir (mosaicjax.json kind 'image_training', written by the image task)."""
    meta = read_meta(path)
    return bool(meta) and meta.get("kind") == TRAINING_KIND


def load_training_workdir(path: str, dtype: str | None = None, step: int | None = None,
                          use_ema: bool = True) -> ImageModel:
    """The newest (or `step`) checkpoint of an image training workdir: trained components' EMA weights
    (raw weights with use_ema=False) plus the frozen ones, with the configs/tokenizers under WORKDIR/model/."""
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    import jax  # pylint: disable=import-outside-toplevel
    path = os.path.abspath(path)
    model_dir = os.path.join(path, "model")
    model_index = _read_json(os.path.join(model_dir, "model_index.json"))
    configs = {n: _read_json(os.path.join(model_dir, n, "config.json")) for n in _components(model_index)}
    manager = ocp.CheckpointManager(os.path.join(path, "checkpoints"))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint under checkpoints/")
    with warnings.catch_warnings():  # arrays come back whole to the host: the saved sharding does not matter
        warnings.filterwarnings("ignore", message="Sharding info not provided")
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))["state"]
    manager.close()
    params = {n: jax.tree.map(np.asarray, v) for n, v in dict(restored["frozen"]).items()}
    trained = restored["ema"] if use_ema else restored["params"]
    params.update({n: jax.tree.map(np.asarray, v) for n, v in dict(trained).items()})
    params = {n: params[n] for n in configs}
    return ImageModel(model_index, configs, _cast(params, _check_dtype(dtype)), model_dir,
                      f"{path} (step {step}{', EMA' if use_ema else ''})")


def load_image_model(path: str, dtype: str | None = None) -> ImageModel:
    """A diffusers folder, a mosaicjax image checkpoint or an image training workdir (its newest checkpoint)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        raise ValueError(f"{path} is a file; give a diffusers folder (with model_index.json) or a mosaicjax "
                         "image checkpoint folder (single-file .safetensors/.ckpt checkpoints are not supported)")
    if is_training_workdir(path):
        return load_training_workdir(path, dtype)
    if is_image_checkpoint(path):
        return load_image_checkpoint(path, dtype)
    if is_diffusers_folder(path):
        return load_diffusers(path, dtype)
    raise FileNotFoundError(f"{path}: neither a diffusers folder (model_index.json) nor a mosaicjax image "
                            f"checkpoint ({META_NAME} with kind 'image')")


# -------------------------------------------------------------------------------------------- diffusers out

def component_state_dict(model: ImageModel, name: str) -> dict[str, np.ndarray]:
    """The diffusers / transformers state dict (torch layouts, numpy) of one component."""
    # pylint: disable=import-outside-toplevel
    from mosaicjax.checkpoints import diffusers_parts as parts
    from mosaicjax.checkpoints import diffusers_unet
    params, cfg = model.params[name], model.configs[name]
    if name == "unet":
        return diffusers_unet.params_to_diffusers(params)
    if name == "vae":
        return parts.vae_params_to_diffusers(params, parts.vae_config_from_diffusers(cfg))
    return parts.clip_params_to_hf(params, parts.clip_config_from_hf(cfg))


def _write_safetensors(folder: str, filename: str, sd: Mapping[str, np.ndarray]) -> None:
    """One file, or diffusers-style shards + index past MAX_SHARD_BYTES; atomic per file."""
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    names = list(sd)
    shards, size = [[]], 0
    for n in names:
        if shards[-1] and size + sd[n].nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += sd[n].nbytes
    stem = filename[:-len(".safetensors")]
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = filename if len(shards) == 1 else f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        path = os.path.join(folder, fname)
        save_file({n: np.ascontiguousarray(sd[n]) for n in shard}, path + ".tmp", metadata={"format": "pt"})
        os.replace(path + ".tmp", path)
        weight_map.update({n: fname for n in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": int(sum(a.nbytes for a in sd.values()))}, "weight_map": weight_map}
        with open(os.path.join(folder, filename + ".index.json"), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)


def export_diffusers(model: ImageModel, dst: str, dtype: str | None = None) -> str:
    """Writes `model` as a diffusers folder that StableDiffusion[XL]Pipeline.from_pretrained loads."""
    dtype = _check_dtype(dtype)
    dst = os.path.abspath(dst)
    os.makedirs(dst, exist_ok=True)
    for name in model.configs:
        folder = os.path.join(dst, name)
        os.makedirs(folder, exist_ok=True)
        cfg = dict(model.configs[name])
        sd = _cast(component_state_dict(model, name), dtype)
        if name in TEXT_ENCODERS:  # transformers reads the dtype to load in from the config ('dtype' in v5)
            written = str(next(iter(sd.values())).dtype)
            for key in [k for k in ("dtype", "torch_dtype") if k in cfg] or ["torch_dtype"]:
                cfg[key] = written
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
        _write_safetensors(folder, UNET_WEIGHTS if name in ("unet", "vae") else TRANSFORMERS_WEIGHTS, sd)
    for name in TOKENIZERS + ("scheduler",):
        _copy_dir(os.path.join(model.files_dir, name), os.path.join(dst, name))
    index = dict(model.model_index)
    for key, value in list(index.items()):
        # Components we do not carry (safety checker, feature extractor, image encoder) are written as absent.
        if isinstance(value, list) and len(value) == 2 and key not in model.configs and key not in TOKENIZERS \
                and key != "scheduler":
            index[key] = [None, None]
    if "requires_safety_checker" in index:
        index["requires_safety_checker"] = False
    with open(os.path.join(dst, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    return dst


def convert(src: str, dst: str, to_hf: bool = False, dtype: str | None = None) -> str:
    """diffusers folder <-> mosaicjax image checkpoint.

    to_hf=False: src (diffusers folder or mosaicjax image checkpoint) -> mosaicjax image checkpoint at dst.
    to_hf=True: src (either) -> diffusers folder at dst. dtype casts the weights (None keeps them).
    """
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("src and dst must differ")
    model = load_image_model(src, dtype=dtype)
    if to_hf:
        out = export_diffusers(model, dst)
    else:
        out = save_image_checkpoint(model, dst)
    logging.info("converted %s -> %s (%s)", src, out, "diffusers" if to_hf else "mosaicjax")
    return out


def describe(model: ImageModel) -> dict[str, Any]:
    """Parameter counts per component (for logs and the CLI)."""
    import jax  # pylint: disable=import-outside-toplevel
    return {n: int(sum(np.asarray(a).size for a in jax.tree.leaves(p))) for n, p in model.params.items()}
