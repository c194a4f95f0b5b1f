"""CLIP text encoders: parity with transformers' CLIPTextModel / CLIPTextModelWithProjection (float32, small
random configs with perturbed weights), exact weight round trips, configs, logical axes, full-size shapes."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mosaicjax.checkpoints import diffusers_parts as dp
from mosaicjax.models import clip

VOCAB, T = 100, 16


def _reference(act, eos, with_projection, seed=0):
    torch.manual_seed(seed)
    hc = transformers.CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, projection_dim=24,
                                     num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=T,
                                     hidden_act=act, layer_norm_eps=1e-5, eos_token_id=eos, bos_token_id=0,
                                     pad_token_id=1)
    model = (transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel)(hc).eval()
    with torch.no_grad():  # non-degenerate: LayerNorm scales != 1, biases != 0
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return hc, model


def _hub_state_dict(model):
    """The state dict as Hub files store it (`text_model.` prefix; transformers 5 drops it for CLIPTextModel)."""
    return {(k if k.startswith('text_') else 'text_model.' + k): v.numpy() for k, v in model.state_dict().items()}


def _ids(eos):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, VOCAB - 2, (4, T))
    ids[:, 0] = 0
    ids[0, 5] = eos  # end token mid-sequence, then padding equal to eos (SD1 style)
    ids[0, 6:] = eos
    ids[1, T - 1] = eos  # end token at the last position
    ids[2, 3] = eos  # SD2 style: padding with id 0 after the end token
    ids[2, 4:] = 0
    ids[3, 7] = eos  # a second end token later
    ids[3, 12] = eos
    return ids


def _close(ours, ref, name):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, name
    scale = float(np.abs(ref).max())
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


CASES = [('quick_gelu', 2, False), ('gelu', VOCAB - 1, True), ('gelu', 2, True), ('quick_gelu', VOCAB - 1, False)]


@pytest.mark.parametrize('act,eos,with_projection', CASES)
def test_parity_with_transformers(act, eos, with_projection):
    hc, ref = _reference(act, eos, with_projection)
    cfg = dp.clip_config_from_hf(hc.to_dict())
    assert (cfg.hidden_act, cfg.eos_token_id, cfg.projection_dim) == (act, eos, 24)
    params = dp.clip_params_from_hf(_hub_state_dict(ref), cfg)
    ids = _ids(VOCAB - 1)  # the end token is the largest id, as in CLIP's vocabulary
    with torch.no_grad():
        out = ref(torch.tensor(ids), output_hidden_states=True)
    model = clip.CLIPTextModelWithProjection(cfg) if with_projection else clip.CLIPTextModel(cfg)
    last, aux = jax.jit(model.apply)({'params': params}, jnp.asarray(ids, jnp.int32))
    _close(last, out.last_hidden_state, 'last_hidden_state')
    assert len(aux['hidden_states']) == len(out.hidden_states) == 4
    for i, (a, b) in enumerate(zip(aux['hidden_states'], out.hidden_states)):
        _close(a, b, f'hidden_states[{i}]')
    if with_projection:
        _close(aux['text_embeds'], out.text_embeds, 'text_embeds')
        pooled_ref = ref.text_model(torch.tensor(ids)).pooler_output
    else:
        pooled_ref = out.pooler_output
    _close(aux['pooler_output'], pooled_ref.detach(), 'pooler_output')


def test_pooling_rule_differs_when_eos_is_not_the_largest_id():
    """eos_token_id == 2 (legacy) pools at argmax(ids); otherwise at the first eos. Both as transformers."""
    for eos in (2, 50):
        hc, ref = _reference('quick_gelu', eos, False, seed=1)
        cfg = dp.clip_config_from_hf(hc.to_dict())
        params = dp.clip_params_from_hf(_hub_state_dict(ref), cfg)
        ids = _ids(50)
        ids[:, 9] = VOCAB - 1  # a larger id than the end token after it
        with torch.no_grad():
            want = ref(torch.tensor(ids)).pooler_output.numpy()
        _, aux = jax.jit(clip.CLIPTextModel(cfg).apply)({'params': params}, jnp.asarray(ids, jnp.int32))
        _close(aux['pooler_output'], want, f'pooled eos={eos}')


def test_attention_mask_matches_transformers():
    hc, ref = _reference('gelu', VOCAB - 1, False, seed=2)
    cfg = dp.clip_config_from_hf(hc.to_dict())
    params = dp.clip_params_from_hf(_hub_state_dict(ref), cfg)
    ids = _ids(VOCAB - 1)
    mask = np.ones_like(ids)
    mask[0, 6:] = 0
    mask[2, 4:] = 0
    with torch.no_grad():
        want = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    last, _ = jax.jit(clip.CLIPTextModel(cfg).apply)({'params': params}, jnp.asarray(ids, jnp.int32),
                                                     jnp.asarray(mask))
    # Rows' unmasked positions are what a masked model defines; masked query rows still see earlier keys.
    _close(last, want, 'masked last_hidden_state')


@pytest.mark.parametrize('with_projection', [False, True])
def test_weight_round_trips_are_exact(with_projection):
    hc, ref = _reference('quick_gelu', 2, with_projection)
    sd = _hub_state_dict(ref)
    cfg = dp.clip_config_from_hf(hc.to_dict())
    back = dp.clip_params_to_hf(dp.clip_params_from_hf(sd, cfg), cfg)
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and np.array_equal(back[k], sd[k]), k
    # transformers 5's own save format (no prefix on CLIPTextModel) loads to the same tree.
    bare = {k: v.numpy() for k, v in ref.state_dict().items()}
    a, b = dp.clip_params_from_hf(bare, cfg), dp.clip_params_from_hf(sd, cfg)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, a, b))
    # ours -> HF -> ours for any tree of the right shapes, boxed as init makes it, with the 'params' wrapper.
    model = clip.CLIPTextModelWithProjection(cfg) if with_projection else clip.CLIPTextModel(cfg)
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(
        lambda s: rng.standard_normal(s.shape).astype(np.float32),
        jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))
    assert isinstance(variables['params']['text_model']['final_layer_norm']['scale'], nn.Partitioned)
    mine = nn.unbox(variables)['params']
    again = dp.clip_params_from_hf(dp.clip_params_to_hf(variables, cfg), cfg)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x, y: np.array_equal(np.asarray(x), y), mine, again))



def test_export_loads_in_transformers(tmp_path):
    """A folder written from our params (config.json + model.safetensors) loads with from_pretrained, and
    load_clip_text_encoder reads it back (bfloat16 files included)."""
    hc, ref = _reference('gelu', 2, True)
    cfg = dp.clip_config_from_hf(hc.to_dict())
    params = dp.clip_params_from_hf(_hub_state_dict(ref), cfg)
    dp.save_clip_text_encoder(tmp_path / 'te2', params, cfg)
    loaded = transformers.CLIPTextModelWithProjection.from_pretrained(str(tmp_path / 'te2')).eval()
    ids = torch.tensor(_ids(VOCAB - 1))
    with torch.no_grad():
        np.testing.assert_array_equal(loaded(ids).text_embeds.numpy(), ref(ids).text_embeds.numpy())
    cfg2, params2, with_projection = dp.load_clip_text_encoder(tmp_path / 'te2')
    assert with_projection and cfg2 == cfg
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, params, params2))
    loaded.to(torch.bfloat16).save_pretrained(str(tmp_path / 'bf16'))
    cfg3, params3, _ = dp.load_clip_text_encoder(tmp_path / 'bf16', param_dtype=None)
    leaf = params3['text_model']['final_layer_norm']['scale']
    assert cfg3.param_dtype == 'float32' and leaf.dtype == jnp.bfloat16
    np.testing.assert_array_equal(leaf.astype(np.float32),
                                  ref.text_model.final_layer_norm.weight.detach().to(torch.bfloat16).float().numpy())


def test_final_layer_norm_helper():
    hc, ref = _reference('quick_gelu', 2, False)
    cfg = dp.clip_config_from_hf(hc.to_dict())
    params = dp.clip_params_from_hf(_hub_state_dict(ref), cfg)
    last, aux = jax.jit(clip.CLIPTextModel(cfg).apply)({'params': params}, jnp.asarray(_ids(VOCAB - 1), jnp.int32))
    np.testing.assert_allclose(clip.apply_final_layer_norm(params, cfg, aux['hidden_states'][-1]), last,
                               rtol=1e-6, atol=1e-6)


def test_bad_state_dicts_are_reported():
    hc, ref = _reference('quick_gelu', 2, False)
    cfg = dp.clip_config_from_hf(hc.to_dict())
    sd = _hub_state_dict(ref)
    with pytest.raises(ValueError, match='missing'):
        dp.clip_params_from_hf({k: v for k, v in sd.items() if 'layers.2.' not in k}, cfg)
    with pytest.raises(ValueError, match='shape'):
        dp.clip_params_from_hf(sd, dataclasses.replace(cfg, intermediate_size=48))


def test_config_round_trip():
    cfg = clip.CLIPTextConfig(hidden_size=64, intermediate_size=128, projection_dim=32, num_hidden_layers=2,
                              num_attention_heads=4, hidden_act='gelu', eos_token_id=2)
    hf = dp.clip_config_to_hf(cfg, with_projection=True)
    assert dp.clip_config_from_hf(hf) == cfg
    tc = transformers.CLIPTextConfig(**{k: v for k, v in hf.items() if k not in ('architectures', 'model_type')})
    assert dp.clip_config_from_hf(tc.to_dict()) == cfg
    assert dp.clip_config_from_hf(hf, dtype='bfloat16').dtype == 'bfloat16'


def test_logical_axes():
    cfg = clip.CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, projection_dim=24,
                              num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=T)
    shapes = jax.eval_shape(clip.CLIPTextModelWithProjection(cfg).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 4), jnp.int32))
    spec = nn.get_partition_spec(shapes)['params']
    tm = spec['text_model']
    assert tuple(tm['embeddings']['token_embedding']['embedding']) == ('vocab', 'embed')
    layer = tm['encoder']['layers_0']
    assert tuple(layer['self_attn']['q_proj']['kernel']) == ('embed', 'heads')
    assert tuple(layer['self_attn']['out_proj']['kernel']) == ('heads', 'embed')
    assert tuple(layer['mlp']['fc1']['kernel']) == ('embed', 'mlp')
    assert tuple(layer['layer_norm1']['scale']) == ('norm',)
    assert tuple(spec['text_projection']['kernel']) == ('embed', None)


@pytest.mark.parametrize('name,kw,with_projection', [
    ('sd1_clip_l', dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        projection_dim=768, hidden_act='quick_gelu'), False),
    ('sdxl_bigg', dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                       projection_dim=1280, hidden_act='gelu'), True),
])
def test_full_size_shapes_match_transformers(name, kw, with_projection):
    cfg = clip.CLIPTextConfig(eos_token_id=2, **kw)
    ours = dp.clip_param_shapes(cfg, with_projection)
    with torch.device('meta'):
        ref = (transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel)(
            transformers.CLIPTextConfig(eos_token_id=2, **kw))
    n_ours = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(ours))
    assert n_ours == sum(p.numel() for p in ref.parameters())
