"""Shared by the generation tests: a tiny DBRX config, random HF-layout weights and an ASCII tokenizer."""
import numpy as np

from mosaicjax.checkpoints import hf_dbrx
from mosaicjax.data import tokenizers
from mosaicjax.models import dbrx

# max_seq_len 32 with the generator's min_length 32: a single length bucket, so each batch bucket compiles
# prefill and decode once.
CFG = dbrx.DbrxConfig(d_model=32, n_heads=4, kv_n_heads=2, n_layers=2, max_seq_len=32, vocab_size=96,
                      clip_qkv=2.0, rope_theta=10000.0, ffn_hidden_size=24, moe_num_experts=8, moe_top_k=2)
GENERATOR_OPTIONS = {'min_length': 32}


class AsciiTokenizer(tokenizers.Tokenizer):
    """id 0 = EOS, ids 1..95 = printable ASCII chr(31 + id)."""

    vocab_size, bos_id, eos_id, pad_id = 96, -1, 0, -1

    def encode(self, text):
        return [ord(c) - 31 for c in text]

    def decode(self, ids):
        return ''.join(chr(31 + i) for i in ids if i > 0)

    def _compute_token_bytes(self):
        return np.array([0] + [1] * 95, np.int32)


def random_state_dict(cfg, seed, std=None):
    """HF-layout weights. Default stds are non-degenerate (decisive routing, qkv large enough to clamp);
    norm scales are uniform(0.5, 1.5)."""
    rng = np.random.default_rng(seed)
    if std is None:
        std = {'wte': 1.0, 'Wqkv': 0.5, 'out_proj': 0.15, 'router': 0.5, 'w1': 0.25, 'v1': 0.25, 'w2': 0.25,
               'lm_head': 0.3}
    sd = {}
    for k, shape in hf_dbrx.hf_shapes(cfg).items():
        if k.endswith('.weight') and 'norm' in k:
            sd[k] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            name = next(n for n in ('wte', 'Wqkv', 'out_proj', 'router', 'w1', 'v1', 'w2', 'lm_head') if n in k)
            sd[k] = rng.normal(0.0, std[name], shape).astype(np.float32)
    return sd
