"""load_lm on Hugging Face DBRX folders: logits equal transformers', sharded streaming, dtypes, pickle refusal."""
import json
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lm_fixtures as F  # noqa: E402  pylint: disable=wrong-import-position

import mosaicjax  # noqa: E402
from mosaicjax.checkpoints import hf_folder, loading, safetensors_io  # noqa: E402
from mosaicjax.parallel import mesh as mesh_lib  # noqa: E402
from mosaicjax.parallel import rules as rules_lib  # noqa: E402

pytest.importorskip('torch')
pytest.importorskip('transformers')


@pytest.fixture(scope='module')
def hf_f32(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp('hf_f32'))
    cfg, sd, model = F.make_hf_folder(folder)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 12))
    return folder, cfg, sd, tokens, F.reference_logits(model, tokens)


def test_hf_folder_logits_match_transformers(hf_f32, capfd):
    folder, cfg, sd, tokens, ref = hf_f32
    shards = [f for f in os.listdir(folder) if f.startswith('model-')]
    assert len(shards) >= 3 and os.path.exists(os.path.join(folder, safetensors_io.INDEX_NAME))
    lm = mosaicjax.load_lm(folder)
    assert lm.config == cfg  # config.json as transformers 5 writes it (rope_parameters + attn_config)
    err = F.rel_err(lm.logits(tokens), ref)
    assert err < 1e-4, err
    # Exact weights, in the scanned layout.
    np.testing.assert_array_equal(np.asarray(lm.params['blocks']['attn']['Wqkv']['kernel'][1]),
                                  sd['transformer.blocks.1.norm_attn_norm.attn.Wqkv.weight'].T)
    np.testing.assert_array_equal(np.asarray(lm.params['blocks']['experts']['w2'][0]),
                                  sd['transformer.blocks.0.ffn.experts.mlp.w2'])
    assert lm.params['wte']['embedding'].dtype == np.float32
    assert 'loading: 19/19 tensors' in capfd.readouterr().err
    # Tokenizer and chat template from the folder; special tokens are single tokens.
    tok = lm.tokenizer
    assert tok.eos_id == tok.bos_id == 0 and tok.pad_id == 1
    ids = tok.encode('<|im_start|>user\nhi<|im_end|>')
    assert ids[0] == 2 and ids[-1] == 3
    assert tok.decode(tok.encode('def add(x, y): return x')) == 'def add(x, y): return x'
    assert lm.chat_template == F.CHAT_TEMPLATE


def test_streams_into_a_sharded_mesh(hf_f32):
    folder, cfg, sd, tokens, ref = hf_f32
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig({'data': 1, 'fsdp': 2, 'expert': 2, 'tensor': 2}),
                              devices=jax.devices()[:8])
    reads = []
    with safetensors_io.open_weights(folder) as reader:
        original = reader.read
        reader.read = lambda name, index=None: reads.append((name, index)) or original(name, index)
        params = loading.load_hf_params(reader, cfg, mesh, rules_lib.DEFAULT_RULES, progress=False)
    w1 = params['blocks']['experts']['w1']  # [L, E*ffn, d]: exp_mlp over 'expert', embed over 'fsdp'
    assert w1.sharding.spec == jax.sharding.PartitionSpec(None, 'expert', 'fsdp')
    assert {s.data.shape for s in w1.addressable_shards} == {(2, 48, 16)}
    # Each device shard is read as a slice (only its bytes), and each distinct slice once.
    w1_reads = [r for r in reads if r[0] == 'transformer.blocks.0.ffn.experts.mlp.w1']
    assert len(w1_reads) == 4 and all(r[1] is not None for r in w1_reads)
    np.testing.assert_array_equal(np.asarray(w1[1]), sd['transformer.blocks.1.ffn.experts.mlp.w1'])
    np.testing.assert_array_equal(np.asarray(params['lm_head']['kernel']), sd['lm_head.weight'].T)
    lm = mosaicjax.load_lm(folder, mesh=mesh, progress=False)
    assert F.rel_err(lm.logits(tokens), ref) < 1e-4


def test_bf16_checkpoint_loads_as_bf16_or_float32(tmp_path):
    cfg, sd, model = F.make_hf_folder(str(tmp_path), seed=1, dtype='bfloat16', max_shard_size='1GB')
    assert os.listdir(tmp_path).count('model.safetensors') == 1  # the single-file layout
    with safetensors_io.open_weights(str(tmp_path)) as reader:
        assert str(reader.dtype('lm_head.weight')) == 'bfloat16'
        assert hf_folder.checkpoint_dtype({}, reader) == 'bfloat16'
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 9))
    ref = F.reference_logits(model, tokens)  # float32 forward of the bf16-rounded weights

    lm32 = mosaicjax.load_lm(str(tmp_path), dtype='float32', progress=False)
    assert lm32.params['blocks']['norm_1']['scale'].dtype == np.float32
    np.testing.assert_array_equal(np.asarray(lm32.params['lm_head']['kernel']), sd['lm_head.weight'].T)
    assert F.rel_err(lm32.logits(tokens), ref) < 1e-4

    lm16 = mosaicjax.load_lm(str(tmp_path), dtype='bfloat16', progress=False)
    assert lm16.config.param_dtype == lm16.config.dtype == 'bfloat16'
    leaves = jax.tree.leaves(lm16.params)
    assert all(a.dtype == jax.numpy.bfloat16 for a in leaves)
    np.testing.assert_array_equal(np.asarray(lm16.params['wte']['embedding']).astype(np.float32),
                                  sd['transformer.wte.weight'])
    out = lm16.logits(tokens)
    assert out.dtype == np.float32 and F.rel_err(out, ref) < 0.1  # bf16 compute: loose by nature


def test_pickle_weights_are_refused_without_allow_pickle(tmp_path):
    import torch
    cfg = F.small_config(n_layers=1)
    sd = F.random_state_dict(cfg, 2)
    with open(tmp_path / 'config.json', 'w') as f:
        json.dump(cfg.to_hf_dict(), f)
    torch.save({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in sd.items()}, tmp_path / 'pytorch_model.bin')
    with pytest.raises(safetensors_io.PickleRefusedError, match='allow_pickle'):
        mosaicjax.load_lm(str(tmp_path))
    lm = mosaicjax.load_lm(str(tmp_path), allow_pickle=True, progress=False)  # bf16 pickles load as float32
    want = torch.from_numpy(sd['lm_head.weight']).to(torch.bfloat16).float().numpy().T
    np.testing.assert_array_equal(np.asarray(lm.params['lm_head']['kernel']), want)
    assert lm.tokenizer is None


def _linked_copy(folder, dst):
    os.makedirs(dst)
    for name in os.listdir(folder):
        if name != 'config.json':
            os.symlink(os.path.join(folder, name), os.path.join(dst, name))


def test_published_config_layout(hf_f32, tmp_path):
    # config.json as databricks published it (transformers 4.38): RoPE base only in attn_config.rope_theta.
    folder, cfg, _, tokens, ref = hf_f32
    _linked_copy(folder, tmp_path / 'pub')
    published = {'architectures': ['DbrxForCausalLM'], 'model_type': 'dbrx', 'd_model': cfg.d_model,
                 'n_heads': cfg.n_heads, 'n_layers': cfg.n_layers, 'max_seq_len': cfg.max_seq_len,
                 'vocab_size': cfg.vocab_size, 'torch_dtype': 'bfloat16', 'tie_word_embeddings': False,
                 'attn_config': {'clip_qkv': cfg.clip_qkv, 'kv_n_heads': cfg.kv_n_heads, 'model_type': '',
                                 'rope_theta': cfg.rope_theta},
                 'ffn_config': {'ffn_hidden_size': cfg.ffn_hidden_size, 'moe_num_experts': cfg.moe_num_experts,
                                'moe_top_k': cfg.moe_top_k, 'moe_loss_weight': 0.05, 'model_type': ''}}
    with open(tmp_path / 'pub' / 'config.json', 'w') as f:
        json.dump(published, f)
    lm = mosaicjax.load_lm(str(tmp_path / 'pub'), progress=False)
    assert lm.config.rope_theta == 500000.0 and lm.config.param_dtype == 'float32'
    assert F.rel_err(lm.logits(tokens), ref) < 1e-4


def test_config_and_weight_errors_are_clear(tmp_path, hf_f32):
    folder = hf_f32[0]
    with pytest.raises(ValueError, match='not a model'):
        mosaicjax.load_lm(str(tmp_path))
    _linked_copy(folder, tmp_path / 'bad')
    with open(tmp_path / 'bad' / 'config.json', 'w') as f:
        json.dump(dict(F.small_config(n_layers=3).to_hf_dict()), f)
    with pytest.raises(ValueError, match='missing=.*blocks.2'):
        mosaicjax.load_lm(str(tmp_path / 'bad'))
    with pytest.raises(ValueError, match='size'):
        safetensors_io.parse_size('lots')
    assert safetensors_io.parse_size('40KB') == 40_000 and safetensors_io.parse_size('2GiB') == 2 * 2 ** 30
