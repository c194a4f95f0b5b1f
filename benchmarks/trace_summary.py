"""Where a jitted program's time goes: one profiler trace, summed per device op.

    from benchmarks import trace_summary
    summary = trace_summary.profile(lambda: step(), '/tmp/trace')   # runs fn under jax.profiler.trace
    print(trace_summary.format_summary(summary))

jax.profiler.trace(create_perfetto_trace=True) writes a Chrome-trace JSON (perfetto_trace.json.gz) next to the
xplane file; no TensorBoard plugin is needed to read it. The summary sums the complete ('X') events of the device
timelines (processes whose name does not start with '/host': the GPU's kernels and memcpys, a TPU's ops) per
event name and, where events name their HLO op (args 'hlo_op' or 'long_name'), per HLO op; on CPU, where every
timeline is a host one, it sums the XLA:CPU runtime threads instead (names with 'XLA' or 'Eigen'), so the same
code runs in the CPU tests. Times are the sum of event durations: on a GPU, concurrent streams can make the sum
exceed the wall time, and idle gaps between kernels are not counted (the report shows the busy fraction).
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import time
from typing import Callable


def profile(fn: Callable[[], object], log_dir: str, top: int = 40) -> dict:
    """Runs fn() (which must block until its device work is done) under the profiler; returns summarize()'s dict
    plus 'wall_ms', the wall time of fn() while traced."""
    import jax  # pylint: disable=import-outside-toplevel
    os.makedirs(log_dir, exist_ok=True)
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    paths = sorted(glob.glob(os.path.join(log_dir, '**', 'perfetto_trace.json.gz'), recursive=True),
                   key=os.path.getmtime)
    if not paths:
        raise FileNotFoundError(f'no perfetto_trace.json.gz under {log_dir}')
    with gzip.open(paths[-1], 'rt') as f:
        trace = json.load(f)
    out = summarize(trace, top=top)
    out['wall_ms'] = wall * 1e3
    out['busy_fraction'] = out['device_ms'] / out['wall_ms'] if out['wall_ms'] else None
    return out


def _device_pids(events) -> set:
    """pids of the device timelines (processes not named '/host...'); empty on CPU."""
    names = {e['pid']: e.get('args', {}).get('name', '') for e in events
             if e.get('ph') == 'M' and e.get('name') == 'process_name'}
    return {pid for pid, name in names.items() if not name.startswith('/host')}


def summarize(trace, top: int = 30) -> dict:
    """{'device_ms', 'events', 'by_name': [{'name', 'ms', 'count', 'share'}], 'by_hlo_op': [...]} for a
    Chrome-trace dict or event list; each list is the `top` largest by summed duration."""
    events = trace['traceEvents'] if isinstance(trace, dict) else trace
    pids = _device_pids(events)
    on_device = bool(pids)
    if not on_device:  # CPU: the XLA runtime threads' events stand in for a device timeline
        threads = {(e['pid'], e.get('tid')) for e in events
                   if e.get('ph') == 'M' and e.get('name') == 'thread_name'
                   and any(k in e.get('args', {}).get('name', '') for k in ('XLA', 'Eigen'))}
        keep = lambda e: (e.get('pid'), e.get('tid')) in threads  # noqa: E731
    else:
        keep = lambda e: e.get('pid') in pids  # noqa: E731
    by_name, by_op = collections.defaultdict(lambda: [0.0, 0]), collections.defaultdict(lambda: [0.0, 0])
    total, count = 0.0, 0
    for e in events:
        if e.get('ph') != 'X' or not keep(e):
            continue
        dur = float(e.get('dur', 0.0)) / 1e3  # microseconds -> ms
        total += dur
        count += 1
        acc = by_name[e.get('name', '?')]
        acc[0] += dur
        acc[1] += 1
        args = e.get('args') or {}
        op = args.get('hlo_op') or args.get('long_name')
        if op:
            acc = by_op[str(op)]
            acc[0] += dur
            acc[1] += 1

    def table(d):
        rows = sorted(d.items(), key=lambda kv: -kv[1][0])[:top]
        return [{'name': k[:160], 'ms': v[0], 'count': v[1], 'share': v[0] / total if total else None}
                for k, v in rows]

    return {'device_ms': total, 'events': count, 'on_device': on_device, 'by_name': table(by_name),
            'by_hlo_op': table(by_op)}


def format_summary(summary: dict, rows: int = 15) -> str:
    """A short text table of the largest entries (by HLO op where the trace names them, else by event name)."""
    busy = summary.get('busy_fraction')
    head = (f"{summary['device_ms']:.1f} ms of {'device' if summary['on_device'] else 'XLA runtime'} events "
            f"({summary['events']} events" + (f', wall {summary["wall_ms"]:.1f} ms, busy {100 * busy:.0f}%'
                                              if busy is not None else '') + ')')
    table = summary['by_hlo_op'] or summary['by_name']
    lines = [head] + [f"  {r['ms']:9.2f} ms {100 * (r['share'] or 0):5.1f}% x{r['count']:<6d} {r['name'][:100]}"
                      for r in table[:rows]]
    return '\n'.join(lines)
