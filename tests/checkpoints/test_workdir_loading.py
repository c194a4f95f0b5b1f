"""load_lm / convert on a training workdir: config from config.gin, newest params only, workdir tokenizer."""
import json
import os
import random
import subprocess
import sys
import warnings

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lm_fixtures as F  # noqa: E402  pylint: disable=wrong-import-position

import mosaicjax  # noqa: E402
from mosaicjax import config as config_lib  # noqa: E402
from mosaicjax.checkpoints import hf_dbrx, lm_convert, safetensors_io  # noqa: E402
from mosaicjax.models import dbrx  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["DbrxConfig.d_model=32", "DbrxConfig.n_heads=4", "DbrxConfig.kv_n_heads=2", "DbrxConfig.n_layers=2",
        "DbrxConfig.max_seq_len=64", "DbrxConfig.vocab_size=320", "DbrxConfig.ffn_hidden_size=24",
        "DbrxConfig.moe_num_experts=4", "DbrxConfig.rope_theta=20000.0", "data.eval_fraction=0.0",
        "tokenizer.vocab_size=300", "tokenizer.train_max_bytes=100000", "train.num_steps=2", "train.batch_size=2",
        "train.seq_len=16", "train.log_every=1", "train.checkpoint_every=1", "train.eval_every=0",
        "train.eval_batches=1", "checkpoint.async_save=False", "metrics.tensorboard=False",
        "mesh.shape={'data': -1}", "optimizer.learning_rate=0.05", "optimizer.warmup_steps=0"]


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    """Two training steps of a tiny DBRX (checkpoints at steps 1 and 2) with a sentencepiece tokenizer."""
    root = tmp_path_factory.mktemp('wd')
    rng = random.Random(0)
    words = 'def return self import class for in if else None value print len x y = ( ) : + 1 0'.split()
    os.makedirs(root / 'data')
    for i in range(6):
        (root / 'data' / f'd{i}.txt').write_text(
            '\n'.join(' '.join(rng.choice(words) for _ in range(10)) for _ in range(40)))
    # A subprocess on one host device: compiling the train step for 8 fake devices would cost more than it tests.
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu')
    args = [f'--gin_param={b}' for b in TINY + [f"data.paths='{root / 'data' / '*.txt'}'"]]
    p = subprocess.run([sys.executable, '-m', 'mosaicjax.train', '--gin_file=experiments/quickstart.gin',
                        f'--workdir={root / "run"}', *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return str(root / 'run')


def test_load_lm_from_a_training_workdir(workdir, capfd):
    import orbax.checkpoint as ocp
    config_lib.parse([], ['train.num_steps=7'])  # someone else's bindings survive load_lm
    lm = mosaicjax.load_lm(workdir)
    assert gin.query_parameter('train.num_steps') == 7
    gin.clear_config()
    assert 'loaded step 2' in capfd.readouterr().err
    assert (lm.config.d_model, lm.config.n_layers, lm.config.rope_theta) == (32, 2, 20000.0)
    assert type(lm.tokenizer).__name__ == 'SentencePieceTokenizer'
    assert lm.tokenizer.path == os.path.join(workdir, 'tokenizer.model')

    # The newest step's params, exactly; the optimizer state was not needed (nor restored).
    with warnings.catch_warnings():  # no target shardings: Orbax warns and uses the saved ones
        warnings.simplefilter('ignore')
        state = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, 'checkpoints', '2', 'state'))
    assert set(state) == {'params', 'opt_state', 'step', 'rng'}
    for a, b in zip(jax.tree.leaves(lm.params), jax.tree.leaves(state['params'])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens = np.asarray([lm.tokenizer.encode('def value(x): return x + 1')[:12]], np.int32)
    want, _ = jax.jit(dbrx.Dbrx(lm.config).apply)({'params': state['params']}, jnp.asarray(tokens))
    np.testing.assert_allclose(lm.logits(tokens), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_export_a_workdir_to_hf_and_mosaicjax(workdir, tmp_path):
    pytest.importorskip('torch')
    lm = mosaicjax.load_lm(workdir, progress=False)
    tokens = np.random.default_rng(0).integers(0, 300, (2, 10))
    ours = lm.logits(tokens)

    hf = str(tmp_path / 'hf')
    lm_convert.convert_lm(workdir, hf, to_hf=True, progress=False)
    assert os.path.exists(os.path.join(hf, 'tokenizer.model'))
    with open(os.path.join(hf, 'config.json')) as f:
        assert hf_dbrx.config_from_hf(json.load(f)).rope_theta == 20000.0
    with safetensors_io.open_weights(hf) as reader:
        state_dict = {k: reader.read(k) for k in reader.keys()}
    model = F.torch_model(lm.config, state_dict)
    assert F.rel_err(ours, F.reference_logits(model, tokens)) < 1e-4

    mj = str(tmp_path / 'mj')
    lm_convert.convert_lm(workdir, mj, progress=False)
    again = mosaicjax.load_lm(mj, progress=False)
    assert type(again.tokenizer).__name__ == 'SentencePieceTokenizer'
    np.testing.assert_array_equal(again.logits(tokens), ours)
