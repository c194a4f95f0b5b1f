"""OpenAI-compatible server: `python -m mosaicjax.serve --model=NAME=PATH [--model=...] --host=H --port=P`.

Each PATH is opened with load_image_pipeline when it is an image checkpoint (a diffusers folder with
model_index.json, or a mosaicjax checkpoint whose mosaicjax.json says kind 'image'), else with load_lm (HF DBRX
folder, mosaicjax LM checkpoint or training workdir). SIGTERM/SIGINT drain: uvicorn stops accepting
connections, waits for in-flight requests (streams included) up to --drain_timeout, then the engines stop.
"""
from __future__ import annotations

import json
import os

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("model", [], "NAME=PATH of a model to serve (repeatable).")
flags.DEFINE_string("host", "127.0.0.1", "Interface to listen on.")
flags.DEFINE_integer("port", 8000, "Port to listen on.")
flags.DEFINE_string("api_key", None, "Require `Authorization: Bearer KEY` (default: $MOSAICJAX_API_KEY if set).")
flags.DEFINE_string("dtype", "float32", "Parameter/compute dtype: float32 | bfloat16.")
flags.DEFINE_integer("slots", 8, "KV-cache slots per language model (requests decoded together).")
flags.DEFINE_integer("queue_size", 256, "Requests allowed to wait for a slot before 429.")
flags.DEFINE_integer("steps_per_sync", 1, "Decode steps between host round trips (1: join/leave every token).")
flags.DEFINE_integer("max_image_size", 1280, "Largest side of a custom image size (named sizes always allowed).")
flags.DEFINE_integer("max_body_bytes", 4 << 20, "Larger request bodies are answered 413.")
flags.DEFINE_integer("drain_timeout", 60, "Seconds in-flight requests get to finish after SIGTERM.")


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


def parse_models(specs: list[str]) -> dict[str, str]:
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise app.UsageError(f"--model must be NAME=PATH, got {spec!r}")
        if name in out:
            raise app.UsageError(f"model name {name!r} given twice")
        out[name] = path
    if not out:
        raise app.UsageError("give at least one --model=NAME=PATH")
    return out


def main(argv):
    del argv
    import uvicorn  # pylint: disable=import-outside-toplevel

    import mosaicjax  # pylint: disable=import-outside-toplevel
    from mosaicjax.serving import create_app  # pylint: disable=import-outside-toplevel
    models = {}
    for name, path in parse_models(FLAGS.model).items():
        kind = model_kind(path)
        logging.info("loading %s model %s from %s", kind, name, path)
        models[name] = (mosaicjax.load_image_pipeline(path, dtype=FLAGS.dtype) if kind == "image"
                        else mosaicjax.load_lm(path, dtype=FLAGS.dtype))
    server_app = create_app(models, api_key=FLAGS.api_key, slots=FLAGS.slots, queue_size=FLAGS.queue_size,
                            max_body_bytes=FLAGS.max_body_bytes, max_image_size=FLAGS.max_image_size,
                            steps_per_sync=FLAGS.steps_per_sync)
    # uvicorn installs SIGTERM/SIGINT handlers: stop accepting, finish in-flight requests, run the lifespan's
    # shutdown (engines drain), exit.
    uvicorn.run(server_app, host=FLAGS.host, port=FLAGS.port, timeout_graceful_shutdown=FLAGS.drain_timeout,
                log_level="info")


if __name__ == "__main__":
    app.run(main)
