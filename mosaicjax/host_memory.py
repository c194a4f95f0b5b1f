"""Host memory for XLA:CPU processes: transparent huge pages for the big blocks XLA allocates at every step.

XLA:CPU allocates each executable's temporary buffer with malloc at every execution and frees it afterwards;
for the training benchmark's DBRX step (benchmarks/train_throughput.py) that is one 353 MB block per step.
glibc serves a block over its mmap threshold (32 MiB at most) with a fresh mmap and gives it back with munmap,
so at every step the kernel zero-fills the whole block again, one 4 KiB page fault at a time: 86k faults and
~150 ms of system time per ~450 ms step on 2 cores (getrusage and strace; BUILD_NOTES.md, "Session 6").

glibc's `glibc.malloc.hugetlb=1` tunable makes malloc advise transparent huge pages (madvise MADV_HUGEPAGE)
for the memory it maps, which the kernel honours in its common "madvise" THP mode: the same block then
faults in as ~170 pages of 2 MiB (~600 faults, ~45 ms of system time per step); user time fell too, likely
fewer TLB misses (this machine has no counters to show it). The benchmark's step: 366-432 ms with it against
441-504 ms without (4 alternating runs each). glibc reads tunables once, at process start, so the CLI mains
re-execute themselves with it set (`reexec_with_huge_pages`) and the training benchmark starts its JAX side
with `environ()`.

Measured and left out: keeping freed memory in the heap instead (mallopt: one arena, no mmap, no trimming)
removed the faults but not the wall time, and let the heap grow by several temporaries as blocks fragmented it.

Applies only where JAX runs on the CPU (a GPU or TPU host keeps glibc's defaults) and only with glibc on Linux.
Set MOSAICJAX_HUGE_PAGES=0 to leave the environment alone.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys

TUNABLE = 'glibc.malloc.hugetlb=1'


def _accelerator_plugins() -> list[str]:
    """Installed JAX backend plugins (CUDA, ROCm, ...) and libtpu: what JAX would prefer to the CPU."""
    names = [ep.name for ep in importlib.metadata.entry_points(group='jax_plugins')]
    try:
        import jax_plugins  # pylint: disable=import-outside-toplevel  # namespace package of the plugins
        names += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
    except ImportError:
        pass
    if importlib.util.find_spec('libtpu') is not None:
        names.append('libtpu')
    return names


def runs_on_cpu(env=None) -> bool:
    """Whether JAX will run on its CPU backend under `env` (default os.environ), without initialising JAX."""
    platforms = ((os.environ if env is None else env).get('JAX_PLATFORMS') or '').strip().lower()
    if platforms:
        return platforms.split(',')[0] == 'cpu'
    return not _accelerator_plugins()


def _has_glibc() -> bool:
    try:
        return bool(ctypes.CDLL(None).gnu_get_libc_version)
    except (OSError, AttributeError):  # musl and other C libraries: no glibc tunables
        return False


def applies(env=None) -> bool:
    """Whether the tunable is for a process started with `env` (default os.environ)."""
    env = os.environ if env is None else env
    return (env.get('MOSAICJAX_HUGE_PAGES', '1') != '0' and sys.platform.startswith('linux')
            and runs_on_cpu(env) and _has_glibc())


def environ(env=None) -> dict[str, str]:
    """`env` (default os.environ) with TUNABLE added to GLIBC_TUNABLES where it applies: for starting a process."""
    env = dict(os.environ if env is None else env)
    tunables = [t for t in env.get('GLIBC_TUNABLES', '').split(':') if t]
    if applies(env) and not any(t.startswith('glibc.malloc.hugetlb=') for t in tunables):
        env['GLIBC_TUNABLES'] = ':'.join(tunables + [TUNABLE])  # a user's own hugetlb setting wins
    return env


def reexec_with_huge_pages() -> None:
    """Replaces this process by itself started with `environ()`, once, when that adds the tunable.

    For CLI entry points only, first thing under `if __name__ == '__main__'`: the same interpreter and command
    line (sys.orig_argv) and the same pid, so callers and signals see one process. Returns when nothing changes
    (already set, not applicable) or when the exec fails.
    """
    env = environ()
    if env.get('GLIBC_TUNABLES') == os.environ.get('GLIBC_TUNABLES'):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:
        pass
