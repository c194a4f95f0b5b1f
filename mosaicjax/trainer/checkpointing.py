"""Orbax checkpoints of the whole run: train state, data-iterator position and run metadata, saved atomically.

Orbax writes each step into a temporary directory and renames it only once every file is on disk (and, with several
hosts, every host has finished), so a kill at any moment leaves either the old set of checkpoints or the old set plus
one complete new one — never a half-written step that `latest_step` would pick. Restores lay the saved arrays onto
whatever shardings the caller asks for, so a run may resume on a different mesh than the one that saved it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import gin
import grain
import jax
import orbax.checkpoint as ocp


@gin.configurable("checkpoint")
@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    # How many of the newest checkpoints to keep; older ones are deleted after a newer one is complete.
    max_to_keep: int = 3
    # Write checkpoints in a background thread so training continues while files are written.
    async_save: bool = True
    # Sub-directory of the workdir holding the step directories.
    subdir: str = "checkpoints"


class Checkpointer:
    """Saves and restores {state, data iterator, metadata} under <workdir>/<subdir>/<step>/."""

    def __init__(self, workdir: str, config: CheckpointConfig | None = None):
        self.config = config or CheckpointConfig()
        self.directory = os.path.abspath(os.path.join(workdir, self.config.subdir))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.config.max_to_keep,
            enable_async_checkpointing=self.config.async_save,
            create=True,
            cleanup_tmp_directories=True,  # debris of a save that was killed half-way
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: Any | None = None, meta: dict | None = None,
             force: bool = True) -> bool:
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta or {})}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None) -> tuple[Any, dict]:
        """Restores onto the shardings carried by `abstract_state` (ShapeDtypeStructs); moves the iterator."""
        items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], dict(restored["meta"] or {})

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only the parameters (for evaluation, export and serving), onto the given shardings."""
        target = {"params": abstract_params}
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=target, restore_args=jax.tree.map(
                    lambda s: ocp.ArrayRestoreArgs(sharding=getattr(s, "sharding", None)), target),
                partial_restore=True)))
        return restored["state"]["params"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
