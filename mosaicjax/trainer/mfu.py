"""Model FLOPs utilisation: achieved model FLOP/s over the hardware's peak.

MFU = flops_per_step / (step_time_sec * num_devices * peak_flops_per_device), where flops_per_step counts the
model's useful FLOPs for one optimizer step over the whole global batch (forward + backward, no rematerialisation:
PaLM's definition, the one MaxText, llm-foundry and levanter report).

Accelerator peaks are the vendor's *dense bfloat16* matrix-unit figures (no 2:4 sparsity), per JAX device. bf16 is
the convention even for runs that keep float32 parameters: it is the rate the hardware can reach for training
matmuls, so MFU stays comparable across runs and codebases. For reference only (not used here): NVIDIA A100 TF32
156 TFLOP/s, H100 SXM TF32 495 TFLOP/s; plain float32 (non-tensor-core) is 19.5 / 67 TFLOP/s. TPUs have no faster
float32 path: float32 matmuls run as (multi-pass) bf16 on the MXU.

On TPU v2/v3 each JAX device is one TensorCore (half a chip), so the table holds half the chip's figure; from v4
on a JAX device is a whole chip (megacore, or a single-core lite chip).

CPU has no datasheet figure, so the framework measures one: the best of a few float32 2048x2048 jitted matmuls on
one CPU device. XLA:CPU runs one matmul on the process's whole intra-op thread pool, i.e. on all host cores, so
this is the *host's* peak. With XLA_FLAGS=--xla_force_host_platform_device_count=8 the eight fake devices share
those same cores; `peak_flops_per_device` therefore returns host_peak / local_cpu_device_count, which makes the
usual formula read total achieved FLOP/s / measured host peak, not a per-fake-device ratio. (Several processes on
one host, as in the multi-process tests, each count the host's peak once; their MFU is per process.) The
measurement takes about a second and is cached as JSON in $MOSAICJAX_CACHE_DIR/cpu_peak.json (default
~/.cache/mosaicjax), keyed by CPU model, usable core count and jaxlib version; delete the file or call
`cpu_peak_flops(refresh=True)` after a hardware change or a measurement taken on a busy host.

MOSAICJAX_PEAK_FLOPS=<FLOP/s per device> overrides every lookup (unknown hardware, or a fixed CPU figure for
reproducible numbers).
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import platform
import re
import tempfile
import time
from typing import Any

from absl import logging

# Dense bf16 peak FLOP/s per JAX device. Keys are tags; `_KIND_PATTERNS` maps device_kind strings onto them.
PEAK_FLOPS: dict[str, float] = {
    'tpu_v2': 22.5e12,  # 45 TFLOP/s per chip, 2 TensorCores = 2 JAX devices.
    'tpu_v3': 61.5e12,  # 123 TFLOP/s per chip, 2 TensorCores = 2 JAX devices.
    'tpu_v4': 275e12,
    'tpu_v5e': 197e12,  # device_kind 'TPU v5 lite'.
    'tpu_v5p': 459e12,  # device_kind 'TPU v5' (or 'TPU v5p').
    'tpu_v6e': 918e12,  # Trillium; device_kind 'TPU v6 lite'.
    'a100': 312e12,  # SXM4 and PCIe, 40 and 80 GB alike.
    'h100_sxm': 989.5e12,  # device_kind 'NVIDIA H100 80GB HBM3'.
    'h100_pcie': 756.5e12,
    'h100_nvl': 835.5e12,
    'h200': 989.5e12,  # H200 SXM; same tensor cores as H100 SXM, more HBM.
    'h200_nvl': 835.5e12,
    'gh200': 989.5e12,
}

# (regex over the lower-cased, whitespace-normalised device_kind, tag). First match wins, so the more specific
# variants come first; anchored TPU patterns keep e.g. 'TPU v4 lite' (v4i, not in the table) from reading as v4.
_KIND_PATTERNS: list[tuple[str, str]] = [
    (r'^tpu v2$', 'tpu_v2'),
    (r'^tpu v3$', 'tpu_v3'),
    (r'^tpu v4$', 'tpu_v4'),
    (r'^tpu v5 ?(lite|e)$', 'tpu_v5e'),
    (r'^tpu v5p?$', 'tpu_v5p'),
    (r'^tpu (v6 ?(lite|e)|trillium)$', 'tpu_v6e'),
    (r'\ba100\b', 'a100'),
    (r'\bgh200\b', 'gh200'),
    (r'\bh200\b.*\bnvl\b', 'h200_nvl'),
    (r'\bh200\b', 'h200'),
    (r'\bh100\b.*\bpcie\b', 'h100_pcie'),
    (r'\bh100\b.*\bnvl\b', 'h100_nvl'),
    (r'\bh100\b', 'h100_sxm'),
]

PEAK_FLOPS_ENV = 'MOSAICJAX_PEAK_FLOPS'
CACHE_DIR_ENV = 'MOSAICJAX_CACHE_DIR'
CPU_PEAK_FILE = 'cpu_peak.json'


def device_kind_tag(device_kind: str) -> str | None:
    """The PEAK_FLOPS key for a JAX `device_kind` string, or None when the hardware is not in the table."""
    kind = ' '.join(device_kind.lower().replace('_', ' ').split())
    kind = kind.replace('-', ' ')  # 'nvidia a100-sxm4-40gb' -> word boundaries the patterns can see.
    for pattern, tag in _KIND_PATTERNS:
        if re.search(pattern, kind):
            return tag
    return None


def peak_flops_for_kind(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s per device for an accelerator `device_kind`, or None when unknown."""
    tag = device_kind_tag(device_kind)
    return None if tag is None else PEAK_FLOPS[tag]


@functools.lru_cache(maxsize=None)
def _warn_unknown(device_kind: str) -> None:
    logging.warning(
        'mosaicjax.mfu: no peak FLOP/s known for device kind %r; MFU will be NaN. Set %s=<FLOP/s per device> '
        'to supply one.', device_kind, PEAK_FLOPS_ENV)


def peak_flops_per_device(device: Any = None) -> float:
    """Peak FLOP/s of one JAX device (default: `jax.devices()[0]`), as `mfu` divides by.

    Accelerators: the dense bf16 table above (NaN, with a warning once, for unknown hardware). CPU: the measured,
    cached host peak divided by the number of local CPU devices (see the module docstring).
    """
    override = os.environ.get(PEAK_FLOPS_ENV)
    if override:
        return float(override)
    import jax  # Deferred so that reading the table does not start a backend.

    if device is None:
        device = jax.devices()[0]
    if device.platform == 'cpu':
        return cpu_peak_flops() / len(jax.local_devices(backend='cpu'))
    peak = peak_flops_for_kind(device.device_kind)
    if peak is None:
        _warn_unknown(device.device_kind)
        return math.nan
    return peak


def mfu(flops_per_step: float, step_time_sec: float, num_devices: int, peak: float | None = None) -> float:
    """Model FLOPs utilisation as a fraction in [0, 1] (metrics.jsonl stores the fraction; logs print percent).

    Args:
      flops_per_step: model FLOPs of one optimizer step over the global batch (all devices together).
      step_time_sec: wall-clock seconds of that step.
      num_devices: devices the step ran on (`jax.device_count()`).
      peak: peak FLOP/s per device; default `peak_flops_per_device()`.
    Returns NaN when the peak is unknown or the step time is not positive.
    """
    if peak is None:
        peak = peak_flops_per_device()
    denominator = step_time_sec * num_devices * peak
    if not denominator > 0:  # Also catches NaN.
        return math.nan
    return flops_per_step / denominator


# --------------------------------------------------------------------------------------------- CPU peak, measured


def cache_dir() -> str:
    """Where mosaicjax caches machine facts: $MOSAICJAX_CACHE_DIR, else ~/.cache/mosaicjax."""
    return os.environ.get(CACHE_DIR_ENV) or os.path.join(os.path.expanduser('~'), '.cache', 'mosaicjax')


def _cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.lower().startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or 'unknown-cpu'


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # A container's or taskset's share, not the whole host.
    except AttributeError:
        return os.cpu_count() or 1


def machine_key() -> str:
    """Cache key of the CPU peak: CPU model, usable cores and jaxlib version (XLA's CPU matmuls change with it)."""
    try:
        import jaxlib

        jaxlib_version = jaxlib.__version__
    except Exception:  # pragma: no cover - jaxlib always ships with jax.
        jaxlib_version = 'unknown'
    return f'{_cpu_model()} | {_usable_cores()} cores | jaxlib {jaxlib_version}'


def measure_cpu_peak_flops(n: int = 2048, reps: int = 5, budget_sec: float = 1.0) -> float:
    """Best-of-`reps` FLOP/s of a float32 n x n jitted matmul on one CPU device (= all host cores; see module doc).

    Stops early once `budget_sec` is spent after the first timed rep, so a slow host still finishes quickly.
    """
    import jax
    import jax.numpy as jnp

    device = jax.local_devices(backend='cpu')[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), device)  # [n, n]
    b = jax.device_put(jnp.full((n, n), 0.5, jnp.float32), device)  # [n, n]
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()  # Compile and warm the thread pool; not timed.
    best = math.inf
    start = time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > budget_sec:
            break
    return 2.0 * n**3 / best


def _read_cache(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: str, data: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # Write-then-rename: concurrent processes on one host never see a half-written file.
    fd, tmp = tempfile.mkstemp(prefix='.cpu_peak.', dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, 'w') as f:
            json.dump(data, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


_memo: dict[tuple[str, str], float] = {}


def cpu_peak_flops(refresh: bool = False) -> float:
    """The host's measured float32 matmul peak in FLOP/s: from memory, else the JSON cache, else measured once.

    A cache that cannot be written (read-only home) only costs re-measuring in the next process.
    """
    path = os.path.join(cache_dir(), CPU_PEAK_FILE)
    key = machine_key()
    if not refresh and (path, key) in _memo:
        return _memo[(path, key)]
    data = _read_cache(path)
    entry = data.get(key)
    if refresh or not isinstance(entry, dict) or not entry.get('flops_per_sec', 0) > 0:
        flops = measure_cpu_peak_flops()
        logging.info('mosaicjax.mfu: measured CPU peak %.1f GFLOP/s for %s; caching in %s', flops / 1e9, key, path)
        data = _read_cache(path)  # Re-read: another process may have added its own machine meanwhile.
        data[key] = {
            'flops_per_sec': flops,
            'method': 'best of float32 2048x2048 jax.jit matmul on one CPU device',
            'measured_at': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        }
        try:
            _write_cache(path, data)
        except OSError as e:
            logging.warning('mosaicjax.mfu: could not cache the CPU peak in %s: %s', path, e)
        entry = data[key]
    _memo[(path, key)] = float(entry['flops_per_sec'])
    return _memo[(path, key)]
