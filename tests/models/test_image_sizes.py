"""The image size family (experiments/imageai/{sd15,sd21,sdxl}.gin and architectures/), image_sizing and the params
CLI for image configs. Full-size models are only built with jax.eval_shape (no parameter memory)."""
import json
import os
import re
import subprocess
import sys

import gin
import pytest

from mosaicjax import config as config_lib
from mosaicjax.models import image_sizing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARCH = os.path.join(ROOT, "experiments", "imageai", "architectures")
# Published parameter counts (diffusers' UNet2DConditionModel / AutoencoderKL and transformers' CLIP text models of
# the Hub's SD1.5, SD2.1 and SDXL base 1.0; the same numbers as counted on torch's meta device below).
PUBLISHED = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd21": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
             "text_encoder_2": 694_659_840},
}


@pytest.fixture(scope="module")
def abstract():
    """{size: (Architecture, eval_shape'd params)}, traced once for the module (SDXL's UNet takes seconds)."""
    out = {}
    for size in PUBLISHED:
        arch = image_sizing.load_architecture(os.path.join(ARCH, size))
        out[size] = (arch, image_sizing.abstract_params(arch))
    return out


@pytest.mark.parametrize("size", sorted(PUBLISHED))
def test_counts_equal_the_published_models(size, abstract):
    _, params = abstract[size]
    counts = image_sizing.component_counts(params)
    assert {k: v for k, v in counts.items() if k != "total"} == PUBLISHED[size]


def test_counts_equal_diffusers_and_transformers_on_the_meta_device():
    """The architecture files are the published ones: the reference libraries build the same-sized models."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    for size, want in PUBLISHED.items():
        index = json.load(open(os.path.join(ARCH, size, "model_index.json")))
        with torch.device("meta"):
            for name, n in want.items():
                cfg = json.load(open(os.path.join(ARCH, size, name, "config.json")))
                if name == "unet":
                    model = diffusers.UNet2DConditionModel.from_config(cfg)
                elif name == "vae":
                    model = diffusers.AutoencoderKL.from_config(cfg)
                else:
                    model = getattr(transformers, index[name][1])(
                        transformers.CLIPTextConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")}))
                assert sum(p.numel() for p in model.parameters()) == n, (size, name)


@pytest.mark.parametrize("size", sorted(PUBLISHED))
def test_size_configs_point_at_their_architecture_and_plan_memory(size, abstract):
    config_lib.parse([os.path.join(ROOT, "experiments", "imageai", f"{size}.gin")], [])
    try:
        from mosaicjax.data import images as images_lib
        from mosaicjax.diffusion import training as training_lib
        from mosaicjax.trainer.config import TrainConfig
        from mosaicjax.trainer.tasks import image as image_task
        image_cfg, data_cfg = image_task.ImageConfig(), images_lib.ImageDataConfig()
        dcfg, train = training_lib.DiffusionConfig(), TrainConfig()
    finally:
        gin.clear_config()
    arch, params = abstract[size]
    assert image_sizing.resolve_path(image_cfg.init_from) == arch.path
    kw = dict(batch_size=train.batch_size, resolution=data_cfg.resolution, buckets=data_cfg.buckets,
              size_multiple=data_cfg.size_multiple, grad_accum_steps=1, diffusion_cfg=dcfg)
    dp = image_sizing.memory_plan(arch, params, {"data": -1}, 8, **kw)
    fsdp = image_sizing.memory_plan(arch, params, {"data": 1, "fsdp": -1}, 8, **kw)
    unet_bytes = 4 * PUBLISHED[size]["unet"]
    total_bytes = 4 * sum(PUBLISHED[size].values())
    # Data parallel: every device holds all weights (float32), AdamW's two moments, EMA and gradients of the UNet.
    assert dp.params == total_bytes and dp.ema == dp.gradients == unet_bytes and dp.optimizer >= 2 * unet_bytes
    assert dp.micro_batch == train.batch_size // 8 and dp.vae_activations > 0 and dp.unet_activations > 0
    # FSDP over 8 devices: the UNet's dense kernels ('embed') and conv kernels ('conv_in') are split 8 ways, so its
    # parameters and optimizer state shrink to about an eighth (norms, biases and conv_in's 4 channels stay whole).
    # Frozen components stay replicated.
    assert fsdp.component_params["unet"] < 0.13 * unet_bytes and fsdp.optimizer < 0.13 * dp.optimizer
    assert fsdp.params - fsdp.component_params["unet"] == total_bytes - unet_bytes
    # The latent cache removes the VAE encoder's activations; remat='none' keeps much more for the backward.
    cached = image_sizing.memory_plan(arch, params, {"data": -1}, 8, cached=True, **kw)
    assert cached.vae_activations == 0 and cached.unet_activations == dp.unet_activations
    none = image_sizing.memory_plan(arch, params, {"data": -1}, 8, **{**kw, "diffusion_cfg": training_lib.
                                    DiffusionConfig(remat="none", compute_dtype=dcfg.compute_dtype)})
    assert none.unet_activations > 3 * dp.unet_activations


def test_params_cli_reports_an_image_config():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "mosaicjax.params", "--gin_file=experiments/imageai/sd15.gin",
                           "--gin_param=mesh.shape={'data': 2, 'fsdp': 4}", "--num_devices=8",
                           "--device_memory_gib=80"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    total = sum(PUBLISHED["sd15"].values())
    assert re.fullmatch(r"total_params=(\d+) active_params=(\d+)", lines[0]).groups() == (str(total), str(total))
    assert lines[1] == f"trained_params={PUBLISHED['sd15']['unet']}"
    assert re.search(r"^unet\s+859,520,964\s+.*yes$", proc.stdout, re.M)
    assert re.search(r"^vae\s+83,653,863\s+.*no \(frozen\)$", proc.stdout, re.M)
    assert "mesh {'data': 2, 'fsdp': 4, 'expert': 1, 'tensor': 1}" in proc.stdout
    m = re.search(r"memory_per_device_bytes=(\d+) params_bytes=(\d+) optimizer_bytes=(\d+) ema_bytes=(\d+) "
                  r"gradients_bytes=(\d+) activations_bytes=(\d+) fits=(yes|no)", proc.stdout)
    assert m and m.group(7) == "yes"
    parts = [int(x) for x in m.groups()[1:6]]
    assert int(m.group(1)) == sum(parts)
