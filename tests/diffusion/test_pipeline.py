"""ImagePipeline against diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline on tiny random folders.

Same initial latents into both, negative prompts, a non-square size, a few steps, float32: the images must agree
to float32 rounding. Also: seeds, no recompilation, the mosaicjax checkpoint and diffusers export round trip,
8 host devices == 1 device, and the errors users see.
"""
import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import image_fixtures as F  # noqa: E402  pylint: disable=wrong-import-position

from mosaicjax.checkpoints import diffusers_io  # noqa: E402
from mosaicjax.diffusion import pipeline as P  # noqa: E402

H, W = 24, 40  # non-square; latents 12 x 20
PROMPTS = ["a photo of an astronaut riding a horse", "a red fox in the snow, highly detailed"]
NEGATIVES = ["blurry, low quality", "watermark, text"]
TOL = 2e-5  # images live in [0, 1]; float32 rounding differences through UNet + VAE stay around 1e-6

torch.set_num_threads(1)  # the machine is shared; torch's default threads only add contention here


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_models")
    out = {}
    for kind in ("sd1", "sd2", "sdxl"):
        path, ref = F.make_diffusers_folder(str(root / kind), kind)
        ref.set_progress_bar_config(disable=True)
        out[kind] = (path, ref)
    return out


@pytest.fixture(scope="module")
def sd1(folders):
    return P.load_image_pipeline(folders["sd1"][0])


def _reference(ref, latents, **kw):
    kw = dict(kw)
    if kw.get("negative_prompt") is None:
        kw.pop("negative_prompt", None)
    with torch.no_grad():
        return ref(latents=torch.from_numpy(latents), output_type="np", **kw).images


def test_sd1_matches_diffusers_with_guidance_rescale_and_no_recompile(folders, sd1):
    _, ref = folders["sd1"]
    latents = F.latents_for(2, H, W, seed=1)
    kw = dict(prompt=PROMPTS, negative_prompt=NEGATIVES, height=H, width=W, num_inference_steps=3,
              guidance_scale=6.0, guidance_rescale=0.7)
    want = _reference(ref, latents, **kw)
    got = sd1(**kw, latents=latents, output_type="np")
    assert got.shape == (2, H, W, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    assert want.std() > 0.05  # a non-degenerate image
    # Same shapes again (other prompts, guidance, seed-drawn latents): no new program is compiled.
    compiles = sd1.num_compiles
    again = sd1(["a red cube", "a blue sphere"], negative_prompt="blurry", size=f"{W}x{H}", num_inference_steps=3,
                guidance_scale=3.0, guidance_rescale=0.2, seed=5, output_type="np")
    assert sd1.num_compiles == compiles
    assert again.shape == (2, H, W, 3)


def test_seed_determinism_pil_output_and_images_per_prompt(folders, sd1):
    kw = dict(prompt=PROMPTS, negative_prompt=NEGATIVES, height=H, width=W, num_inference_steps=3,
              guidance_scale=6.0, guidance_rescale=0.7)
    a = sd1(**kw, seed=123, output_type="np")
    b = sd1(**kw, seed=123, output_type="np")
    c = sd1(**kw, seed=124, output_type="np")
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    images = sd1(**kw, seed=123, output_type="pil")
    assert len(images) == 2 and images[0].size == (W, H) and images[0].mode == "RGB"
    np.testing.assert_array_equal(np.asarray(images[1]), (a[1] * 255).round().astype(np.uint8))
    # One prompt, two images (the same compiled program: batch 2).
    latents = F.latents_for(2, H, W, seed=8)
    kw = dict(kw, prompt=PROMPTS[:1], negative_prompt=NEGATIVES[:1], num_images_per_prompt=2)
    want = _reference(folders["sd1"][1], latents, **kw)
    np.testing.assert_allclose(sd1(**kw, latents=latents, output_type="np"), want, atol=TOL, rtol=0)


def test_sd2_v_prediction_with_dpm_solver_matches_diffusers(folders):
    path, ref = folders["sd2"]
    ref.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(ref.scheduler.config)
    pipe = P.load_image_pipeline(path)
    latents = F.latents_for(1, H, W, seed=2)
    kw = dict(prompt=PROMPTS[:1], negative_prompt=NEGATIVES[:1], height=H, width=W, num_inference_steps=4,
              guidance_scale=7.5)
    want = _reference(ref, latents, **kw)
    got = pipe(**kw, latents=latents, scheduler="dpmpp_2m", output_type="np")
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    # The SD2 tokenizer pads with '!' (id 0), not the end token.
    assert pipe.tokenizers[0].pad_id == 0


def test_sdxl_matches_diffusers_zero_and_given_negatives(folders):
    path, ref = folders["sdxl"]
    pipe = P.load_image_pipeline(path)
    assert pipe.is_sdxl and pipe.force_zeros_for_empty_prompt
    latents = F.latents_for(2, H, W, seed=3)
    for negative in (None, NEGATIVES):  # None: zero unconditional embeddings (force_zeros_for_empty_prompt)
        kw = dict(prompt=PROMPTS, negative_prompt=negative, height=H, width=W, num_inference_steps=3,
                  guidance_scale=5.0)
        want = _reference(ref, latents, **kw)
        got = pipe(**kw, latents=latents, scheduler="euler", output_type="np")
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0, err_msg=f"negative_prompt={negative}")
    assert pipe.num_compiles == 1
    # encode_prompt: both encoders' penultimate states, concatenated; pooled from the projection encoder.
    context, pooled = pipe.encode_prompt(PROMPTS, return_pooled=True)
    with torch.no_grad():
        (want_ctx, _, want_pooled, _) = ref.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                          do_classifier_free_guidance=False)
    np.testing.assert_allclose(context, want_ctx.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(pooled, want_pooled.numpy(), atol=1e-5, rtol=0)


def test_eight_devices_match_one(sd1):
    """The batch is split over a data mesh (padded 2 -> 8 rows); the images equal the one-device ones."""
    if len(jax.devices()) < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py)")
    mesh = jax.make_mesh((8,), ("data",), devices=jax.devices()[:8])
    sharded = P.ImagePipeline(sd1.model, mesh=mesh)
    kw = dict(prompt=PROMPTS, negative_prompt=NEGATIVES, height=H, width=W, num_inference_steps=3,
              guidance_scale=6.0, guidance_rescale=0.7, output_type="np")
    latents = F.latents_for(2, H, W, seed=4)
    one = sd1(**kw, latents=latents)
    eight = sharded(**kw, latents=latents)
    np.testing.assert_allclose(eight, one, atol=1e-6, rtol=0)
    (prog,) = sharded._programs.values()  # pylint: disable=protected-access
    assert prog.output_shardings.spec[0] == "data" and prog.output_shardings.num_devices == 8
    # Seeds draw the same latents whatever the device count (same program: no new compile).
    np.testing.assert_allclose(sharded(**kw, seed=9), sd1(**kw, seed=9), atol=1e-6, rtol=0)
    assert sharded.num_compiles == 1


def test_checkpoint_and_export_round_trip(folders, tmp_path):
    src, _ = folders["sdxl"]
    ckpt = diffusers_io.convert(src, str(tmp_path / "ckpt"))
    assert diffusers_io.is_image_checkpoint(ckpt)
    out = diffusers_io.convert(ckpt, str(tmp_path / "export"), to_hf=True)
    # Every tensor of every component comes back bit for bit.
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a = diffusers_io.component_weights(os.path.join(src, name))
        b = diffusers_io.component_weights(os.path.join(out, name))
        strip = lambda sd: {k.removeprefix("text_model."): v for k, v in sd.items()  # noqa: E731
                            if k != "text_model.embeddings.position_ids"}
        a, b = strip(a), strip(b)
        assert sorted(a) == sorted(b), name
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{name}.{k}")
    with open(os.path.join(out, "model_index.json")) as f:
        assert json.load(f)["force_zeros_for_empty_prompt"] is True
    # diffusers loads the export, and it generates what it generates from the source folder.
    latents = F.latents_for(1, H, W, seed=6)
    kw = dict(prompt=PROMPTS[:1], height=H, width=W, num_inference_steps=2, guidance_scale=4.0)
    images = []
    for folder in (out, src):
        reloaded = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
        reloaded.set_progress_bar_config(disable=True)
        images.append(_reference(reloaded, latents, **kw))
    np.testing.assert_array_equal(images[0], images[1])
    # Our loader reads the checkpoint to the same text embeddings as the folder (cheap: no sampler compile).
    a = P.load_image_pipeline(ckpt).encode_prompt(PROMPTS)
    b = P.load_image_pipeline(src).encode_prompt(PROMPTS)
    np.testing.assert_array_equal(a, b)


def test_user_errors(folders, sd1, tmp_path):
    with pytest.raises(ValueError, match="multiples of 4"):
        sd1("x", height=H + 2, width=W, num_inference_steps=1)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        sd1("x", size="big", num_inference_steps=1)
    with pytest.raises(ValueError, match="contradicts"):
        sd1("x", size="40x24", height=32, num_inference_steps=1)
    with pytest.raises(ValueError, match="latents must have shape"):
        sd1("x", height=H, width=W, num_inference_steps=1, latents=np.zeros((1, 4, 3, 3), np.float32))
    with pytest.raises(ValueError, match="scheduler must be one of"):
        sd1("x", height=H, width=W, num_inference_steps=1, scheduler="pndm")
    with pytest.raises(ValueError, match="negative prompts"):
        sd1(["a", "b"], negative_prompt=["c"], height=H, width=W, num_inference_steps=1)
    assert P.parse_size("landscape") == (1280, 768) and P.parse_size("768x1280") == (768, 1280)
    # Pickled weights are refused with a message that says why.
    bad = tmp_path / "pickled"
    shutil.copytree(folders["sd1"][0], bad)
    os.remove(bad / "vae" / "diffusion_pytorch_model.safetensors")
    torch.save({}, bad / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors only"):
        diffusers_io.load_image_model(str(bad))
    with pytest.raises(FileNotFoundError, match="neither a diffusers folder"):
        diffusers_io.load_image_model(str(tmp_path))


def test_public_api_and_scheduler_default(folders):
    import mosaicjax
    pipe = mosaicjax.load_image_pipeline(folders["sd1"][0])
    assert isinstance(pipe, P.ImagePipeline)
    assert pipe.resolve_scheduler(None) == "ddim"  # the folder's DDIMScheduler
    assert pipe.default_size == 32  # unet sample_size 16 x VAE factor 2
