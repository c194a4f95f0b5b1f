"""Training tasks: what the shared loop (mosaicjax/trainer/loop.py) trains.

The loop owns everything a model family does not change: mesh, gin, checkpoints, metrics, signals, resume. A task
owns the rest — data, model, train state, the jitted step, evaluation and FLOPs — behind the small interface of
`Task`. `train.task` picks one by name ('lm' | 'image').
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Phase:
    """A run that must be complete before the task's own starts (the image task's VAE pre-training).

    The loop runs it as an ordinary run in its own workdir under the current gin config plus `bindings`,
    skips it once a checkpoint at `num_steps` exists, and prefixes its progress lines with its name.
    """
    name: str            # shown in progress lines: [phase 1/2 vae] step 10/600 | ...
    workdir: str         # its run directory (checkpoints/, metrics.jsonl, config.gin)
    num_steps: int       # complete once a checkpoint of this step exists
    bindings: tuple      # gin bindings parsed after the run's own for this phase


class Task:
    """What the loop needs from a model family. Built after the mesh; `setup` runs all checks before compiling.

    Attributes set by `setup`:
      data_iter: checkpointable grain iterator of per-process batches (dicts of numpy arrays).
      shardings: the NamedShardings of every TrainState leaf.
      units_name: throughput field of the metrics ('tokens_per_sec' | 'images_per_sec').
    """

    name = "task"
    units_name = "items_per_sec"

    def setup(self, train_cfg, mesh, rules, workdir: str) -> None:
        raise NotImplementedError

    def prior_phases(self, workdir: str) -> list[Phase]:
        """Runs to complete, in order, before this one (called before `setup`, from the gin config alone)."""
        del workdir
        return []

    @property
    def phase_name(self) -> str:
        """This run's name in progress lines when it has prior phases."""
        return self.name

    def abstract_state(self):
        """ShapeDtypeStructs with shardings (what a checkpoint restore lays the saved arrays onto)."""
        raise NotImplementedError

    def init_state(self):
        """The freshly initialised (or imported) sharded train state."""
        raise NotImplementedError

    def train_step(self):
        """step(state, batch) -> (state, metrics dict of scalars); jitted by the loop."""
        raise NotImplementedError

    def abstract_batch(self, batch_sharding) -> dict:
        """ShapeDtypeStructs of the global batch compiled ahead of time (the first batch shape)."""
        raise NotImplementedError

    def to_global(self, batch: dict, sharding) -> dict:
        """Per-process numpy batch -> global jax arrays."""
        return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}

    def units_per_step(self) -> float:
        raise NotImplementedError

    def flops_per_step(self, batch: dict | None = None) -> float:
        raise NotImplementedError

    def record_fields(self) -> dict[str, Any]:
        """Fields after `step_time_sec` in every metrics record (batch size, lengths, skipped records ...)."""
        return {}

    def has_eval(self) -> bool:
        return False

    def evaluate(self, state) -> dict[str, float]:
        return {}

    def meta(self, state) -> dict:
        return {}

    def on_start(self, workdir: str, is_primary: bool) -> None:
        """Called once before the first step (e.g. to write model files the export needs)."""

    def finish(self, workdir: str, state, last: dict, is_primary: bool) -> None:
        """Called after the last step (reports, samples)."""


def make_task(name: str) -> Task:
    """The task registered under `name` ('lm' | 'image')."""
    # pylint: disable=import-outside-toplevel
    if name == "lm":
        from mosaicjax.trainer.tasks.lm import LMTask
        return LMTask()
    if name == "image":
        from mosaicjax.trainer.tasks.image import ImageTask
        return ImageTask()
    from mosaicjax import config as config_lib
    raise config_lib.ConfigError(f"train.task={name!r} is not a task; use 'lm' or 'image'")
