"""Int8 weight-only quantisation (mosaicjax/models/quantize.py): the per-weight error bound, the parameter tree, and
the quantised model computing exactly the float model on the dequantised weights (prefill and KV-cache decode)."""
import dataclasses
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_fixtures as F  # noqa: E402  pylint: disable=wrong-import-position

from mosaicjax.checkpoints import hf_dbrx  # noqa: E402
from mosaicjax.generation import Generator, SamplingParams  # noqa: E402
from mosaicjax.models import dbrx, quantize  # noqa: E402

CFG = F.CFG
QCFG = dataclasses.replace(CFG, quantize='int8')


@pytest.fixture(scope='module')
def params():
    return hf_dbrx.params_from_hf(F.random_state_dict(CFG, 0), CFG)


@pytest.mark.parametrize('axis', [0, 1, -2])
def test_quantize_tensor_error_bound(axis):
    """|w - q * s| <= s / 2 per element (round to nearest), the channel's largest |w| maps to +-127 exactly, and
    an all-zero channel stays exactly zero."""
    rng = np.random.default_rng(0)
    w = rng.standard_t(3, (3, 64, 48)).astype(np.float32)  # heavy tails: a few large weights per channel
    w[0, :, 5] = 0.0
    w[0, 7, :] = 0.0
    q, s = quantize.quantize_tensor(w, axis)
    assert q.dtype == jnp.int8 and s.dtype == jnp.float32
    assert s.shape == tuple(np.delete(w.shape, axis))
    deq = np.asarray(quantize.dequantize_tensor(q, s, axis))
    s_b = np.expand_dims(np.asarray(s), axis)
    err = np.abs(w - deq)
    # Half a step, plus the float32 rounding of w / s and of q * s (a few ulp of |w|).
    assert np.all(err <= s_b / 2 * (1 + 1e-6) + 4 * np.finfo(np.float32).eps * np.abs(w))
    assert np.all(np.abs(np.asarray(q)) <= 127)
    np.testing.assert_array_equal(np.max(np.abs(np.asarray(q)), axis=axis)[np.asarray(s) != 1.0], 127)
    assert np.all(deq[w == 0] == 0)
    # Relative to each channel's largest weight the error is at most 1/254.
    amax = np.max(np.abs(w), axis=axis, keepdims=True)
    assert np.all(err <= amax / 254 * (1 + 1e-5) + 1e-30)


def test_quantized_tree_matches_the_int8_model(params):
    qp = quantize.quantize_params(params)
    want = nn.meta.unbox(jax.eval_shape(lambda: dbrx.Dbrx(QCFG).init(jax.random.key(0),
                                                                      jnp.zeros((1, 4), jnp.int32)))['params'])
    shape = lambda t: jax.tree.map(lambda a: (tuple(a.shape), jnp.dtype(a.dtype).name), t)  # noqa: E731
    assert shape(qp) == shape(want)
    assert qp['blocks']['experts']['w1'].dtype == jnp.int8 and qp['lm_head']['kernel'].dtype == jnp.int8
    assert qp['blocks']['router']['kernel'].dtype == jnp.float32  # routing stays float
    assert quantize.weight_bytes(qp) < 0.45 * quantize.weight_bytes(params)
    # dequantize_params inverts the layout (float tree of the float model) and each weight is within half a step.
    deq = quantize.dequantize_params(qp)
    assert shape(deq) == shape(params)
    w1, dw1 = np.asarray(params['blocks']['experts']['w2']), np.asarray(deq['blocks']['experts']['w2'])
    e, f = CFG.moe_num_experts, CFG.ffn_hidden_size
    step = np.asarray(qp['blocks']['experts']['w2_scale'])[:, :, None, :]  # [L, E, 1, D]
    err = np.abs(w1 - dw1).reshape(CFG.n_layers, e, f, CFG.d_model)
    assert np.all(err <= step / 2 * (1 + 1e-6) + 1e-6)


def test_int8_model_is_the_float_model_on_dequantized_weights(params):
    """Prefill logits to the float32 parity tolerance (1e-4 of the logit range, as tests/generation), and greedy
    KV-cache decode token for token."""
    qp = quantize.quantize_params(params)
    deq = quantize.dequantize_params(qp)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, CFG.vocab_size, (3, 20)), jnp.int32)
    want = np.asarray(jax.jit(lambda p: dbrx.Dbrx(CFG).apply({'params': p}, tokens)[0])(deq))
    got = np.asarray(jax.jit(lambda p: dbrx.Dbrx(QCFG).apply({'params': p}, tokens)[0])(qp))
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))
    # Batch 4: prefill through the int8 Experts module (the batched dispatch), decode through gather_experts'
    # int8 rows (4 tokens x top-2 <= 8 experts).
    prompts = [[5, 17, 33, 2, 90, 41, 8], [71, 3, 26], [9] * 5, [1, 2, 3, 4]]
    sp = SamplingParams(max_tokens=12, temperature=0.0)
    a = Generator(CFG, deq, **F.GENERATOR_OPTIONS, max_batch=4).generate(prompts, sp)
    b = Generator(QCFG, qp, **F.GENERATOR_OPTIONS, max_batch=4).generate(prompts, sp)
    assert [c.tokens for c in a] == [c.tokens for c in b]
    # The same 1e-4-of-the-logit-range tolerance: x @ (q * s) and (x @ q) * s round differently in float32.
    np.testing.assert_allclose([c.logprobs for c in a], [c.logprobs for c in b], atol=1e-4 * np.max(np.abs(want)))


def test_quantize_config_is_validated():
    with pytest.raises(ValueError, match='quantize'):
        dataclasses.replace(CFG, quantize='int4')
