"""Peak-FLOP/s table, the measured-and-cached CPU peak, and the MFU formula."""
import json
import math
import os
import time
import types

import jax
import pytest

from mosaicjax.trainer import mfu as mfu_lib


@pytest.mark.parametrize('kind, tag', [
    ('TPU v2', 'tpu_v2'),
    ('TPU v3', 'tpu_v3'),
    ('TPU v4', 'tpu_v4'),
    ('TPU v5 lite', 'tpu_v5e'),
    ('TPU v5e', 'tpu_v5e'),
    ('TPU v5', 'tpu_v5p'),
    ('TPU v5p', 'tpu_v5p'),
    ('TPU v6 lite', 'tpu_v6e'),
    ('TPU v6e', 'tpu_v6e'),
    ('TPU trillium', 'tpu_v6e'),
    ('NVIDIA A100-SXM4-40GB', 'a100'),
    ('NVIDIA A100-SXM4-80GB', 'a100'),
    ('NVIDIA A100-PCIE-40GB', 'a100'),
    ('NVIDIA A100 80GB PCIe', 'a100'),
    ('NVIDIA H100 80GB HBM3', 'h100_sxm'),
    ('NVIDIA H100', 'h100_sxm'),
    ('NVIDIA H100 PCIe', 'h100_pcie'),
    ('NVIDIA H100 NVL', 'h100_nvl'),
    ('NVIDIA H200', 'h200'),
    ('NVIDIA H200 NVL', 'h200_nvl'),
    ('NVIDIA GH200 480GB', 'gh200'),
    ('  nvidia   h100 80gb hbm3 ', 'h100_sxm'),  # case and spacing do not matter
])
def test_device_kind_matching(kind, tag):
    assert mfu_lib.device_kind_tag(kind) == tag
    assert mfu_lib.peak_flops_for_kind(kind) == mfu_lib.PEAK_FLOPS[tag]


@pytest.mark.parametrize('kind', ['TPU v4 lite', 'TPU7x', 'NVIDIA GeForce RTX 4090', 'Tesla V100-SXM2-16GB', 'cpu',
                                  'NVIDIA H1000'])
def test_unknown_kinds_are_not_guessed(kind):
    assert mfu_lib.device_kind_tag(kind) is None


def test_table_values_are_dense_bf16_datasheet_figures():
    t = mfu_lib.PEAK_FLOPS
    assert t['tpu_v4'] == 275e12 and t['tpu_v5e'] == 197e12 and t['tpu_v5p'] == 459e12 and t['tpu_v6e'] == 918e12
    assert t['a100'] == 312e12 and t['h100_sxm'] == 989.5e12 and t['h200'] == t['h100_sxm']


def _fake_device(platform, kind):
    return types.SimpleNamespace(platform=platform, device_kind=kind)


def test_peak_for_accelerator_devices(monkeypatch):
    monkeypatch.delenv(mfu_lib.PEAK_FLOPS_ENV, raising=False)
    assert mfu_lib.peak_flops_per_device(_fake_device('tpu', 'TPU v5 lite')) == 197e12
    assert mfu_lib.peak_flops_per_device(_fake_device('gpu', 'NVIDIA H100 80GB HBM3')) == 989.5e12
    assert math.isnan(mfu_lib.peak_flops_per_device(_fake_device('gpu', 'NVIDIA Future 9000')))


def test_env_override(monkeypatch):
    monkeypatch.setenv(mfu_lib.PEAK_FLOPS_ENV, '1.5e14')
    assert mfu_lib.peak_flops_per_device(_fake_device('gpu', 'NVIDIA Future 9000')) == 1.5e14
    assert mfu_lib.peak_flops_per_device() == 1.5e14


def test_mfu_arithmetic():
    # 8 devices of 100 TFLOP/s for 0.5 s can do 4e14 FLOPs; a step of 1e14 model FLOPs is 25% MFU.
    assert mfu_lib.mfu(1e14, 0.5, 8, peak=100e12) == pytest.approx(0.25)
    assert mfu_lib.mfu(6 * 1e9 * 4096, 2.0, 1, peak=989.5e12) == pytest.approx(6 * 1e9 * 4096 / 2.0 / 989.5e12)
    assert math.isnan(mfu_lib.mfu(1e14, 0.0, 8, peak=100e12))
    assert math.isnan(mfu_lib.mfu(1e14, 0.5, 8, peak=math.nan))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(mfu_lib.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(mfu_lib.PEAK_FLOPS_ENV, raising=False)
    monkeypatch.setattr(mfu_lib, '_memo', {})
    calls = []

    def fake_measure(*args, **kwargs):
        calls.append(1)
        return 123e9

    monkeypatch.setattr(mfu_lib, 'measure_cpu_peak_flops', fake_measure)
    return tmp_path, calls


def test_cpu_peak_measured_once_and_cached(cache, monkeypatch):
    tmp_path, calls = cache
    assert mfu_lib.cpu_peak_flops() == 123e9
    assert len(calls) == 1
    with open(tmp_path / 'cpu_peak.json') as f:
        data = json.load(f)
    assert data[mfu_lib.machine_key()]['flops_per_sec'] == 123e9
    assert mfu_lib.cpu_peak_flops() == 123e9  # in-process memo
    monkeypatch.setattr(mfu_lib, '_memo', {})  # a new process: the file answers
    assert mfu_lib.cpu_peak_flops() == 123e9
    assert len(calls) == 1
    mfu_lib.cpu_peak_flops(refresh=True)
    assert len(calls) == 2


def test_cache_keyed_by_machine_and_tolerates_garbage(cache, monkeypatch):
    tmp_path, calls = cache
    (tmp_path / 'cpu_peak.json').write_text('{"other machine | 64 cores | jaxlib 0": {"flops_per_sec": 9e12}}')
    assert mfu_lib.cpu_peak_flops() == 123e9  # another machine's figure is not ours
    data = json.loads((tmp_path / 'cpu_peak.json').read_text())
    assert len(data) == 2  # and is kept for that machine
    monkeypatch.setattr(mfu_lib, '_memo', {})
    (tmp_path / 'cpu_peak.json').write_text('not json')
    assert mfu_lib.cpu_peak_flops() == 123e9
    assert len(calls) == 2


def test_cpu_peak_per_device_shares_the_host(cache):
    # The fake host-platform devices (conftest: 8) share the host's cores, so each gets 1/n of the measured peak
    # and total achieved / host peak is what the formula computes.
    n = len(jax.local_devices(backend='cpu'))
    assert mfu_lib.peak_flops_per_device(jax.devices('cpu')[0]) == pytest.approx(123e9 / n)
    per_device = mfu_lib.peak_flops_per_device(jax.devices('cpu')[0])
    assert mfu_lib.mfu(123e9 * 0.5, 1.0, n, peak=per_device) == pytest.approx(0.5)


def test_real_measurement_is_quick_and_plausible(tmp_path, monkeypatch):
    monkeypatch.setenv(mfu_lib.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(mfu_lib, '_memo', {})
    t0 = time.perf_counter()
    flops = mfu_lib.cpu_peak_flops()
    elapsed = time.perf_counter() - t0
    assert 1e9 < flops < 1e14  # a GFLOP/s to a hundred TFLOP/s: a CPU
    assert elapsed < 3.0, elapsed
    assert os.path.exists(tmp_path / 'cpu_peak.json')
    t0 = time.perf_counter()
    monkeypatch.setattr(mfu_lib, '_memo', {})
    assert mfu_lib.cpu_peak_flops() == flops
    assert time.perf_counter() - t0 < 0.1  # read from the file, not measured again
