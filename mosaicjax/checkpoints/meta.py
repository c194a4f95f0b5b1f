"""The marker file of a mosaicjax checkpoint folder (LM or image): mosaicjax.json, written last, so a folder that
has it is complete; its `kind` says which loader reads the folder."""
from __future__ import annotations

import json
import os

META_NAME = "mosaicjax.json"


def read_meta(path: str) -> dict | None:
    """mosaicjax.json of `path`, or None when `path` is not a mosaicjax checkpoint."""
    meta_path = os.path.join(path, META_NAME)
    if not os.path.isfile(meta_path):
        return None
    with open(meta_path) as f:
        return json.load(f)
