"""VAE (AutoencoderKL): parity with diffusers on small random configs (float32, non-square images), exact
weight round trips (current and legacy attention names), configs, latent scaling, full-size shapes."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as DiffusersVAE

from mosaicjax.checkpoints import diffusers_parts as dp
from mosaicjax.models import vae

SMALL = dict(block_out_channels=(32, 64), down_block_types=('DownEncoderBlock2D',) * 2,
             up_block_types=('UpDecoderBlock2D',) * 2, layers_per_block=1, norm_num_groups=8, latent_channels=4)
# Two resnets per level (three in the decoder), no quant convs, no mid attention, a shift factor.
VARIANT = dict(block_out_channels=(16, 32), down_block_types=('DownEncoderBlock2D',) * 2,
               up_block_types=('UpDecoderBlock2D',) * 2, layers_per_block=2, norm_num_groups=8, latent_channels=4,
               use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False, shift_factor=0.1,
               scaling_factor=0.3)


def _reference(kw, seed=0):
    torch.manual_seed(seed)
    model = DiffusersVAE(**kw).eval()
    with torch.no_grad():  # non-degenerate: GroupNorm scales != 1, biases != 0
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _state_dict(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _nhwc(t):
    return np.ascontiguousarray(t.numpy().transpose(0, 2, 3, 1))


def _close(ours, ref, name):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


@pytest.fixture(scope='module')
def small():
    ref = _reference(SMALL)
    cfg = dp.vae_config_from_diffusers(dict(ref.config))
    return ref, cfg, dp.vae_params_from_diffusers(_state_dict(ref), cfg)


@pytest.mark.parametrize('kw,hw', [(SMALL, (48, 32)), (VARIANT, (16, 24))], ids=['small', 'variant'])
def test_parity_with_diffusers(kw, hw, small):
    if kw is SMALL:
        ref, cfg, params = small
    else:
        ref = _reference(kw, seed=1)
        cfg = dp.vae_config_from_diffusers(dict(ref.config))
        params = dp.vae_params_from_diffusers(_state_dict(ref), cfg)
    h, w = hw
    f = cfg.downsample_factor
    torch.manual_seed(1)
    x = torch.rand(2, 3, h, w) * 2 - 1
    z = torch.randn(2, 4, h // f, w // f)
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        img = ref.decode(z).sample
    model = vae.AutoencoderKL(cfg)
    enc = jax.jit(lambda p, x: model.apply({'params': p}, x, method='encode'))
    dec = jax.jit(lambda p, z: model.apply({'params': p}, z, method='decode'))
    ours = enc(params, jnp.asarray(_nhwc(x)))
    _close(ours.mean, _nhwc(dist.mean), 'mean')
    _close(ours.logvar, _nhwc(dist.logvar), 'logvar')
    _close(ours.std, _nhwc(dist.std), 'std')
    _close(ours.kl(), dist.kl().numpy(), 'kl')
    _close(dec(params, jnp.asarray(_nhwc(z))), _nhwc(img), 'decode')
    sample = ours.sample(jax.random.PRNGKey(0))
    assert sample.shape == ours.mean.shape and not np.allclose(sample, ours.mean)


def test_weight_round_trips_are_exact(small):
    ref, cfg, params = small
    sd = _state_dict(ref)
    back = dp.vae_params_to_diffusers(params, cfg)
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and np.array_equal(back[k], sd[k]), k
    # ours -> diffusers -> ours for any tree of the right shapes (given with the 'params' wrapper).
    rng = np.random.default_rng(0)
    mine = jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(np.float32),
                                  dp.vae_param_shapes(cfg))
    again = dp.vae_params_from_diffusers(dp.vae_params_to_diffusers({'params': mine}, cfg), cfg)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, mine, again))
    # The exported dict loads into diffusers with nothing missing or unexpected.
    ref2 = DiffusersVAE(**SMALL)
    ref2.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_folder_save_load(small, tmp_path):
    """save_vae writes a folder diffusers loads unchanged; load_vae reads it (and fp16 files) back."""
    ref, cfg, params = small
    dp.save_vae(tmp_path / 'vae', params, cfg)
    loaded = DiffusersVAE.from_pretrained(str(tmp_path / 'vae'))
    for k, v in ref.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    cfg2, params2 = dp.load_vae(tmp_path / 'vae')
    assert cfg2 == cfg and jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, params, params2))
    loaded.to(torch.float16).save_pretrained(str(tmp_path / 'fp16'))
    _, params3 = dp.load_vae(tmp_path / 'fp16')  # cast to float32 on load
    kernel = params3['encoder']['conv_in']['kernel']
    assert kernel.dtype == np.float32
    np.testing.assert_array_equal(kernel, params['encoder']['conv_in']['kernel'].astype(np.float16).astype(np.float32))


def test_legacy_attention_names(small):
    """Old checkpoints: mid-block attention as query/key/value/proj_attn, sometimes as 1x1 convs."""
    ref, cfg, params = small
    legacy = {}
    for k, v in _state_dict(ref).items():
        for new, old in (('to_q', 'query'), ('to_k', 'key'), ('to_v', 'value'), ('to_out.0', 'proj_attn')):
            if f'.attentions.0.{new}.' in k:
                k = k.replace(f'.{new}.', f'.{old}.')
                if k.startswith('decoder') and v.ndim == 2:
                    v = v[:, :, None, None]
        legacy[k] = v
    assert any('.query.' in k for k in legacy)
    again = dp.vae_params_from_diffusers(legacy, cfg)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, params, again))


def test_bad_state_dicts_are_reported(small):
    ref, cfg, _ = small
    sd = _state_dict(ref)
    with pytest.raises(ValueError, match='missing'):
        dp.vae_params_from_diffusers({k: v for k, v in sd.items() if not k.startswith('quant_conv')}, cfg)
    with pytest.raises(ValueError, match='unexpected'):
        dp.vae_params_from_diffusers(sd, dataclasses.replace(cfg, use_quant_conv=False))


def test_config_round_trip_and_scaling():
    ref = DiffusersVAE(**VARIANT)
    cfg = dp.vae_config_from_diffusers(dict(ref.config))
    assert cfg.block_out_channels == (16, 32) and cfg.shift_factor == 0.1 and not cfg.use_quant_conv
    assert dp.vae_config_from_diffusers(dp.vae_config_to_diffusers(cfg)) == cfg
    assert DiffusersVAE.from_config(dp.vae_config_to_diffusers(cfg)).config.scaling_factor == 0.3
    z = jnp.linspace(-2.0, 2.0, 16).reshape(1, 2, 2, 4)
    np.testing.assert_allclose(vae.scale_latents(z, cfg), (z - 0.1) * 0.3, rtol=1e-6)
    np.testing.assert_allclose(vae.unscale_latents(vae.scale_latents(z, cfg), cfg), z, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        vae.VAEConfig(block_out_channels=(30,), norm_num_groups=8)


def test_logical_axes():
    import flax.linen as nn
    cfg = vae.VAEConfig(**SMALL)
    shapes = jax.eval_shape(vae.AutoencoderKL(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
    spec = nn.get_partition_spec(shapes)['params']
    assert tuple(spec['encoder']['conv_in']['kernel']) == (None, None, 'conv_in', 'conv_out')
    assert tuple(spec['encoder']['mid_block']['attentions_0']['to_q']['kernel']) == ('conv_in', 'conv_out')
    assert tuple(spec['decoder']['up_blocks_0']['resnets_0']['norm1']['scale']) == ('norm',)


def test_full_size_shapes_match_diffusers():
    """SD's VAE (SD1/SD2/SDXL layout): same parameter count as diffusers, via eval_shape (no memory)."""
    kw = dict(block_out_channels=(128, 256, 512, 512), down_block_types=('DownEncoderBlock2D',) * 4,
              up_block_types=('UpDecoderBlock2D',) * 4, layers_per_block=2, latent_channels=4, sample_size=1024,
              scaling_factor=0.13025)
    cfg = vae.VAEConfig(**kw)
    n_ours = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(dp.vae_param_shapes(cfg)))
    with torch.device('meta'):
        ref = DiffusersVAE(**kw)
    assert n_ours == sum(p.numel() for p in ref.parameters()) == 83_653_863
    out = jax.eval_shape(lambda x: vae.AutoencoderKL(cfg).init_with_output(jax.random.PRNGKey(0), x)[0],
                         jax.ShapeDtypeStruct((1, 1024, 768, 3), jnp.float32))
    assert out.shape == (1, 1024, 768, 3)
