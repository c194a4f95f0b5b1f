"""UNet2DConditionModel parity with diffusers (float32, tiny random configs, non-square latents) and the
diffusers weight/config mapping (mosaicjax/checkpoints/diffusers_unet.py).

Each reference model gets torch's default init plus random perturbations of every 1-D parameter (norm scales
and biases are 1/0 at init, which would hide a swapped scale/bias or a missing norm).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosaicjax.checkpoints import diffusers_unet
from mosaicjax.models import unet

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

TOL = 1e-4  # max |ours - diffusers| relative to max |diffusers output|

SD1_TINY = dict(  # SD1.x shape: conv projections, int attention_head_dim (= heads), CrossAttn + Down blocks
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
    down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'), up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
    attention_head_dim=4, cross_attention_dim=32, norm_num_groups=8)
SD1_TINY['layers_per_block'] = 1  # (2 is covered by SDXL_TINY; fewer layers compile faster)
SD2_TINY = dict(  # SD2.x shape: linear projections, per-block head list, upcast_attention, 3 levels
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 32, 64), layers_per_block=1,
    down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
    attention_head_dim=(2, 4, 8), cross_attention_dim=32, norm_num_groups=16, use_linear_projection=True,
    upcast_attention=True)
SDXL_TINY = dict(  # SDXL shape: text_time add_embedding, first block without attention, (1, 2) transformers
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
    down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'), up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'),
    attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), cross_attention_dim=32, norm_num_groups=8,
    use_linear_projection=True, upcast_attention=None, addition_embed_type='text_time',
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8)


def _reference(cfg_dict, seed=0):
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**cfg_dict).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model


def _inputs(cfg_dict, h, w, seed, batch=2, text_len=7):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cfg_dict['in_channels'], h, w)).astype(np.float32)  # NCHW
    ctx = rng.standard_normal((batch, text_len, cfg_dict['cross_attention_dim'])).astype(np.float32)
    t = np.array([17, 931])[:batch]
    added = None
    if cfg_dict.get('addition_embed_type') == 'text_time':
        pooled = cfg_dict['projection_class_embeddings_input_dim'] - 6 * cfg_dict['addition_time_embed_dim']
        added = {'text_embeds': rng.standard_normal((batch, pooled)).astype(np.float32),
                 # SDXL micro-conditioning [h, w, crop_top, crop_left, target_h, target_w] in pixels.
                 'time_ids': np.array([[8 * h, 8 * w, 0, 0, 8 * h, 8 * w],
                                       [1024, 768, 16, 32, 1024, 768]][:batch], np.float32)}
    return x, t, ctx, added


@functools.lru_cache(maxsize=None)
def _forward(cfg):
    """One jitted forward per config (shared across tests). XLA:CPU's backend optimisations are off: they
    triple compile time and a tiny UNet runs in milliseconds either way."""
    model = unet.UNet2DConditionModel(cfg)
    return jax.jit(lambda params, x, t, ctx, added: model.apply({'params': params}, x, t, ctx, added),
                   compiler_options={'xla_backend_optimization_level': 0})


def _ours(cfg, params, x, t, ctx, added):
    out = _forward(cfg)(params, jnp.asarray(x.transpose(0, 2, 3, 1)), t, ctx, added)  # NCHW -> NHWC
    return np.asarray(out).transpose(0, 3, 1, 2)  # NHWC -> NCHW


def _theirs(model, x, t, ctx, added):
    kw = {}
    if added is not None:
        kw['added_cond_kwargs'] = {k: torch.from_numpy(v) for k, v in added.items()}
    with torch.no_grad():
        return model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx), **kw).sample.numpy()


def _check_parity(cfg_dict, shapes, seed=0):
    model = _reference(cfg_dict, seed)
    cfg = diffusers_unet.unet_config_from_diffusers(dict(model.config))
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    params = diffusers_unet.params_from_diffusers(state, cfg)
    for h, w in shapes:
        x, t, ctx, added = _inputs(cfg_dict, h, w, seed)
        ref = _theirs(model, x, t, ctx, added)
        out = _ours(cfg, params, x, t, ctx, added)
        assert out.shape == ref.shape == x.shape
        err = np.abs(out - ref).max() / np.abs(ref).max()
        assert err < TOL, f'{h}x{w}: max abs diff / max abs ref = {err:.2e}'
    # Weight round trip: exact, same keys.
    back = diffusers_unet.params_to_diffusers(params)
    assert set(back) == set(state)
    for k, v in state.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    return model, cfg, params


def test_sd1_parity_non_square_and_odd_latents():
    # 15x22: sides not divisible by 2**num_upsamplers, diffusers upsamples to the skip's size.
    _check_parity(SD1_TINY, [(16, 24), (15, 22)])


def test_sd2_parity_linear_projection_per_block_heads():
    _, cfg, _ = _check_parity(SD2_TINY, [(16, 24)])
    # Heads are attention_head_dim per block (reversed for up blocks); head_dim = channels // heads.
    assert [(s.num_heads, s.head_dim) for s in cfg.down_block_specs()] == [(2, 16), (4, 8), (8, 8)]
    assert [(s.num_heads, s.head_dim) for s in cfg.up_block_specs()] == [(8, 8), (4, 8), (2, 16)]
    assert cfg.mid_block_spec().num_heads == 8


def test_sdxl_parity_text_time_and_transformer_depths():
    _, cfg, _ = _check_parity(SDXL_TINY, [(16, 24)])
    assert [s.transformer_layers for s in cfg.down_block_specs()] == [(1, 1), (2, 2)]
    assert [s.transformer_layers for s in cfg.up_block_specs()] == [(2, 2, 2), (1, 1, 1)]
    assert cfg.mid_block_spec().transformer_layers == (2,)


def test_bf16_remat_and_scalar_timestep():
    model = _reference(SD1_TINY, seed=0)
    cfg = diffusers_unet.unet_config_from_diffusers(dict(model.config))
    params = diffusers_unet.params_from_diffusers(model.state_dict(), cfg)  # from torch tensors
    x, _, ctx, _ = _inputs(SD1_TINY, 16, 24, seed=1)
    ref = _ours(cfg, params, x, np.array([500, 500]), ctx, None)  # float32 program of the SD1 parity test
    fast = dataclasses.replace(cfg, dtype='bfloat16', remat='full')
    out = _ours(fast, params, x, np.array(500), ctx, None)  # a scalar timestep broadcasts over the batch
    assert out.dtype == np.float32  # the noise prediction is float32 for the scheduler
    assert np.abs(out - ref).max() / np.abs(ref).max() < 5e-2  # bf16 compute, float32 params
    # remat wraps every ResnetBlock2D and BasicTransformerBlock (SD1_TINY: 2+1+3+3 resnets, 1+2 transformers).
    jaxpr = jax.make_jaxpr(lambda p: unet.UNet2DConditionModel(fast).apply(
        {'params': p}, jnp.zeros((1, 8, 8, 4)), 1, jnp.zeros((1, 3, 32))))(params)
    assert sum(e.primitive.name in ('checkpoint', 'remat2') for e in jaxpr.jaxpr.eqns) == 12


def test_config_round_trip_through_diffusers():
    for cfg_dict in (SD1_TINY, SD2_TINY, SDXL_TINY):
        cfg = diffusers_unet.unet_config_from_diffusers(cfg_dict)
        exported = diffusers_unet.unet_config_to_diffusers(cfg)
        assert diffusers_unet.unet_config_from_diffusers(exported) == cfg
        # diffusers accepts the export and builds the same parameter names and shapes we map to.
        with torch.device('meta'):
            model = diffusers.UNet2DConditionModel.from_config(exported)
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == diffusers_unet.diffusers_shapes(cfg)
    assert unet.UNetConfig.from_diffusers_dict(SD1_TINY, dtype='bfloat16').compute_dtype == jnp.bfloat16


def test_num_attention_heads_overrides_attention_head_dim():
    cfg = unet.UNetConfig(**dict(SD2_TINY, attention_head_dim=64, num_attention_heads=(2, 4, 8)))
    ref = unet.UNetConfig(**SD2_TINY)
    assert cfg.down_block_specs() == ref.down_block_specs() and cfg.up_block_specs() == ref.up_block_specs()


def test_unsupported_configs_are_rejected():
    with pytest.raises(ValueError, match='encoder_hid_dim'):
        diffusers_unet.unet_config_from_diffusers(dict(SD1_TINY, encoder_hid_dim=8))
    with pytest.raises(ValueError, match='block types'):
        unet.UNetConfig(**dict(SD1_TINY, down_block_types=('AttnDownBlock2D', 'DownBlock2D')))
    with pytest.raises(ValueError, match='text_time'):
        unet.UNetConfig(**dict(SD1_TINY, addition_embed_type='text_time'))
    model = _reference(SD1_TINY)
    cfg = diffusers_unet.unet_config_from_diffusers(dict(model.config))
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    del state['conv_in.bias']
    state['extra.weight'] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match='missing conv_in.bias'):
        diffusers_unet.params_from_diffusers(state, cfg)


SDXL_BASE_CONFIG = {  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    '_class_name': 'UNet2DConditionModel', '_diffusers_version': '0.19.0.dev0', 'act_fn': 'silu',
    'addition_embed_type': 'text_time', 'addition_embed_type_num_heads': 64, 'addition_time_embed_dim': 256,
    'attention_head_dim': [5, 10, 20], 'block_out_channels': [320, 640, 1280], 'center_input_sample': False,
    'class_embed_type': None, 'class_embeddings_concat': False, 'conv_in_kernel': 3, 'conv_out_kernel': 3,
    'cross_attention_dim': 2048, 'cross_attention_norm': None,
    'down_block_types': ['DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'], 'downsample_padding': 1,
    'dual_cross_attention': False, 'encoder_hid_dim': None, 'encoder_hid_dim_type': None, 'flip_sin_to_cos': True,
    'freq_shift': 0, 'in_channels': 4, 'layers_per_block': 2, 'mid_block_only_cross_attention': None,
    'mid_block_scale_factor': 1, 'mid_block_type': 'UNetMidBlock2DCrossAttn', 'norm_eps': 1e-05,
    'norm_num_groups': 32, 'num_attention_heads': None, 'num_class_embeds': None, 'only_cross_attention': False,
    'out_channels': 4, 'projection_class_embeddings_input_dim': 2816, 'resnet_out_scale_factor': 1.0,
    'resnet_skip_time_act': False, 'resnet_time_scale_shift': 'default', 'sample_size': 128,
    'time_cond_proj_dim': None, 'time_embedding_act_fn': None, 'time_embedding_dim': None,
    'time_embedding_type': 'positional', 'timestep_post_act': None, 'transformer_layers_per_block': [1, 2, 10],
    'up_block_types': ['CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'], 'upcast_attention': None,
    'use_linear_projection': True}


def test_full_size_sdxl_shapes_match_diffusers():
    cfg = diffusers_unet.unet_config_from_diffusers(SDXL_BASE_CONFIG)
    with torch.device('meta'):
        model = diffusers.UNet2DConditionModel.from_config(SDXL_BASE_CONFIG)
    ref = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours = diffusers_unet.diffusers_shapes(cfg)  # jax.eval_shape: no memory
    assert ours == ref
    assert sum(int(np.prod(s)) for s in ours.values()) == 2_567_463_684
    assert {(s.num_heads, s.head_dim) for s in cfg.down_block_specs()} == {(5, 64), (10, 64), (20, 64)}


def test_full_size_sd1_sd2_heads():
    common = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768)
    sd1 = unet.UNetConfig(**common, attention_head_dim=8)  # SD1.x: 8 heads, head_dim 40/80/160
    assert [(s.num_heads, s.head_dim) for s in sd1.down_block_specs()] == [(8, 40), (8, 80), (8, 160), (8, 160)]
    sd2 = unet.UNetConfig(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024,
                          attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)  # SD2.x: head_dim 64
    assert {s.head_dim for s in sd2.down_block_specs() + sd2.up_block_specs()} == {64}
