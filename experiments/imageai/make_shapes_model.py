"""Writes experiments/imageai/shapes_model/: the image quickstart's model as data, in the diffusers layout, no weights.

    python experiments/imageai/make_shapes_model.py [DST]

model_index.json, unet/ vae/ text_encoder/ config.json, scheduler/scheduler_config.json and a CLIP BPE tokenizer
trained on the shapes captions (every caption word is one token; 16 positions hold the longest caption). The
quickstart (experiments/imageai/shapes.gin) re-initialises every component from these configs
(`image.reinit`), so no weights are needed. Sizes were tuned so the two-phase run fits 15 minutes on 2 CPU cores
(BUILD_NOTES.md, "Image quickstart"); edit them here and re-run to change the architecture.
"""
from __future__ import annotations

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from mosaicjax.data import clip_tokenizer as ct  # noqa: E402
from mosaicjax.data import shapes  # noqa: E402

MAX_TOKENS = 16  # bos + 11 words + eos fits; positions cost attention time, 77 would be wasted here
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
# Two VAE levels (16x16x4 latents): with three (8x8) the VAE had not learnt colours after 600 steps. The scaling
# factor is 1/std of the trained VAE's latents (~2.0), as SD chose its 0.18215.
VAE = dict(block_out_channels=[16, 32], layers_per_block=1, latent_channels=4, norm_num_groups=8,
           scaling_factor=0.5)
UNET = dict(block_out_channels=[32, 64], layers_per_block=1, attention_head_dim=4, norm_num_groups=16,
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000, prediction_type="epsilon")


def _write(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def main(dst: str, text: dict = TEXT, vae: dict = VAE, unet: dict = UNET, side: int = 32) -> str:
    """Writes the folder at `dst` (tests pass smaller sizes); returns `dst`."""
    captions = [shapes.caption(*c) for c in shapes.all_combinations()]
    merges = ct.train_clip_bpe(captions, 200)  # stops once every caption word is whole
    vocab = ct.build_clip_vocab(merges)
    tok = ct.CLIPTokenizer(vocab, merges, model_max_length=MAX_TOKENS)
    assert all(len(tok.encode(w)) == 1 for c in captions for w in c.split()), "a caption word is split"
    tok.save_pretrained(os.path.join(dst, "tokenizer"))
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    _write(os.path.join(dst, "model_index.json"), {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
        "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]})
    _write(os.path.join(dst, "text_encoder", "config.json"), {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": len(vocab),
        "max_position_embeddings": MAX_TOKENS, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, "projection_dim": 64,
        "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
        "torch_dtype": "float32", **text})
    n = len(vae["block_out_channels"])
    _write(os.path.join(dst, "vae", "config.json"), {
        "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "act_fn": "silu",
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "sample_size": side, "force_upcast": False, **vae})
    _write(os.path.join(dst, "unet", "config.json"), {
        "_class_name": "UNet2DConditionModel", "sample_size": side // factor, "in_channels": vae["latent_channels"],
        "out_channels": vae["latent_channels"], "cross_attention_dim": text["hidden_size"], "act_fn": "silu",
        "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_type":
        "UNetMidBlock2DCrossAttn", "only_cross_attention": False, "upcast_attention": False,
        "use_linear_projection": False, **unet})
    _write(os.path.join(dst, "scheduler", "scheduler_config.json"), {"_class_name": "DDIMScheduler", **SCHEDULER})
    return dst


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(REPO, "experiments", "imageai", "shapes_model"))
