"""Tiny random diffusers folders (SD1-, SD2- and SDXL-style) built with diffusers/transformers' own classes.

Nothing is downloaded: the CLIP tokenizers are BPEs trained here on a few sentences, the models are random with
every 1-D parameter (norm scales, biases) perturbed so a swapped scale/bias or a missing norm would show, and the
folders are written with `save_pretrained(safe_serialization=True)`, exactly as the Hub's are.
"""
import os

import numpy as np

from mosaicjax.data import clip_tokenizer as ct

CORPUS = [
    "a photo of an astronaut riding a horse on the moon",
    "a painting of a fox in the snow, highly detailed, trending on artstation",
    "blurry, low quality, watermark, text, jpeg artifacts",
    "portrait of a woman, studio lighting, bokeh, 4k",
    "a red cube on a blue sphere next to a green cone",
] * 2

TEXT_HIDDEN = 32
PROJECTION = 16
TIME_DIM = 8


def _perturb(module, seed):
    import torch  # pylint: disable=import-outside-toplevel
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return module.eval()


def _tokenizer(folder, pad):
    import transformers  # pylint: disable=import-outside-toplevel
    merges = ct.train_clip_bpe(CORPUS, 120)
    vocab = ct.build_clip_vocab(merges)
    ct.CLIPTokenizer(vocab, merges, pad_token=pad).save_pretrained(folder)
    return transformers.CLIPTokenizer.from_pretrained(folder), len(vocab)


def _text_encoder(vocab_size, act, eos_token_id, projection, seed, layers=3):
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
    cfg = transformers.CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_HIDDEN, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=77, hidden_act=act, projection_dim=PROJECTION,
        bos_token_id=vocab_size - 2, eos_token_id=eos_token_id, pad_token_id=1)
    torch.manual_seed(seed)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return _perturb(cls(cfg), seed)


def _vae(seed, scaling_factor, latents_stats=False):
    import diffusers  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    torch.manual_seed(seed)
    kw = {}
    if latents_stats:
        kw = dict(latents_mean=[0.1, -0.2, 0.05, 0.3], latents_std=[0.9, 1.1, 1.3, 0.7])
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=32, scaling_factor=scaling_factor, **kw)
    return _perturb(vae, seed)


UNETS = {
    "sd1": dict(block_out_channels=(32, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
                cross_attention_dim=TEXT_HIDDEN, norm_num_groups=8),
    "sd2": dict(block_out_channels=(32, 32, 64), layers_per_block=1,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                attention_head_dim=(2, 4, 8), cross_attention_dim=TEXT_HIDDEN, norm_num_groups=16,
                use_linear_projection=True, upcast_attention=True),
    "sdxl": dict(block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                 transformer_layers_per_block=(1, 2), cross_attention_dim=2 * TEXT_HIDDEN, norm_num_groups=8,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
                 projection_class_embeddings_input_dim=PROJECTION + 6 * TIME_DIM),
}

SCHEDULERS = {  # the Hub's scheduler configs for each family (betas, spacing, offsets, prediction type)
    "sd1": ("DDIMScheduler", dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1)),
    "sd2": ("DDIMScheduler", dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                  prediction_type="v_prediction", timestep_spacing="leading")),
    "sdxl": ("EulerDiscreteScheduler", dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            steps_offset=1, timestep_spacing="leading",
                                            interpolation_type="linear", use_karras_sigmas=False)),
}


def make_diffusers_pipeline(kind: str, seed: int = 0):
    """A diffusers StableDiffusion(XL)Pipeline of tiny random components (tokenizers written under a temp dir)."""
    import tempfile  # pylint: disable=import-outside-toplevel

    import diffusers  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    tmp = tempfile.mkdtemp(prefix=f"tok_{kind}_")
    sched_cls, sched_kw = SCHEDULERS[kind]
    scheduler = getattr(diffusers, sched_cls)(**sched_kw)
    torch.manual_seed(seed)
    unet = _perturb(diffusers.UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, **UNETS[kind]),
                    seed + 1)
    if kind == "sdxl":
        tok, n = _tokenizer(os.path.join(tmp, "tokenizer"), pad=ct.EOS_TOKEN)
        tok2, n2 = _tokenizer(os.path.join(tmp, "tokenizer_2"), pad="!")
        # Hub SDXL encoders carry the legacy eos_token_id 2 (pooling at argmax(ids)); keep one of each kind.
        te = _text_encoder(n, "quick_gelu", 2, False, seed + 2)
        te2 = _text_encoder(n2, "gelu", n2 - 1, True, seed + 3)
        return diffusers.StableDiffusionXLPipeline(
            vae=_vae(seed + 4, 0.13025, latents_stats=True), text_encoder=te, text_encoder_2=te2, tokenizer=tok,
            tokenizer_2=tok2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True)
    pad = ct.EOS_TOKEN if kind == "sd1" else "!"
    tok, n = _tokenizer(os.path.join(tmp, "tokenizer"), pad=pad)
    te = _text_encoder(n, "quick_gelu" if kind == "sd1" else "gelu", n - 1, False, seed + 2)
    return diffusers.StableDiffusionPipeline(
        vae=_vae(seed + 4, 0.18215), text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def make_diffusers_folder(path: str, kind: str, seed: int = 0):
    """Writes a tiny `kind` ('sd1' | 'sd2' | 'sdxl') diffusers folder at `path`; returns (path, pipeline)."""
    pipe = make_diffusers_pipeline(kind, seed)
    pipe.save_pretrained(path, safe_serialization=True)
    return path, pipe


def latents_for(batch, height, width, seed=0):
    """Diffusers-layout (NCHW) initial noise for both pipelines (VAE factor 2 in these folders)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, 4, height // 2, width // 2)).astype(np.float32)
