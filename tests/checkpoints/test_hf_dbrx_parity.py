"""Hugging Face DBRX interop: config and weight mapping, and logits parity with transformers' DbrxForCausalLM.

The reference is built from our own config_to_hf() dict, which sets `rope_parameters` explicitly: transformers 5
reads RoPE's base from there and ignores attn_config.rope_theta.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mosaicjax.checkpoints import hf_dbrx
from mosaicjax.models import dbrx

PUBLISHED_DBRX_CONFIG = {  # databricks/dbrx-base config.json
    'architectures': ['DbrxForCausalLM'],
    'attn_config': {'clip_qkv': 8, 'kv_n_heads': 8, 'model_type': '', 'rope_theta': 500000},
    'd_model': 6144, 'emb_pdrop': 0.0,
    'ffn_config': {'ffn_hidden_size': 10752, 'model_type': '', 'moe_jitter_eps': 0.01, 'moe_loss_weight': 0.05,
                   'moe_num_experts': 16, 'moe_top_k': 4},
    'initializer_range': 0.02, 'max_seq_len': 32768, 'model_type': 'dbrx', 'n_heads': 48, 'n_layers': 40,
    'output_router_logits': False, 'resid_pdrop': 0.0, 'router_aux_loss_coef': 0.05,
    'tie_word_embeddings': False, 'torch_dtype': 'bfloat16', 'transformers_version': '4.38.2',
    'use_cache': True, 'vocab_size': 100352,
}


def _small(**kw):
    base = dict(d_model=32, n_heads=4, kv_n_heads=2, n_layers=2, max_seq_len=64, vocab_size=96, clip_qkv=2.0,
                rope_theta=10000.0, ffn_hidden_size=24, moe_num_experts=4, moe_top_k=2)
    base.update(kw)
    return dbrx.DbrxConfig(**base)


def _random_state_dict(cfg, seed):
    """Non-degenerate weights: decisive routing, qkv large enough for clip_qkv to clamp, random norm scales."""
    rng = np.random.default_rng(seed)
    std = {'wte': 1.0, 'Wqkv': 0.5, 'out_proj': 0.15, 'router': 0.5, 'w1': 0.25, 'v1': 0.25, 'w2': 0.25,
           'lm_head': 0.3}
    sd = {}
    for k, shape in hf_dbrx.hf_shapes(cfg).items():
        if k.endswith('norm_1.weight') or k.endswith('norm_2.weight') or k.endswith('norm_f.weight'):
            sd[k] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            name = next(n for n in std if n in k)
            sd[k] = rng.normal(0.0, std[name], shape).astype(np.float32)
    return sd


# ----------------------------------------------------------------------------------------------------------
# Pure mapping (no torch needed)


def test_config_round_trip_and_published_config():
    cfg = _small(rope_theta=777.0, clip_qkv=None, moe_normalize_expert_weights=None, moe_jitter_eps=0.01)
    assert hf_dbrx.config_from_hf(hf_dbrx.config_to_hf(cfg)) == cfg
    assert dbrx.DbrxConfig.from_hf_dict(cfg.to_hf_dict(), moe_dispatch='loop') == dataclasses.replace(
        cfg, moe_dispatch='loop')
    pub = hf_dbrx.config_from_hf(PUBLISHED_DBRX_CONFIG)
    assert pub == dbrx.DbrxConfig(moe_jitter_eps=0.01)
    assert pub.rope_theta == 500000.0 and pub.clip_qkv == 8.0
    assert dbrx.count_params(pub)['total'] == 131_596_523_520


def test_config_rope_theta_sources():
    base = {k: v for k, v in PUBLISHED_DBRX_CONFIG.items()}
    # transformers-5 style: base only in rope_parameters.
    t5 = dict(base, attn_config={'clip_qkv': 8, 'kv_n_heads': 8},
              rope_parameters={'rope_type': 'default', 'rope_theta': 250000.0})
    assert hf_dbrx.config_from_hf(t5).rope_theta == 250000.0
    # Both present: attn_config.rope_theta is what the checkpoint was trained with.
    both = dict(base, rope_parameters={'rope_type': 'default', 'rope_theta': 10000.0})
    assert hf_dbrx.config_from_hf(both).rope_theta == 500000.0
    # Neither: transformers' default.
    assert hf_dbrx.config_from_hf(dict(base, attn_config={'kv_n_heads': 8})).rope_theta == 10000.0
    with pytest.raises(ValueError):
        hf_dbrx.config_from_hf(dict(base, rope_parameters={'rope_type': 'yarn', 'rope_theta': 1.0, 'factor': 4.0}))
    with pytest.raises(ValueError):
        hf_dbrx.config_from_hf(dict(base, ffn_config={'ffn_act_fn': {'name': 'gelu'}}))
    with pytest.raises(ValueError):
        hf_dbrx.config_from_hf(dict(base, tie_word_embeddings=True))
    # Missing keys take transformers' defaults, not ours.
    d = hf_dbrx.config_from_hf({'model_type': 'dbrx'})
    assert (d.d_model, d.n_layers, d.kv_n_heads, d.moe_num_experts, d.moe_top_k, d.clip_qkv) == (
        2048, 24, 1, 4, 1, None)


@pytest.mark.parametrize('scan', [True, False])
def test_weight_mapping_round_trip_is_exact(scan):
    cfg = _small(scan_layers=scan)
    sd = _random_state_dict(cfg, 0)
    params = hf_dbrx.params_from_hf(sd, cfg)
    init = jax.eval_shape(dbrx.Dbrx(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))['params']
    assert (jax.tree.map(lambda a: (a.shape, a.dtype), params)
            == jax.tree.map(lambda a: (a.shape, a.dtype), jax.tree.map(lambda b: b.value, init,
                                                                       is_leaf=lambda x: hasattr(x, 'value'))))
    np.testing.assert_array_equal(params['lm_head']['kernel'], sd['lm_head.weight'].T)
    back = hf_dbrx.params_to_hf({'params': params}, dataclasses.replace(cfg, scan_layers=not scan))  # layout from tree
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
    with pytest.raises(ValueError, match='missing'):
        hf_dbrx.params_from_hf({k: v for k, v in sd.items() if 'lm_head' not in k}, cfg)
    with pytest.raises(ValueError, match='shape'):
        hf_dbrx.params_from_hf(dict(sd, **{'transformer.norm_f.weight': np.ones(3, np.float32)}), cfg)


# ----------------------------------------------------------------------------------------------------------
# Parity with transformers


def _reference(cfg, sd):
    torch = pytest.importorskip('torch')
    transformers = pytest.importorskip('transformers')
    hf_cfg = transformers.DbrxConfig(**cfg.to_hf_dict())
    hf_cfg._attn_implementation = 'eager'  # pylint: disable=protected-access
    assert hf_cfg.rope_parameters['rope_theta'] == cfg.rope_theta
    model = transformers.DbrxForCausalLM(hf_cfg).eval()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    if cfg.clip_qkv is None:
        # transformers 5.x crashes on clip_qkv=None (torch.clamp(min=None, max=None)); an infinite clip is the
        # same function.
        for blk in model.transformer.blocks:
            blk.norm_attn_norm.attn.clip_qkv = float('inf')
    return torch, model


def _rel_err(got, ref):
    return float(np.max(np.abs(np.asarray(got, np.float64) - ref)) / np.max(np.abs(ref)))


PARITY_CASES = [
    # name: (config overrides) -- GQA ratios 1, 2 and MQA; top_k 1, 2 and > 2; several RoPE bases; clipping on.
    ('mha_top1', dict(kv_n_heads=4, moe_top_k=1, rope_theta=10000.0, clip_qkv=1.0)),
    ('gqa2_top2', dict(kv_n_heads=2, moe_top_k=2, rope_theta=500000.0, clip_qkv=2.0)),
    ('mqa_top3_p2', dict(kv_n_heads=1, moe_top_k=3, rope_theta=1234.5, clip_qkv=1.5,
                         moe_normalize_expert_weights=2.0)),
    ('gqa3_top4of6_nonorm_loop', dict(d_model=48, n_heads=6, kv_n_heads=2, moe_num_experts=6, moe_top_k=4,
                                      rope_theta=50.0, clip_qkv=3.0, moe_normalize_expert_weights=None,
                                      moe_dispatch='loop')),
    ('noclip_ragged_unscanned', dict(clip_qkv=None, rope_theta=100000.0, moe_dispatch='ragged',
                                     scan_layers=False, attention_impl='einsum')),
]


@pytest.mark.parametrize('name,overrides', PARITY_CASES, ids=[c[0] for c in PARITY_CASES])
def test_logits_match_transformers(name, overrides):
    cfg = _small(**overrides)
    sd = _random_state_dict(cfg, seed=len(name))
    torch, model = _reference(cfg, sd)
    b, t = 2, 10
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, cfg.vocab_size, (b, t))
    positions = np.arange(t)[None].repeat(b, 0) + np.array([[0], [5]])  # offset row exercises RoPE positions

    clamped = []
    hooks = [blk.norm_attn_norm.attn.Wqkv.register_forward_hook(
        lambda m, i, o: clamped.append(float((o.abs() > cfg.clip_qkv).float().mean())))
             for blk in model.transformer.blocks] if cfg.clip_qkv is not None else []
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(tokens), position_ids=torch.from_numpy(positions),
                    output_router_logits=True, use_cache=False)
    for h in hooks:
        h.remove()
    ref = out.logits.numpy().astype(np.float64)
    if cfg.clip_qkv is not None:
        assert min(clamped) > 0.01, clamped  # clip_qkv really clamps in every layer

    params = hf_dbrx.params_from_hf(sd, cfg)
    logits, aux = jax.jit(dbrx.Dbrx(cfg).apply)({'params': params}, jnp.asarray(tokens, jnp.int32),
                                                 jnp.asarray(positions, jnp.int32))
    assert logits.dtype == jnp.float32
    err = _rel_err(logits, ref)
    print(f'{name}: max relative logits error {err:.2e}')
    assert err < 1e-4, err

    # Router statistics: our per-layer Switch loss is transformers' load_balancing_loss_func applied to one
    # layer at a time (we average layers instead of pooling them).
    from transformers.models.dbrx import modeling_dbrx  # pylint: disable=import-outside-toplevel
    per_layer = [float(modeling_dbrx.load_balancing_loss_func((rl,), cfg.moe_num_experts, cfg.moe_top_k))
                 for rl in out.router_logits]
    assert float(aux['moe_lb_loss']) == pytest.approx(np.mean(per_layer), rel=1e-4)
    z = [float(torch.logsumexp(rl, -1).pow(2).mean()) for rl in out.router_logits]
    assert float(aux['router_z_loss']) == pytest.approx(np.mean(z), rel=1e-4)
    load = np.stack([np.bincount(torch.topk(rl, cfg.moe_top_k, -1).indices.numpy().ravel(),
                                 minlength=cfg.moe_num_experts) for rl in out.router_logits])
    np.testing.assert_allclose(aux['expert_load'], load / load.sum(-1, keepdims=True), atol=1e-6)


def test_exported_weights_reproduce_our_logits_in_transformers():
    # Direction ours -> HF: random init of our model, exported and run by the reference.
    cfg = _small(initializer_range=0.3, rope_theta=20000.0)
    params = jax.jit(dbrx.Dbrx(cfg).init)(jax.random.PRNGKey(3), jnp.zeros((1, 8), jnp.int32))
    params = jax.tree.map(lambda b: b.value, params['params'], is_leaf=lambda x: hasattr(x, 'value'))
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 8))
    ours, _ = jax.jit(dbrx.Dbrx(cfg).apply)({'params': params}, jnp.asarray(tokens, jnp.int32))
    torch, model = _reference(cfg, hf_dbrx.params_to_hf(params, cfg))
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(tokens), use_cache=False).logits.numpy().astype(np.float64)
    assert _rel_err(ours, ref) < 1e-4
