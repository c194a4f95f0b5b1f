"""Model size and per-device training memory of an image (latent diffusion) config, without devices or weights.

The model is what `image.init_from` points at: a diffusers folder, a mosaicjax image checkpoint, a training workdir,
or an architecture-only folder such as experiments/imageai/architectures/sdxl/ (the published config.json files of
SD1.5, SD2.1 and SDXL base, no weights). Counts come from `jax.eval_shape` of each component's init (the same trees
the trainer builds), so they cannot drift from the models; they equal the published counts (tests/models/
test_image_sizes.py checks them against diffusers and transformers instantiated on torch's meta device).

Per-device bytes follow the image task's layout (mosaicjax/trainer/tasks/image.py): UNet parameters are sharded by
their logical axes through the rules table, every other component is replicated; the train state holds all
components in float32 (the master copy), AdamW's mu and nu and an EMA of the trained components, and the step
holds their gradients (twice with gradient accumulation: accumulator plus one microbatch's).

Activations (an estimate; a = compute dtype bytes, b = images per device per microbatch, per resolution level the
latent tokens N = h * w, channels C, heads H, text length L = 77):
  ResnetBlock2D (C_in -> C)            internals a * N * (2 C_in + 2 C)    what the backward reads: the input and
                                       each conv's input and output (norm and activation fuse into the convs)
  BasicTransformerBlock (C, H heads)   internals a * N * 21 C + 4 * H * N * (N + L)
                                       (norm outputs, q/k/v/attention outputs, GEGLU 8C + 4C; float32 attention
                                       probabilities; 'cudnn' attention keeps only row statistics)
  kept for the backward pass, by diffusion.remat:
    'none'   every block's internals
    'dots'   matmul and conv outputs (a * N * 2C per resnet, a * N * 15C + a * H * N * (N + L) per transformer block)
    'full'   each block's input only (a * N * C_in)
  plus, always: each Transformer2D's norm/proj_in/proj_out/residual (a * N * 4C), the down/upsampling convs, and
  twice the largest block's internals (the block being recomputed and its gradient).
  VAE encoder (frozen, forward only, float32; zero with image_data.cache_dir): the largest level's three live
  tensors 4 * 3 * H_img * W_img * C_0 ... or its mid-block attention scores (N_lat^2 * 8), whichever is larger.
  Text encoders (forward only, 77 tokens): negligible and not counted.
Multiplied by b. Calibration against XLA:CPU's `compiled.memory_analysis().temp_size_in_bytes` of a UNet forward +
backward (3 levels of 64/128/128 channels, 4 heads, 32x32 latents, batch 2, float32): remat='none' estimate 393 MiB
vs XLA 284 MiB (XLA fuses and reuses more than the estimate assumes); remat='full' estimate 118 MiB vs XLA 285 MiB —
XLA:CPU kept as much as without remat on that small config, so on CPU read 'full' as a lower bound. Not yet
checked against GPU/TPU compiles. A planning number, like the DBRX estimate (mosaicjax/models/sizing.py).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

from mosaicjax.models import sizing
from mosaicjax.parallel import mesh as mesh_lib
from mosaicjax.parallel import rules as rules_lib

GIB = sizing.GIB
TEXT_LEN = 77


@dataclasses.dataclass
class Architecture:
    """An image model's description: model_index.json and every component's config.json."""
    path: str
    model_index: dict
    configs: dict  # component -> config.json dict

    @property
    def components(self) -> list[str]:
        return list(self.configs)

    def with_projection(self, name: str) -> bool:
        return (self.model_index.get(name) or [None, None])[1] == "CLIPTextModelWithProjection"


def resolve_path(path: str) -> str:
    """image.init_from as the trainer reads it: as given, else relative to the repository root."""
    from mosaicjax import config as config_lib  # pylint: disable=import-outside-toplevel
    if not os.path.exists(path):
        in_repo = os.path.join(os.path.dirname(config_lib.EXPERIMENTS_DIR), path)
        if os.path.exists(in_repo):
            return os.path.abspath(in_repo)
    return os.path.abspath(path)


def load_architecture(path: str) -> Architecture:
    """Configs of a diffusers / architecture folder, a mosaicjax image checkpoint or an image training workdir."""
    from mosaicjax.checkpoints import diffusers_io  # pylint: disable=import-outside-toplevel
    path = resolve_path(path)
    folder = path
    if diffusers_io.is_training_workdir(path):
        folder = os.path.join(path, "model")
    if diffusers_io.is_image_checkpoint(path):
        meta = diffusers_io.read_meta(path)
        model_index, names = meta["model_index"], meta["components"]
    elif os.path.isfile(os.path.join(folder, "model_index.json")):
        with open(os.path.join(folder, "model_index.json")) as f:
            model_index = json.load(f)
        names = diffusers_io._components(model_index)  # pylint: disable=protected-access
    else:
        raise FileNotFoundError(f"{path}: no model_index.json (not a diffusers folder, image checkpoint or "
                                "image training workdir)")
    configs = {}
    for n in names:
        with open(os.path.join(folder, n, "config.json")) as f:
            configs[n] = json.load(f)
    return Architecture(path, model_index, configs)


def _unet_config(arch: Architecture, **overrides):
    from mosaicjax.checkpoints import diffusers_unet  # pylint: disable=import-outside-toplevel
    return diffusers_unet.unet_config_from_diffusers(arch.configs["unet"], **overrides)


def abstract_params(arch: Architecture) -> dict[str, list[sizing.ParamInfo]]:
    """{component: [ParamInfo]} from eval_shape (UNet with its logical axes; the others unannotated here since
    the image task replicates them)."""
    # pylint: disable=import-outside-toplevel
    from mosaicjax.checkpoints import diffusers_parts as parts
    from mosaicjax.models import unet as unet_lib
    out = {}
    for name, cfg in arch.configs.items():
        if name == "unet":
            ucfg = _unet_config(arch)
            boxed = jax.eval_shape(lambda: unet_lib.UNet2DConditionModel(ucfg).init(
                jax.random.key(0), **unet_lib.dummy_inputs(ucfg)))["params"]
        elif name == "vae":
            boxed = parts.vae_param_shapes(parts.vae_config_from_diffusers(cfg))
        else:
            boxed = parts.clip_param_shapes(parts.clip_config_from_hf(cfg), arch.with_projection(name))
        infos = []
        leaves = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
        for key_path, leaf in leaves:
            path = "/".join(str(getattr(k, "key", k)) for k in key_path)
            if isinstance(leaf, nn.Partitioned):
                value, logical = leaf.value, tuple(leaf.names)
            else:
                value, logical = leaf, (None,) * len(leaf.shape)
            infos.append(sizing.ParamInfo(path, name, tuple(value.shape), np.dtype("float32"), logical))
        out[name] = infos
    return out


def component_counts(params: Mapping[str, list[sizing.ParamInfo]]) -> dict[str, int]:
    counts = {n: sum(math.prod(p.shape) for p in ps) for n, ps in params.items()}
    counts["total"] = sum(counts.values())
    return counts


def trained_components(diffusion_cfg) -> tuple[str, ...]:
    """What the image task trains (ImageTask.trained)."""
    if diffusion_cfg.train_vae:
        return ("vae",)
    return ("unet", "text_encoder") if diffusion_cfg.train_text_encoder else ("unet",)


# ------------------------------------------------------------------------------------------------ activations

def _levels(ucfg, h: int, w: int):
    """(down, mid, up) blocks as (tokens, channels in, BlockSpec), walking the resolutions like the UNet does."""
    blocks = []
    c_in = ucfg.block_out_channels[0]
    for spec in ucfg.down_block_specs():
        blocks.append((h * w, c_in, spec))
        c_in = spec.out_channels
        if spec.resample:
            h, w = -(-h // 2), -(-w // 2)
    mid = ucfg.mid_block_spec()
    if mid is not None:
        blocks.append((h * w, c_in, mid))
    for spec in ucfg.up_block_specs():
        blocks.append((h * w, c_in + spec.out_channels, spec))  # the skip connection is concatenated in
        c_in = spec.out_channels
        if spec.resample:
            h, w = 2 * h, 2 * w
    return blocks


def unet_activation_bytes(ucfg, latent_h: int, latent_w: int, *, dtype_bytes: int, remat: str,
                          materialized: bool = True) -> int:
    """The module docstring's estimate for ONE image (multiply by the images per device)."""
    a = dtype_bytes
    saved, peak = 0.0, 0.0
    for n, c_in, spec in _levels(ucfg, latent_h, latent_w):
        c = spec.out_channels
        for layer in range(spec.num_layers):
            cin = c_in if layer == 0 else c
            res = a * n * (2 * cin + 2 * c)
            saved += {"none": res, "dots": a * n * 2 * c, "full": a * n * cin}[remat]
            peak = max(peak, res)
            if spec.cross_attention:
                score = spec.num_heads * n * (n + TEXT_LEN) * (4 if materialized else 0)
                blk = a * n * 21 * c + score
                dots = a * n * 15 * c + (a * spec.num_heads * n * (n + TEXT_LEN) if materialized else 0)
                for _ in range(spec.transformer_layers[layer]):
                    saved += {"none": blk, "dots": dots, "full": a * n * c}[remat]
                    peak = max(peak, blk)
                saved += a * n * 4 * c  # Transformer2D norm, proj_in, proj_out, residual (not rematerialised)
        if spec.resample:
            saved += a * n * c * 2
    c0 = ucfg.block_out_channels[0]
    saved += a * latent_h * latent_w * (3 * c0 + 2 * ucfg.out_channels)  # conv_in, norm_out, act, conv_out
    return int(saved + 2 * peak)


def vae_encode_bytes(vae_cfg, height: int, width: int) -> int:
    """Peak of the frozen VAE encoder's forward pass for ONE image (float32): see the module docstring."""
    peak, h, w = 0, height, width
    for i, c in enumerate(vae_cfg.block_out_channels):
        peak = max(peak, 4 * 3 * h * w * c)
        if i < len(vae_cfg.block_out_channels) - 1:
            h, w = -(-h // 2), -(-w // 2)
    n = h * w
    attention = 8 * n * n if vae_cfg.mid_block_add_attention else 0
    return int(max(peak, attention + 4 * 2 * n * vae_cfg.block_out_channels[-1]))


# ----------------------------------------------------------------------------------------------------- plan

@dataclasses.dataclass(frozen=True)
class ImageMemoryPlan:
    mesh: dict
    num_devices: int
    micro_batch: int  # images per device per microbatch
    params: int
    optimizer: int
    ema: int
    gradients: int
    unet_activations: int
    vae_activations: int
    component_params: dict  # component -> parameter bytes per device
    device_memory: int | None = None
    problems: tuple = ()

    @property
    def activations(self) -> int:
        return self.unet_activations + self.vae_activations

    @property
    def total(self) -> int:
        return self.params + self.optimizer + self.ema + self.gradients + self.activations

    @property
    def fits(self) -> bool | None:
        if not self.device_memory:
            return None
        return self.total <= (1.0 - sizing.HEADROOM) * self.device_memory


def memory_plan(arch: Architecture, params: Mapping[str, list], mesh_shape: Mapping[str, int], num_devices: int,
                *, batch_size: int, resolution: int, buckets: bool, size_multiple: int, grad_accum_steps: int,
                diffusion_cfg, cached: bool = False, rules=None, tx=None,
                device_memory: int | None = None) -> ImageMemoryPlan:
    """Per-device bytes of an image training step on a mesh of `num_devices` (none need exist).

    The activation estimate takes the largest bucket (by area) of image_data's sizes.
    Raises mesh.MeshError when the mesh shape does not fit num_devices.
    """
    # pylint: disable=import-outside-toplevel
    import optax
    from mosaicjax.checkpoints import diffusers_parts as parts
    from mosaicjax.data import images as images_lib
    sizes = mesh_lib.resolve_shape(mesh_shape, num_devices)
    rules = rules_lib.get_rules() if rules is None else rules
    tx = optax.adamw(1e-4) if tx is None else tx
    trained = trained_components(diffusion_cfg)
    replicated = dict.fromkeys(sizes, 1)
    local, by_component = {}, {}
    for name, infos in params.items():
        mesh_sizes = sizes if name == "unet" else replicated
        local[name] = [sizing.local_shape(p.shape, p.logical, mesh_sizes, rules, whole_if_indivisible=True)
                       if name == "unet" else p.shape for p in infos]
        by_component[name] = sum(math.prod(s) * 4 for s in local[name])
    param_bytes = sum(by_component.values())
    trained_bytes = sum(by_component[n] for n in trained if n in by_component)
    opt = sum(sizing._optimizer_bytes(tx, params[n], local[n])  # pylint: disable=protected-access
              for n in trained if n in params)
    shards = math.prod(sizes[a] for a in mesh_lib.BATCH_AXES)
    accum = max(int(grad_accum_steps), 1)
    micro = max(1, -(-batch_size // (shards * accum)))
    hw = max(images_lib.bucket_sizes(resolution, size_multiple, buckets), key=lambda s: s[0] * s[1])
    vae_cfg = parts.vae_config_from_diffusers(arch.configs["vae"])
    f = vae_cfg.downsample_factor
    a = np.dtype(diffusion_cfg.compute_dtype).itemsize
    if diffusion_cfg.train_vae:  # VAE pre-training: encoder + decoder forward and backward, no remat
        unet_act = 3 * 2 * vae_encode_bytes(vae_cfg, *hw)
    else:
        ucfg = _unet_config(arch)
        unet_act = unet_activation_bytes(ucfg, hw[0] // f, hw[1] // f, dtype_bytes=a, remat=diffusion_cfg.remat,
                                         materialized=ucfg.attention_impl != "cudnn")
    vae_act = 0 if (cached or diffusion_cfg.train_vae) else vae_encode_bytes(vae_cfg, *hw)
    problems = []
    if batch_size % (shards * accum):
        problems.append(f"train.batch_size={batch_size} is not divisible by data x fsdp x expert ({shards}) times "
                        f"train.grad_accum_steps={accum}")
    return ImageMemoryPlan(
        mesh=sizes, num_devices=num_devices, micro_batch=micro, params=param_bytes, optimizer=opt,
        ema=trained_bytes, gradients=trained_bytes * (2 if accum > 1 else 1), unet_activations=micro * unet_act,
        vae_activations=micro * vae_act, component_params=by_component, device_memory=device_memory,
        problems=tuple(problems))


# ----------------------------------------------------------------------------------------------------- text

def format_counts(arch: Architecture, counts: Mapping[str, int], trained: tuple[str, ...]) -> str:
    """First line `total_params=N active_params=N` (a dense model: every parameter is active), then the table."""
    total = counts["total"]
    n_trained = sum(counts[n] for n in trained if n in counts)
    lines = [f"total_params={total} active_params={total}", f"trained_params={n_trained}",
             f"{arch.model_index.get('_class_name', 'image model')} from {arch.path}", "",
             f"{'component':<16}{'params':>16}{'% total':>9}  trained"]
    for n in arch.components:
        lines.append(f"{n:<16}{counts[n]:>16,}{100 * counts[n] / max(total, 1):>8.1f}%  "
                     f"{'yes' if n in trained else 'no (frozen)'}")
    lines.append(f"{'total':<16}{total:>16,}{'':>9}  {n_trained:,} trained ({_human(n_trained)} of "
                 f"{_human(total)})")
    return "\n".join(lines)


def format_plan(plan: ImageMemoryPlan, *, batch_size: int, grad_accum_steps: int, diffusion_cfg,
                cached: bool, hw: tuple[int, int]) -> str:
    gib = lambda n: f"{n / GIB:10.2f} GiB"  # noqa: E731
    fits = {None: "unknown (pass --device_memory_gib)", True: "yes", False: "no"}[plan.fits]
    lines = [
        f"memory per device: {plan.num_devices} devices, mesh {plan.mesh}, batch {batch_size} images at "
        f"{hw[1]}x{hw[0]} (largest bucket; grad_accum_steps={grad_accum_steps}: {plan.micro_batch} image(s) per "
        f"device per microbatch), remat={diffusion_cfg.remat}, compute dtype={diffusion_cfg.compute_dtype}, "
        f"params float32",
        f"  {'parameters':<22}{gib(plan.params)}   (all components; the UNet sharded by the rules, others replicated)",
        f"  {'optimizer state':<22}{gib(plan.optimizer)}   (AdamW mu + nu of the trained components)",
        f"  {'EMA':<22}{gib(plan.ema)}",
        f"  {'gradients':<22}{gib(plan.gradients)}",
        f"  {'activations (est.)':<22}{gib(plan.activations)}   (trained model {plan.unet_activations / GIB:.2f} GiB"
        f" + VAE encode {plan.vae_activations / GIB:.2f} GiB{', latent cache: no encoders' if cached else ''})",
        f"  {'total':<22}{gib(plan.total)}",
    ]
    if plan.device_memory:
        lines.append(f"  {'device memory':<22}{gib(plan.device_memory)}   fits (<= {100 * (1 - sizing.HEADROOM):.0f}%):"
                     f" {fits} ({100 * plan.total / plan.device_memory:.0f}% used)")
    else:
        lines.append(f"  fits: {fits}")
    lines.extend(f"  the trainer would refuse this layout: {msg}" for msg in plan.problems)
    lines.append("  parameters per device by component: " + ", ".join(
        f"{c} {b / GIB:.2f} GiB" for c, b in plan.component_params.items()))
    fits_word = {None: "unknown", True: "yes", False: "no"}[plan.fits]
    lines.append(f"memory_per_device_bytes={plan.total} params_bytes={plan.params} optimizer_bytes={plan.optimizer} "
                 f"ema_bytes={plan.ema} gradients_bytes={plan.gradients} activations_bytes={plan.activations} "
                 f"fits={fits_word}")
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def report(image_cfg, data_cfg, diffusion_cfg, train_cfg, tx=None):
    """(counts text, plan(mesh_shape, num_devices, device_memory) -> (plan text, ImageMemoryPlan)) for the params
    CLI; the parameter trees are traced once for both. plan() raises mesh.MeshError for a mesh that does not fit."""
    if not image_cfg.init_from:
        raise ValueError("image.init_from is not set: bind it to a diffusers folder, a mosaicjax image checkpoint "
                         "or an architecture folder such as experiments/imageai/architectures/sdxl")
    from mosaicjax.data import images as images_lib  # pylint: disable=import-outside-toplevel
    arch = load_architecture(image_cfg.init_from)
    params = abstract_params(arch)
    trained = trained_components(diffusion_cfg)
    cached = bool(data_cfg.cache_dir)

    def plan(mesh_shape, num_devices: int, device_memory: int | None = None):
        p = memory_plan(arch, params, mesh_shape, num_devices, batch_size=train_cfg.batch_size,
                        resolution=data_cfg.resolution, buckets=data_cfg.buckets, size_multiple=data_cfg.size_multiple,
                        grad_accum_steps=train_cfg.grad_accum_steps, diffusion_cfg=diffusion_cfg, cached=cached,
                        tx=tx, device_memory=device_memory)
        hw = max(images_lib.bucket_sizes(data_cfg.resolution, data_cfg.size_multiple, data_cfg.buckets),
                 key=lambda s: s[0] * s[1])
        return format_plan(p, batch_size=train_cfg.batch_size, grad_accum_steps=train_cfg.grad_accum_steps,
                           diffusion_cfg=diffusion_cfg, cached=cached, hw=hw), p

    return format_counts(arch, component_counts(params), trained), plan
