"""Builders for tiny Hugging Face DBRX folders (transformers' own save_pretrained) and DBRX-style tokenizers.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here with the `tokenizers` library, carrying
DBRX's special tokens (<|endoftext|>, <|pad|>, <|im_start|>, <|im_end|>) and a ChatML chat template.
"""
import json
import os

import numpy as np

from mosaicjax.checkpoints import hf_dbrx
from mosaicjax.models import dbrx

SPECIALS = ['<|endoftext|>', '<|pad|>', '<|im_start|>', '<|im_end|>']
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                 "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
TEXT = ["def add(x, y):\n    return x + y\n", "The quick brown fox jumps over the lazy dog.",
        "import numpy as np\nprint(np.arange(10))\n", "Hello, world! Chat templates are jinja.",
        "for i in range(3):\n    print(i)\n"] * 20


def small_config(**kw):
    base = dict(d_model=32, n_heads=4, kv_n_heads=2, n_layers=2, max_seq_len=64, vocab_size=320, clip_qkv=2.0,
                rope_theta=500000.0, ffn_hidden_size=24, moe_num_experts=4, moe_top_k=2)
    base.update(kw)
    return dbrx.DbrxConfig(**base)


def random_state_dict(cfg, seed=0):
    """Non-degenerate float32 weights (decisive routing, qkv large enough to clip), as in the parity test."""
    rng = np.random.default_rng(seed)
    std = {'wte': 1.0, 'Wqkv': 0.5, 'out_proj': 0.15, 'router': 0.5, 'w1': 0.25, 'v1': 0.25, 'w2': 0.25,
           'lm_head': 0.3}
    sd = {}
    for k, shape in hf_dbrx.hf_shapes(cfg).items():
        if k.endswith(('norm_1.weight', 'norm_2.weight', 'norm_f.weight')):
            sd[k] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            name = next(n for n in std if n in k)
            sd[k] = rng.normal(0.0, std[name], shape).astype(np.float32)
    return sd


def torch_model(cfg, sd):
    """transformers' DbrxForCausalLM with `sd` loaded; rope_parameters set explicitly (transformers 5 trap)."""
    import torch
    import transformers
    hf_cfg = transformers.DbrxConfig(**cfg.to_hf_dict())
    hf_cfg._attn_implementation = 'eager'  # pylint: disable=protected-access
    assert hf_cfg.rope_parameters['rope_theta'] == cfg.rope_theta
    model = transformers.DbrxForCausalLM(hf_cfg).eval()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    return model


def write_tokenizer(folder, vocab_size=300, chat_template=CHAT_TEMPLATE):
    """A byte-level BPE tokenizer.json (GPT-2/cl100k style) + tokenizer_config.json with DBRX's specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, 'tokenizer.json'))
    cfg = {'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': '<|endoftext|>',
           'eos_token': '<|endoftext|>', 'pad_token': '<|pad|>', 'unk_token': '<|endoftext|>',
           'model_max_length': 64, 'add_bos_token': False, 'add_eos_token': False}
    if chat_template is not None:
        cfg['chat_template'] = chat_template
    with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
        json.dump(cfg, f, indent=2)
    return tok.get_vocab_size()


def make_hf_folder(folder, cfg=None, seed=0, *, dtype='float32', max_shard_size='40KB', tokenizer=True):
    """save_pretrained of a random tiny DBRX (several safetensors shards) + tokenizer; returns (cfg, sd, model).

    sd: the float32 state dict as loaded (for bf16, the weights are rounded to bf16 first and sd holds the
    rounded values in float32).
    """
    import torch
    cfg = cfg or small_config()
    sd = random_state_dict(cfg, seed)
    model = torch_model(cfg, sd)
    if dtype == 'bfloat16':
        model = model.to(torch.bfloat16)
        sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    if tokenizer:
        write_tokenizer(folder)
    return cfg, sd, model


def reference_logits(model, tokens):
    import torch
    model = model.float()
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(np.asarray(tokens)), use_cache=False).logits.numpy().astype(
            np.float64)


def rel_err(got, ref):
    return float(np.max(np.abs(np.asarray(got, np.float64) - ref)) / np.max(np.abs(ref)))
