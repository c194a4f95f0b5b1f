"""`python -m mosaicjax.convert`: HF -> mosaicjax -> HF is exact; dtype casts; pickle refusal; image dispatch."""
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lm_fixtures as F  # noqa: E402  pylint: disable=wrong-import-position

import mosaicjax  # noqa: E402
from mosaicjax.checkpoints import hf_dbrx, lm_checkpoint, lm_convert, safetensors_io  # noqa: E402

pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_convert(*args):
    # The subprocess inherits XLA_FLAGS (8 host devices): conversion runs on an fsdp-sharded mesh.
    return subprocess.run([sys.executable, '-m', 'mosaicjax.convert', *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def all_tensors(folder):
    with safetensors_io.open_weights(folder) as r:
        return {k: r.read(k) for k in r.keys()}


@pytest.fixture(scope='module')
def hf_src(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp('hf_src'))
    cfg, _, model = F.make_hf_folder(folder, seed=4)
    tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 11))
    return folder, cfg, tokens, F.reference_logits(model, tokens)


def test_hf_to_mosaicjax_to_hf_round_trip_is_exact(hf_src, tmp_path):
    src, cfg, tokens, ref = hf_src
    mj, back = str(tmp_path / 'mj'), str(tmp_path / 'back')
    p = run_convert(f'--src={src}', f'--dst={mj}')
    assert p.returncode == 0, p.stderr
    assert lm_checkpoint.is_lm_checkpoint(mj) and 'loading: 19/19 tensors' in p.stderr
    meta = lm_checkpoint.read_meta(mj)
    assert meta['tokenizer_file'] == 'tokenizer.json' and meta['params_dtype'] == 'float32'
    p = run_convert(f'--src={mj}', f'--dst={back}', '--to=hf', '--max_shard_size=40KB')
    assert p.returncode == 0, p.stderr

    # Every tensor bit-identical, same dtype, nothing extra; several shards with a consistent index.
    a, b = all_tensors(src), all_tensors(back)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    with open(os.path.join(back, safetensors_io.INDEX_NAME)) as f:
        index = json.load(f)
    assert len(set(index['weight_map'].values())) >= 3
    assert index['metadata']['total_size'] == sum(v.nbytes for v in b.values())

    # Config: the same model for us and for transformers; tokenizer files byte-identical.
    with open(os.path.join(src, 'config.json')) as f1, open(os.path.join(back, 'config.json')) as f2:
        c1, c2 = json.load(f1), json.load(f2)
    assert hf_dbrx.config_from_hf(c1) == hf_dbrx.config_from_hf(c2) == cfg
    assert c2['attn_config']['rope_theta'] == c2['rope_parameters']['rope_theta'] == cfg.rope_theta
    t1 = transformers.AutoConfig.from_pretrained(src).to_dict()
    t2 = transformers.AutoConfig.from_pretrained(back).to_dict()
    assert {k: v for k, v in t1.items() if k != '_name_or_path'} == {k: v for k, v in t2.items()
                                                                      if k != '_name_or_path'}
    for name in ('tokenizer.json', 'tokenizer_config.json'):
        with open(os.path.join(src, name), 'rb') as f1, open(os.path.join(back, name), 'rb') as f2:
            assert f1.read() == f2.read(), name

    # The intermediate checkpoint is a working model too.
    lm = mosaicjax.load_lm(mj, progress=False)
    assert F.rel_err(lm.logits(tokens), ref) < 1e-4
    assert lm.chat_template == F.CHAT_TEMPLATE and lm.tokenizer.pad_id == 1


def test_dtype_cast_on_the_way(hf_src, tmp_path):
    src, cfg, tokens, ref = hf_src
    mj, back = str(tmp_path / 'mj16'), str(tmp_path / 'back16')
    lm_convert.convert_lm(src, mj, dtype='bfloat16', progress=False)
    assert lm_checkpoint.read_meta(mj)['params_dtype'] == 'bfloat16'
    lm_convert.convert_lm(mj, back, to_hf=True, progress=False)
    with open(os.path.join(back, 'config.json')) as f:
        assert json.load(f)['torch_dtype'] == 'bfloat16'
    b = all_tensors(back)
    a = all_tensors(src)
    assert len(b) == len(a) and all(str(v.dtype) == 'bfloat16' for v in b.values())
    np.testing.assert_array_equal(b['lm_head.weight'], a['lm_head.weight'].astype(b['lm_head.weight'].dtype))
    lm = mosaicjax.load_lm(back, dtype='float32', progress=False)  # bf16 weights, float32 compute
    assert F.rel_err(lm.logits(tokens), ref) < 0.05


def test_pickle_checkpoint_needs_the_flag(tmp_path):
    import torch
    cfg = F.small_config(n_layers=1)
    src = tmp_path / 'pkl'
    os.makedirs(src)
    with open(src / 'config.json', 'w') as f:
        json.dump(cfg.to_hf_dict(), f)
    sd = F.random_state_dict(cfg, 6)
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, src / 'pytorch_model.bin')
    p = run_convert(f'--src={src}', f'--dst={tmp_path / "out"}')
    assert p.returncode == 2 and '--allow_pickle' in p.stderr, p.stderr
    assert not os.path.exists(tmp_path / 'out' / 'mosaicjax.json')
    lm_convert.convert_lm(str(src), str(tmp_path / 'out'), allow_pickle=True, progress=False)
    lm = mosaicjax.load_lm(str(tmp_path / 'out'), progress=False)
    np.testing.assert_array_equal(np.asarray(lm.params['blocks']['router']['kernel'][0]),
                                  sd['transformer.blocks.0.ffn.router.layer.weight'].T)


def test_image_models_go_to_diffusers_io(tmp_path, monkeypatch):
    from absl import flags

    from mosaicjax import convert
    src = tmp_path / 'sd'
    os.makedirs(src)
    (src / 'model_index.json').write_text('{"_class_name": "StableDiffusionPipeline"}')
    calls = []
    fake = types.ModuleType('mosaicjax.checkpoints.diffusers_io')
    fake.convert = lambda s, d, to_hf, dtype: calls.append((s, d, to_hf, dtype))
    monkeypatch.setitem(sys.modules, 'mosaicjax.checkpoints.diffusers_io', fake)
    import mosaicjax.checkpoints as ckpt_pkg
    monkeypatch.setattr(ckpt_pkg, 'diffusers_io', fake, raising=False)
    flags.FLAGS.unparse_flags()
    flags.FLAGS(['convert', f'--src={src}', f'--dst={tmp_path / "o"}', '--to=hf', '--dtype=float16'])
    try:
        convert.main([])
    finally:
        flags.FLAGS.unparse_flags()
    assert calls == [(str(src), str(tmp_path / 'o'), True, 'float16')]
