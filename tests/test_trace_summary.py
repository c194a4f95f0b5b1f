"""benchmarks/trace_summary.py: device timelines summed per op, and a real profiler trace read back on CPU."""
import jax
import jax.numpy as jnp
import pytest

from benchmarks import trace_summary


def _meta(pid, name):
    return {'ph': 'M', 'pid': pid, 'name': 'process_name', 'args': {'name': name}}


def test_summarize_sums_device_events_per_name_and_hlo_op():
    events = [
        _meta(1, '/host:CPU'), _meta(2, '/device:GPU:0'),
        {'ph': 'X', 'pid': 1, 'tid': 1, 'name': 'host_work', 'dur': 9000.0},  # host: not counted
        {'ph': 'X', 'pid': 2, 'tid': 7, 'name': 'gemm_a', 'dur': 3000.0, 'args': {'hlo_op': 'dot.1'}},
        {'ph': 'X', 'pid': 2, 'tid': 7, 'name': 'gemm_a', 'dur': 1000.0, 'args': {'hlo_op': 'dot.2'}},
        {'ph': 'X', 'pid': 2, 'tid': 8, 'name': 'fusion_b', 'dur': 1000.0, 'args': {'hlo_op': 'dot.1'}},
        {'ph': 'i', 'pid': 2, 'tid': 8, 'name': 'instant'},  # not a complete event
    ]
    s = trace_summary.summarize({'traceEvents': events})
    assert s['on_device'] and s['events'] == 3
    assert s['device_ms'] == pytest.approx(5.0)
    assert [(r['name'], r['ms'], r['count']) for r in s['by_name']] == [('gemm_a', 4.0, 2), ('fusion_b', 1.0, 1)]
    assert [(r['name'], r['ms']) for r in s['by_hlo_op']] == [('dot.1', 4.0), ('dot.2', 1.0)]
    assert s['by_hlo_op'][0]['share'] == pytest.approx(0.8)
    assert 'dot.1' in trace_summary.format_summary(s)


def test_profile_reads_a_real_trace(tmp_path):
    f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
    x = jnp.ones((128, 128))
    f(x).block_until_ready()
    s = trace_summary.profile(lambda: [f(x).block_until_ready() for _ in range(3)], str(tmp_path))
    assert not s['on_device']  # CPU: the XLA runtime threads stand in for a device timeline
    assert s['events'] > 0 and s['device_ms'] > 0 and s['wall_ms'] > 0
    assert s['by_name'] and all(r['ms'] >= 0 for r in s['by_name'])
