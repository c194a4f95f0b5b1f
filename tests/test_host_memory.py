"""mosaicjax.host_memory: a jitted program's big temporary buffer faults in as huge pages, and the CLI mains
re-execute themselves to get the tunable (glibc reads it only at process start)."""
import json
import os
import subprocess
import sys

import pytest

from mosaicjax import host_memory

# A program with a 64 MiB temporary (sin(x) has two matmul consumers, so XLA must materialise it), called
# repeatedly; prints the minor page faults of 20 calls after warm-up.
_PROBE = r'''
import json, resource
import jax, jax.numpy as jnp
x = jnp.ones((2048, 8192), jnp.float32)  # 64 MiB
u, v = jnp.ones((8192,), jnp.float32), jnp.ones((2048,), jnp.float32)
f = jax.jit(lambda x: (jnp.sin(x) @ u).sum() + (v @ jnp.sin(x)).sum())
for _ in range(3):
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    f(x).block_until_ready()
print(json.dumps({'faults': resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
'''

_SMALL_PAGES = (64 << 20) // 4096  # faults to map the temporary in 4 KiB pages


def _thp_mode() -> str:
    try:
        with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
            return f.read().split('[')[1].split(']')[0]
    except (OSError, IndexError):
        return 'unknown'


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'MOSAICJAX_HUGE_PAGES')}
    return {**env, 'JAX_PLATFORMS': 'cpu', **extra}


def _faults(env) -> int:
    out = subprocess.run([sys.executable, '-c', _PROBE], env=env, capture_output=True, text=True, timeout=300,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])['faults']


@pytest.mark.skipif(not host_memory.applies(_env()) or _thp_mode() != 'madvise',
                    reason="needs glibc on Linux and the kernel's THP mode 'madvise' (where the tunable matters)")
def test_temporary_buffer_faults_in_as_huge_pages():
    default = _faults(_env())
    huge = _faults(host_memory.environ(_env()))
    # glibc's default maps the 64 MiB block afresh at every call, in 4 KiB pages.
    assert default > 20 * 0.9 * _SMALL_PAGES, default
    # With the tunable the same blocks come in 2 MiB pages: 32 faults per call where there were 16384.
    assert huge < 20 * 0.05 * _SMALL_PAGES, huge


def test_environ_adds_the_tunable_once_and_keeps_the_users_own():
    env = host_memory.environ(_env())
    if not host_memory.applies(_env()):
        pytest.skip('not glibc on Linux')
    assert env['GLIBC_TUNABLES'] == host_memory.TUNABLE
    assert host_memory.environ(env)['GLIBC_TUNABLES'] == host_memory.TUNABLE  # idempotent
    mine = _env(GLIBC_TUNABLES='glibc.malloc.tcache_count=0:glibc.malloc.hugetlb=0')
    assert host_memory.environ(mine)['GLIBC_TUNABLES'] == mine['GLIBC_TUNABLES']  # the user's setting wins
    other = _env(GLIBC_TUNABLES='glibc.malloc.tcache_count=0')
    assert host_memory.environ(other)['GLIBC_TUNABLES'] == 'glibc.malloc.tcache_count=0:' + host_memory.TUNABLE


def test_not_applied_off_cpu_or_when_opted_out():
    assert host_memory.runs_on_cpu(_env())
    assert not host_memory.runs_on_cpu(_env(JAX_PLATFORMS='cuda,cpu'))
    for env in (_env(JAX_PLATFORMS='cuda'), _env(MOSAICJAX_HUGE_PAGES='0')):
        assert not host_memory.applies(env)
        assert 'GLIBC_TUNABLES' not in host_memory.environ(env)


def test_reexec_keeps_pid_and_command_line():
    if not host_memory.applies(_env()):
        pytest.skip('not glibc on Linux')
    code = ("import os, sys; from mosaicjax import host_memory; print('started', flush=True); "
            "host_memory.reexec_with_huge_pages(); "
            "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, '-c', code, 'a', '--b=1'], env=_env(), stdout=subprocess.PIPE,
                            text=True)
    out, _ = proc.communicate(timeout=120)
    lines = out.strip().splitlines()
    assert lines[:2] == ['started', 'started'], out  # ran twice: before and after the exec
    assert lines[2] == f"{proc.pid} {host_memory.TUNABLE} ['a', '--b=1']", out  # once re-executed, never again
    assert len(lines) == 3, out
