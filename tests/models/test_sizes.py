"""The DBRX size family (experiments/dbrx/*.gin), mosaicjax.models.sizing and the params CLI.

Full-size models are only ever built with jax.eval_shape: no parameter memory is allocated.
"""
import os
import re
import subprocess
import sys

import gin
import pytest

from mosaicjax import config as config_lib
from mosaicjax.models import dbrx, sizing
from mosaicjax.parallel import mesh as mesh_lib
from mosaicjax.parallel import rules as rules_lib
from mosaicjax.trainer.config import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The launch talk's (total, active) for each size; the 132B is the published DBRX.
TALK = {'9b': (9e9, 2.6e9), '19b': (19e9, 5.2e9), '36b': (36e9, 10e9), '73b': (73e9, 20e9), '132b': (132e9, 36e9)}
TOLERANCE = 0.03  # "within a few percent"; every size is in fact within 1.3%
GIB = 1024 ** 3


def _gin_file(size):
    return os.path.join(ROOT, 'experiments', 'dbrx', f'dbrx_{size}.gin')


@pytest.fixture
def parsed():
    """Parses a size's gin file; clears gin afterwards so other tests see defaults."""
    def parse(size, *bindings):
        config_lib.parse([_gin_file(size)], bindings)
        return dbrx.DbrxConfig(), TrainConfig()
    yield parse
    gin.clear_config()


@pytest.mark.parametrize('size', sorted(TALK))
def test_size_hits_the_talk_numbers(size, parsed):
    cfg, train = parsed(size)
    params = sizing.abstract_params(cfg)  # jax.eval_shape of Dbrx.init: shapes only
    rows = sizing.component_counts(cfg, params)
    total, active = TALK[size]
    assert abs(rows['total']['total'] / total - 1) < TOLERANCE, rows['total']
    assert abs(rows['total']['active'] / active - 1) < TOLERANCE, rows['total']
    # The parameter tree agrees with the analytic count, component by component where both define one.
    analytic = dbrx.count_params(cfg)
    assert rows['total']['total'] == analytic['total']
    assert rows['total']['active'] == analytic['active']
    assert rows['embedding']['total'] == analytic['embedding']
    # Family invariants and sensible shapes.
    assert (cfg.moe_num_experts, cfg.moe_top_k, cfg.vocab_size, cfg.head_dim) == (16, 4, 100352, 128)
    assert cfg.d_model % 256 == 0 and cfg.ffn_hidden_size % 256 == 0
    assert cfg.n_heads % cfg.kv_n_heads == 0
    assert (cfg.rope_theta, cfg.clip_qkv, cfg.max_seq_len) == (500000.0, 8.0, 32768)
    assert train.seq_len == 4096


def test_132b_is_the_published_dbrx(parsed):
    cfg, _ = parsed('132b')
    published = dbrx.DbrxConfig(moe_jitter_eps=0.01)  # the HF dbrx-base config.json (see test_hf_dbrx_parity)
    hf_fields = ('d_model', 'n_heads', 'n_layers', 'max_seq_len', 'vocab_size', 'kv_n_heads', 'clip_qkv',
                 'rope_theta', 'ffn_hidden_size', 'moe_num_experts', 'moe_top_k', 'moe_jitter_eps',
                 'moe_loss_weight', 'moe_normalize_expert_weights')
    assert {f: getattr(cfg, f) for f in hf_fields} == {f: getattr(published, f) for f in hf_fields}
    rows = sizing.component_counts(cfg)
    assert round(rows['total']['total'] / 1e9) == 132 and round(rows['total']['active'] / 1e9) == 36
    assert rows['experts']['active'] * 4 == rows['experts']['total']  # top-4 of 16


@pytest.mark.parametrize('size', sorted(TALK))
def test_launch_config_fits_its_intended_slice(size, parsed):
    """The device count documented in the file's params command gives a valid layout that fits 80 GiB."""
    text = open(_gin_file(size)).read()
    m = re.search(r'--num_devices=(\d+) --device_memory_gib=(\d+)', text)
    assert m, 'each size documents its intended slice as a params command'
    cfg, train = parsed(size)
    shape = mesh_lib.MeshConfig().shape
    assert shape['data'] == -1
    plan = sizing.memory_plan(cfg, shape, int(m.group(1)), batch_size=train.batch_size, seq_len=train.seq_len,
                              grad_accum_steps=train.grad_accum_steps, rules=rules_lib.get_rules(),
                              device_memory=int(m.group(2)) * GIB)
    assert plan.problems == ()
    assert plan.fits, sizing.format_plan(cfg, plan, batch_size=train.batch_size, seq_len=train.seq_len,
                                         grad_accum_steps=train.grad_accum_steps)


@pytest.mark.parametrize('scan_layers', [True, False])
def test_eval_shape_tree_agrees_with_count_params(scan_layers):
    cfg = dbrx.DbrxConfig(d_model=256, n_heads=2, kv_n_heads=1, n_layers=3, ffn_hidden_size=384, vocab_size=1000,
                          moe_num_experts=8, moe_top_k=2, scan_layers=scan_layers)
    rows = sizing.component_counts(cfg)
    analytic = dbrx.count_params(cfg)
    assert (rows['total']['total'], rows['total']['active']) == (analytic['total'], analytic['active'])
    assert rows['lm_head']['total'] == rows['embedding']['total'] == 1000 * 256
    assert rows['router']['total'] == 3 * 256 * 8
    assert rows['norms']['total'] == (2 * 3 + 1) * 256
    assert rows['experts']['active'] == rows['experts']['total'] // 4


def test_local_shape_follows_the_rules():
    sizes = {'data': 2, 'fsdp': 4, 'expert': 2, 'tensor': 8}
    rules = rules_lib.DEFAULT_RULES
    assert sizing.local_shape((40, 6144, 8192), ('layers', 'embed', 'qkv'), sizes, rules) == (40, 1536, 1024)
    assert sizing.local_shape((40, 172032, 6144), ('layers', 'exp_mlp', 'embed'), sizes, rules) == (40, 86016, 1536)
    assert sizing.local_shape((100, 7), ('vocab', None), sizes, rules) == (13, 7)  # uneven: padded shards
    assert sizing.local_shape((6144,), ('norm',), sizes, rules) == (6144,)


def test_memory_plan_scales_and_flags_bad_layouts():
    cfg = dbrx.DbrxConfig(d_model=512, n_heads=4, kv_n_heads=2, n_layers=2, ffn_hidden_size=512, vocab_size=4096,
                          dtype='bfloat16', remat='full')
    params = sizing.abstract_params(cfg)
    small = sizing.memory_plan(cfg, {'data': -1, 'fsdp': 2}, 8, batch_size=8, seq_len=128, params=params)
    big = sizing.memory_plan(cfg, {'data': -1, 'fsdp': 8}, 8, batch_size=8, seq_len=128, params=params)
    assert big.params < small.params and big.optimizer < small.optimizer
    assert small.optimizer == pytest.approx(2 * small.params, rel=1e-3)  # AdamW mu + nu, float32
    assert small.micro_batch == big.micro_batch == 1
    assert small.fits is None and small.problems == ()
    bad = sizing.memory_plan(cfg, {'data': -1, 'expert': 8}, 8, batch_size=12, seq_len=128, params=params,
                             grad_accum_steps=2, device_memory=1)
    assert bad.fits is False
    assert any('batch_size=12' in p for p in bad.problems)
    assert not any('moe_num_experts' in p for p in bad.problems)  # 16 experts over 8: fine
    with pytest.raises(mesh_lib.MeshError):
        sizing.memory_plan(cfg, {'data': -1, 'fsdp': 3}, 8, batch_size=8, seq_len=128, params=params)


# ----------------------------------------------------------------------------------------------------------
# The CLI, in subprocesses (run concurrently to keep the file fast)

_CLI_RUNS = {
    '9b': ['--gin_file=experiments/dbrx/dbrx_9b.gin'],  # default --num_devices: this process's 8 host devices
    '132b': ['--gin_file=experiments/dbrx/dbrx_132b.gin', '--num_devices=1024', '--device_memory_gib=80'],
    '132b_fsdp256': ['--gin_file=experiments/dbrx/dbrx_132b.gin', '--num_devices=1024',
                     "--gin_param=mesh.shape={'data': -1, 'fsdp': 256, 'expert': 4}", '--device_memory_gib=80'],
}


@pytest.fixture(scope='module')
def cli_outputs():
    procs = {name: subprocess.Popen([sys.executable, '-m', 'mosaicjax.params', *args], cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, args in _CLI_RUNS.items()}
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        out[name] = stdout
    return out


def _memory_fields(stdout):
    line = next(l for l in stdout.splitlines() if l.startswith('memory_per_device_bytes='))
    return dict(kv.split('=') for kv in line.split())


@pytest.mark.parametrize('size', ['9b', '132b'])
def test_params_cli_prints_counts_and_table(size, cli_outputs, parsed):
    stdout = cli_outputs[size]
    first = stdout.splitlines()[0]
    m = re.fullmatch(r'total_params=(\d+) active_params=(\d+)', first)
    assert m, first
    cfg, _ = parsed(size)
    analytic = dbrx.count_params(cfg)
    assert (int(m.group(1)), int(m.group(2))) == (analytic['total'], analytic['active'])
    lines = stdout.splitlines()
    header = next(i for i, l in enumerate(lines) if l.split()[:3] == ['component', 'total', 'active'])
    table = {}
    for line in lines[header + 1:header + 1 + len(sizing.COMPONENTS) + 1]:
        name, total, active = line.split()[:3]
        table[name] = (int(total.replace(',', '')), int(active.replace(',', '')))
    assert set(table) == set(sizing.COMPONENTS) | {'total'}
    assert sum(t for t, _ in (table[c] for c in sizing.COMPONENTS)) == table['total'][0] == analytic['total']
    assert sum(a for _, a in (table[c] for c in sizing.COMPONENTS)) == table['total'][1] == analytic['active']
    assert 'memory_per_device_bytes=' in stdout


def test_params_cli_bytes_per_device_fall_with_fsdp(cli_outputs):
    base, wide = _memory_fields(cli_outputs['132b']), _memory_fields(cli_outputs['132b_fsdp256'])
    assert "'fsdp': 32" in cli_outputs['132b'] and "'fsdp': 256" in cli_outputs['132b_fsdp256']
    for key in ('params_bytes', 'optimizer_bytes', 'gradients_bytes', 'memory_per_device_bytes'):
        assert int(wide[key]) < int(base[key]), key
    # Almost every parameter is split over fsdp: 8x the fsdp gives nearly 8x fewer parameter bytes per device.
    assert int(base['params_bytes']) / int(wide['params_bytes']) > 7.5
    assert base['fits'] == 'yes'
