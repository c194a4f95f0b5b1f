"""Convert checkpoints between Hugging Face / diffusers folders and mosaicjax.

  python -m mosaicjax.convert --src=HF_DBRX_DIR --dst=OUT               # -> mosaicjax LM checkpoint
  python -m mosaicjax.convert --src=CKPT_OR_WORKDIR --dst=OUT --to=hf   # -> HF folder (safetensors shards)
  python -m mosaicjax.convert --src=DIFFUSERS_DIR --dst=OUT [--to=hf]   # image models (diffusers_io)

--dtype casts the weights (default: keep what is stored). Pickled .bin/.pt weights are read only with
--allow_pickle, since unpickling runs code from the file.
"""
import json
import os
import sys

from absl import app, flags

flags.DEFINE_string("src", None, "Source: HF/diffusers folder, mosaicjax checkpoint or training workdir.")
flags.DEFINE_string("dst", None, "Destination directory.")
flags.DEFINE_enum("to", "mosaicjax", ["mosaicjax", "hf"], "Target format.")
flags.DEFINE_string("dtype", None, "Weight dtype to write (float32, bfloat16, float16); default: as stored.")
flags.DEFINE_bool("allow_pickle", False, "Read pickled PyTorch .bin/.pt weights (runs code from the file).")
flags.DEFINE_string("max_shard_size", "5GB", "Largest safetensors shard written with --to=hf (e.g. 5GB, 500MB).")
flags.mark_flags_as_required(["src", "dst"])
FLAGS = flags.FLAGS


def _is_image_model(src: str) -> bool:
    if os.path.exists(os.path.join(src, "model_index.json")):
        return True
    meta_path = os.path.join(src, "mosaicjax.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            return json.load(f).get("kind") not in (None, "lm")
    return False


def main(argv):
    del argv
    from absl import logging
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO
    to_hf = FLAGS.to == "hf"
    try:
        if _is_image_model(FLAGS.src):
            try:
                from mosaicjax.checkpoints import diffusers_io
            except ImportError as e:
                raise SystemExit(f"{FLAGS.src} is an image model, but mosaicjax.checkpoints.diffusers_io is not "
                                 f"available ({e}); image-model conversion needs it") from None
            diffusers_io.convert(FLAGS.src, FLAGS.dst, to_hf=to_hf, dtype=FLAGS.dtype)
        else:
            from mosaicjax.checkpoints import lm_convert
            lm_convert.convert_lm(FLAGS.src, FLAGS.dst, to_hf=to_hf, dtype=FLAGS.dtype,
                                  allow_pickle=FLAGS.allow_pickle, max_shard_size=FLAGS.max_shard_size)
    except (ValueError, FileNotFoundError) as e:
        print(f"convert: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
