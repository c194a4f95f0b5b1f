"""OpenAI-compatible server: `python -m mosaicjax.serve --model=NAME=PATH [--model=...] --host=H --port=P`.

Each PATH is opened with load_image_pipeline when it is an image checkpoint (a diffusers folder with
model_index.json, or a mosaicjax checkpoint whose mosaicjax.json says kind 'image'), else with load_lm (HF DBRX
folder, mosaicjax LM checkpoint or training workdir). --quantize=int8 serves language models with int8
weight-only quantisation (mosaicjax/models/quantize.py). With --warmup (default) every LM program compiles before
/health answers 200.

SIGTERM/SIGINT drain: new generation requests are answered 503 (OpenAI's envelope) and uvicorn stops accepting
connections, in-flight requests (streams included) finish within --drain_timeout seconds, then the engines stop
and the process exits 0.
"""
from __future__ import annotations

import signal

from absl import app, flags

from mosaicjax.serving.models import load_models

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("model", [], "NAME=PATH of a model to serve (repeatable).")
flags.DEFINE_string("host", "127.0.0.1", "Interface to listen on.")
flags.DEFINE_integer("port", 8000, "Port to listen on.")
flags.DEFINE_string("api_key", None, "Require `Authorization: Bearer KEY` (default: $MOSAICJAX_API_KEY if set).")
flags.DEFINE_string("dtype", "float32", "Parameter/compute dtype: float32 | bfloat16.")
flags.DEFINE_enum("quantize", "none", ["none", "int8"],
                  "Language models' weights: as loaded, or int8 weight-only with per-output-channel scales.")
flags.DEFINE_bool("warmup", True, "Compile every LM program (prefill buckets, decode step, scoring) before "
                  "/health says ready, so no request pays compilation.")
flags.DEFINE_integer("default_image_steps", 30, "Denoising steps of an image request that names none.")
flags.DEFINE_integer("max_prefill_tokens", 4096, "Padded prompt tokens per prefill call (batch x length bucket).")
flags.DEFINE_string("compilation_cache_dir", None, "JAX's persistent compilation cache: a restart with the same "
                    "models and flags loads its compiled programs from here instead of compiling them.")
flags.DEFINE_integer("slots", 8, "KV-cache slots per language model (requests decoded together).")
flags.DEFINE_integer("queue_size", 256, "Requests allowed to wait for a slot before 429.")
flags.DEFINE_integer("steps_per_sync", 1, "Decode steps between host round trips (1: join/leave every token).")
flags.DEFINE_integer("max_image_size", 1280, "Largest side of a custom image size (named sizes always allowed).")
flags.DEFINE_integer("max_body_bytes", 4 << 20, "Larger request bodies are answered 413.")
flags.DEFINE_integer("drain_timeout", 60, "Seconds in-flight requests get to finish after SIGTERM.")


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

    from mosaicjax.serving import create_app  # pylint: disable=import-outside-toplevel
    if FLAGS.compilation_cache_dir:
        import jax  # pylint: disable=import-outside-toplevel
        jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache_dir)
    models = load_models(parse_models(FLAGS.model), FLAGS.dtype, FLAGS.quantize)
    server_app = create_app(models, api_key=FLAGS.api_key, slots=FLAGS.slots, queue_size=FLAGS.queue_size,
                            max_body_bytes=FLAGS.max_body_bytes, max_image_size=FLAGS.max_image_size,
                            steps_per_sync=FLAGS.steps_per_sync, default_image_steps=FLAGS.default_image_steps,
                            warmup=FLAGS.warmup, max_prefill_tokens=FLAGS.max_prefill_tokens)

    class DrainingServer(uvicorn.Server):
        """On SIGTERM/SIGINT: refuse new generation requests (503), then uvicorn's own graceful shutdown (stop
        accepting, wait for in-flight requests up to timeout_graceful_shutdown, end the lifespan: engines stop)."""

        def handle_exit(self, sig, frame):
            server_app.state.draining = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(server_app, host=FLAGS.host, port=FLAGS.port,
                            timeout_graceful_shutdown=FLAGS.drain_timeout, log_level="info")
    # After a graceful shutdown uvicorn re-raises the signal it caught under the handler that was installed
    # before it ran; with SIGTERM's default that would kill the drained process (exit 143). A drain is a
    # clean exit: 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    DrainingServer(config).run()


if __name__ == "__main__":
    from mosaicjax import host_memory
    host_memory.reexec_with_huge_pages()  # on CPU: glibc's huge-page tunable, read only at process start
    app.run(main)
