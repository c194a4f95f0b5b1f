"""Opening the models a server serves: the kind of each path (image or language model) and loading it."""
from __future__ import annotations

import json
import os

from absl import logging


def model_kind(path: str) -> str:
    """'image' or 'lm', from the checkpoint's files."""
    if os.path.exists(os.path.join(path, "model_index.json")):
        return "image"
    meta = os.path.join(path, "mosaicjax.json")
    if os.path.exists(meta):
        with open(meta) as f:
            if json.load(f).get("kind") == "image":
                return "image"
    return "lm"


def load_models(paths: dict[str, str], dtype: str = "float32", quantize: str = "none") -> dict:
    """{name: path} -> {name: LanguageModel | ImagePipeline}, as --model/--dtype/--quantize ask."""
    import mosaicjax  # pylint: disable=import-outside-toplevel
    from mosaicjax.models import quantize as quantize_lib  # pylint: disable=import-outside-toplevel
    models = {}
    for name, path in paths.items():
        kind = model_kind(path)
        logging.info("loading %s model %s from %s", kind, name, path)
        if kind == "image":
            models[name] = mosaicjax.load_image_pipeline(path, dtype=dtype)
        else:
            models[name] = quantize_lib.quantize_lm(mosaicjax.load_lm(path, dtype=dtype), quantize)
    return models
