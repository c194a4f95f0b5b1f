"""Generation on a multi-device mesh (data x expert x tensor over 8 host devices) equals one device.

On a mesh the decode step keeps the model's sharded MoE dispatch (expert-parallel all-to-all) instead of
gathering experts, and activations follow the logical-axis rules; batches smaller than the data axes work.
"""
import os
import sys

import jax
import numpy as np
from flax import traverse_util

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_fixtures as F  # noqa: E402  pylint: disable=wrong-import-position

from mosaicjax import lm as lm_lib  # noqa: E402
from mosaicjax.checkpoints import hf_dbrx, loading  # noqa: E402
from mosaicjax.generation import SamplingParams  # noqa: E402
from mosaicjax.parallel import mesh as mesh_lib  # noqa: E402
from mosaicjax.parallel import rules as rules_lib  # noqa: E402


def test_sharded_generation_equals_single_device():
    params = hf_dbrx.params_from_hf(F.random_state_dict(F.CFG, 0), F.CFG)
    prompts = [[5, 17, 33], [71, 3, 26, 4, 9]]
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    sampled = SamplingParams(max_tokens=8, temperature=1.0, top_k=20, seed=5)
    single = lm_lib.LanguageModel(F.CFG, params, F.AsciiTokenizer(), generator_options=F.GENERATOR_OPTIONS)
    want = single.generator.generate(prompts, [greedy, sampled])

    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig({'data': 2, 'fsdp': 1, 'expert': 2, 'tensor': 2}),
                              devices=jax.devices()[:8])
    rules = rules_lib.get_rules()
    _, shardings = loading.param_shardings(F.CFG, mesh, rules)
    placed = traverse_util.unflatten_dict({k: jax.device_put(v, shardings[k])
                                           for k, v in traverse_util.flatten_dict(params).items()})
    sharded = lm_lib.LanguageModel(F.CFG, placed, F.AsciiTokenizer(), mesh=mesh, rules=rules,
                                   generator_options=F.GENERATOR_OPTIONS)
    got = sharded.generator.generate(prompts, [greedy, sampled])
    assert [g.tokens for g in got] == [w.tokens for w in want]
    np.testing.assert_allclose([g.logprobs for g in got], [w.logprobs for w in want], atol=1e-4)
    assert sharded.generator.params['lm_head']['kernel'].sharding == placed['lm_head']['kernel'].sharding
