"""KV-cache generation: parity with transformers' greedy generate, cache == full forward, sampling contracts,
stop handling and no recompilation within a bucket.

One small random DBRX (non-degenerate weights as in tests/checkpoints) and one LanguageModel are shared by
every test, with max_seq_len = min_length = 32 so there is a single length bucket: the whole file compiles
prefill/decode for batch buckets 1 and 2 only.
"""
import collections
import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_fixtures as F  # noqa: E402  pylint: disable=wrong-import-position

from mosaicjax import lm as lm_lib  # noqa: E402
from mosaicjax.checkpoints import hf_dbrx  # noqa: E402
from mosaicjax.generation import SamplingParams  # noqa: E402
from mosaicjax.generation import kv_cache  # noqa: E402
from mosaicjax.models import dbrx  # noqa: E402

CFG = F.CFG
PROMPTS = [[5, 17, 33, 2, 90, 41, 8, 64, 12], [71, 3, 26]]  # different lengths
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
AsciiTokenizer = F.AsciiTokenizer
_random_state_dict = F.random_state_dict


@pytest.fixture(scope='module')
def state_dict():
    return _random_state_dict(CFG, 0)


@pytest.fixture(scope='module')
def lm(state_dict):
    return lm_lib.LanguageModel(CFG, hf_dbrx.params_from_hf(state_dict, CFG), AsciiTokenizer(),
                                generator_options=F.GENERATOR_OPTIONS)


def test_decode_with_cache_matches_full_forward():
    """Prefill 5 tokens, 3 single-token steps (gathered experts), then a 3-token chunk (sorted dispatch).

    Tolerance 1e-4 of the logit range, as the transformers parity tests: a float32 model moves its logits by
    ~1e-5 of the range under any change of summation order (measured on this model: einsum instead of XLA
    attention 1.6e-5, loop instead of sorted dispatch 4e-6), while plumbing errors (positions, masks, cache
    slots) move them by O(1). Weights std 0.3 (qkv still clamps): the sharper weights of the other tests
    amplify rounding ~3x more (scan vs unrolled layers alone: 3.8e-5 there).
    """
    params = hf_dbrx.params_from_hf(_random_state_dict(CFG, 1, std=collections.defaultdict(lambda: 0.3)), CFG)
    model, b, t, p, s = dbrx.Dbrx(CFG), 2, 11, 5, 16
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (b, t)), jnp.int32)

    @jax.jit
    def run(params):
        full, _ = model.apply({'params': params}, tokens)
        cache = kv_cache.init_cache(CFG, b, s)
        out, aux = model.apply({'params': params}, tokens[:, :p], kv_cache=cache)
        outs = [out]
        for i in range(p, t - 3):
            out, aux = model.apply({'params': params}, tokens[:, i:i + 1], kv_cache=aux['kv_cache'],
                                   cache_index=jnp.full((b,), i, jnp.int32))
            outs.append(out)
        out, aux = model.apply({'params': params}, tokens[:, t - 3:], kv_cache=aux['kv_cache'],
                               cache_index=jnp.full((b,), t - 3, jnp.int32))
        return full, jnp.concatenate(outs + [out], axis=1), aux['kv_cache']

    full, cached, cache = run(params)
    np.testing.assert_allclose(cached, full, rtol=0, atol=1e-4 * float(jnp.max(jnp.abs(full))))
    assert cache['k'].shape == (CFG.n_layers, b, s, CFG.kv_n_heads, CFG.head_dim)  # only kv heads cached
    assert not np.any(np.asarray(cache['k'][:, :, t:]))  # nothing written past the tokens


def test_greedy_matches_transformers_and_batch_equals_alone(lm, state_dict):
    torch = pytest.importorskip('torch')
    transformers = pytest.importorskip('transformers')
    hf_cfg = transformers.DbrxConfig(**CFG.to_hf_dict())
    hf_cfg._attn_implementation = 'eager'  # pylint: disable=protected-access
    assert hf_cfg.rope_parameters['rope_theta'] == CFG.rope_theta  # RoPE base passed explicitly
    ref = transformers.DbrxForCausalLM(hf_cfg).eval()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)

    batched = lm.generator.generate(PROMPTS, GREEDY)
    for prompt, got in zip(PROMPTS, batched):
        with torch.no_grad():
            out = ref.generate(torch.tensor([prompt]), max_new_tokens=GREEDY.max_tokens, do_sample=False,
                               eos_token_id=None, pad_token_id=0, output_scores=True,
                               return_dict_in_generate=True)
        want = out.sequences[0, len(prompt):].tolist()
        assert got.tokens == want
        assert got.finish_reason == 'length' and got.stop_reason is None and got.prompt_tokens == len(prompt)
        ref_lp = [float(torch.log_softmax(sc[0], -1)[tok]) for sc, tok in zip(out.scores, want)]
        np.testing.assert_allclose(got.logprobs, ref_lp, atol=1e-4)
        [alone] = lm.generator.generate([prompt], GREEDY)
        assert alone.tokens == got.tokens
        np.testing.assert_allclose(alone.logprobs, got.logprobs, atol=1e-4)  # other matmul shapes


def test_seeded_sampling_is_reproducible_and_batch_independent(lm):
    gen = lm.generator
    sp = SamplingParams(max_tokens=16, temperature=1.3, top_p=0.95, top_k=40, seed=7)
    [a] = gen.generate(PROMPTS[:1], sp)
    [a2] = gen.generate(PROMPTS[:1], sp)
    assert a.tokens == a2.tokens
    # Same row next to a different request (other prompt, other settings, other seed), in either slot.
    other = SamplingParams(max_tokens=5, temperature=0.7, seed=123)
    b = gen.generate([PROMPTS[0], PROMPTS[1]], [sp, other])
    c = gen.generate([PROMPTS[1], PROMPTS[0]], [other, sp])
    assert b[0].tokens == a.tokens == c[1].tokens
    assert b[1].tokens == c[0].tokens and len(b[1].tokens) == 5
    [d] = gen.generate(PROMPTS[:1], SamplingParams(max_tokens=16, temperature=1.3, top_p=0.95, top_k=40, seed=8))
    assert d.tokens != a.tokens
    [g] = gen.generate(PROMPTS[:1], GREEDY)
    assert a.tokens[:12] != g.tokens  # really sampling


def test_top_k_1_and_tiny_top_p_equal_greedy(lm):
    greedy = lm.generator.generate(PROMPTS, GREEDY)
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        out = lm.generator.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=1.0, seed=3, **kw))
        assert [o.tokens for o in out] == [o.tokens for o in greedy], kw


def test_stop_strings_stop_ids_and_max_tokens(lm):
    prompt = 'def f(x):'
    full = lm.generator.generate([lm.tokenizer.encode(prompt)], SamplingParams(max_tokens=20, temperature=0.0))
    toks, text = full[0].tokens, full[0].text
    assert len(toks) == 20 and full[0].finish_reason == 'length'
    assert 0 not in toks  # so the default EOS stop of lm.generate below does not interfere
    # max_tokens: a prefix of the same greedy continuation.
    [short] = lm.generator.generate([lm.tokenizer.encode(prompt)], SamplingParams(max_tokens=7, temperature=0.0))
    assert short.tokens == toks[:7] and short.finish_reason == 'length'
    # A stop string taken from the middle of the text: cut before it, tokens end where it completed.
    stop = text[8:10]
    cut = text.find(stop)
    [s] = lm.generator.generate([lm.tokenizer.encode(prompt)],
                                SamplingParams(max_tokens=20, temperature=0.0, stop=('\x00never', stop)))
    assert (s.text, s.finish_reason, s.stop_reason) == (text[:cut], 'stop', stop)
    assert s.tokens == toks[:len(s.tokens)] and stop in lm.tokenizer.decode(s.tokens)
    assert len(s.logprobs) == len(s.tokens)
    # A stop token id: dropped from the output, reported as the reason.
    stop_id = toks[5]
    first = toks.index(stop_id)
    [t] = lm.generator.generate([lm.tokenizer.encode(prompt)],
                                SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=(stop_id,)))
    assert (t.tokens, t.finish_reason, t.stop_reason) == (toks[:first], 'stop', stop_id)
    # Through the public API (text prompts; the EOS id 0 is a default stop id).
    assert lm.generate([prompt], max_tokens=20, temperature=0.0, stop=[stop]) == [text[:cut]]
    got = lm.generate([lm.tokenizer.encode(prompt), prompt], max_tokens=7, temperature=0.0, return_tokens=True)
    assert got == [toks[:7], toks[:7]]
    assert lm.default_stop_token_ids == [0]


def test_no_recompilation_within_a_bucket(lm):
    gen = lm.generator
    gen.generate(PROMPTS, GREEDY)  # warm (batch bucket 2)
    before = dict(gen.trace_counts)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    jax_logger = logging.getLogger('jax')
    jax_logger.addHandler(handler)
    jax.config.update('jax_log_compiles', True)
    try:
        # Other prompts, lengths, settings, seeds, stop strings and step counts: same buckets.
        out = gen.generate([[1, 2, 3, 4], [9] * 12],
                           [SamplingParams(max_tokens=3, temperature=0.5, top_k=3, seed=1),
                            SamplingParams(max_tokens=9, temperature=0.0, top_p=0.5, stop=('zz',),
                                           stop_token_ids=(7, 8))])
    finally:
        jax.config.update('jax_log_compiles', False)
        jax_logger.removeHandler(handler)
    assert [len(o.tokens) <= m for o, m in zip(out, (3, 9))] == [True, True]
    compiles = [r.getMessage() for r in records if 'ompil' in r.getMessage()]
    assert compiles == []
    assert dict(gen.trace_counts) == before
    assert before['prefill'] <= 2 and before['decode'] <= 2  # at most batch buckets 1 and 2 in this file


def test_input_validation(lm):
    with pytest.raises(ValueError, match='empty'):
        lm.generator.generate([[]])
    with pytest.raises(ValueError, match='max_seq_len'):
        lm.generator.generate([[1] * CFG.max_seq_len])
    with pytest.raises(ValueError, match='top_p'):
        SamplingParams(top_p=0.0)
    with pytest.raises(TypeError):
        lm.generate([1, 2, 3])
    assert lm.generate([''], max_tokens=2, temperature=0.0, return_tokens=True)[0] is not None
