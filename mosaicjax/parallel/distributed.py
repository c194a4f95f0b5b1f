"""Multi-host start-up: one jax.distributed.initialize before anything touches devices.

TPU pods and SLURM/Kubernetes GPU clusters are detected by JAX itself; otherwise a coordinator address, process count
and process id (flags or MOSAICJAX_COORDINATOR / MOSAICJAX_NUM_PROCESSES / MOSAICJAX_PROCESS_ID) name the job. On CPU
(tests, laptops) the cross-process collectives run over gloo.
"""
from __future__ import annotations

import os

import jax


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False) -> bool:
    """Initialises jax.distributed when asked to or when the environment says so; returns whether it did."""
    coordinator_address = coordinator_address or os.environ.get("MOSAICJAX_COORDINATOR")
    if num_processes is None and os.environ.get("MOSAICJAX_NUM_PROCESSES"):
        num_processes = int(os.environ["MOSAICJAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("MOSAICJAX_PROCESS_ID"):
        process_id = int(os.environ["MOSAICJAX_PROCESS_ID"])
    if coordinator_address is None and not auto:
        return False
    if (os.environ.get("JAX_PLATFORMS", "") or "").startswith("cpu") or coordinator_address:
        try:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        except Exception:  # older/newer JAX without the option: CPU multi-process then uses its default
            pass
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return True
