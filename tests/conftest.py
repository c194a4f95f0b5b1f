"""Test-wide setup: fake an 8-device host platform so sharded programs run on CPU.

XLA reads the flag once, when the backend starts, so it must be set before anything imports jax.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_gin():
    """Gin bindings are process-global: a test that parses a config must not leak it into the next test."""
    yield
    import gin
    gin.clear_config()
