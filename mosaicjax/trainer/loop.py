"""The training loop: build everything from gin, resume if possible, step, log, evaluate, checkpoint, stop cleanly.

One loop, several model families: `train.task` ('lm' | 'image') picks a Task (mosaicjax/trainer/tasks/) that
owns data, model, state and the step; this loop owns the mesh, resume, signals, metrics and checkpoints.

Order matters for users: every configuration check (gin bindings, mesh, batch divisibility, vocabulary) runs before
anything is compiled or allocated, so a bad launch fails in seconds with a message that names the fix.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Any

import jax
import numpy as np

from mosaicjax import config as config_lib
from mosaicjax.parallel import mesh as mesh_lib
from mosaicjax.parallel import rules as rules_lib
from mosaicjax.trainer import checkpointing, metrics as metrics_lib, mfu as mfu_lib
from mosaicjax.trainer import tasks as tasks_lib
from mosaicjax.trainer.config import TrainConfig
from mosaicjax.trainer.tasks.lm import BATCH_KEYS, validate  # noqa: F401  (public names kept from before tasks)

log = logging.getLogger("mosaicjax")


class _StopFlag:
    """Set by SIGTERM/SIGINT (preemption): the loop saves a checkpoint at the next step boundary and exits 0."""

    def __init__(self):
        self.requested = False
        self.signal_name = None

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):  # pylint: disable=unused-argument
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def any_process(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.array([self.requested]))))


def _signature(batch: dict) -> tuple:
    """Shapes and dtypes of a batch: one compiled step per signature (image buckets differ in shape)."""
    return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))


def train(workdir: str) -> dict[str, Any]:
    """Runs (or resumes) the training configured in gin; returns the last logged metrics.

    A task may declare prior phases (the image task's VAE pre-training): each runs first, to completion, as an
    ordinary run in its own workdir under extra gin bindings; a complete one is skipped, so a re-run resumes in
    whichever phase it was killed. A phase stopped by a signal ends the command there (exit 0, resumable).
    """
    workdir = os.path.abspath(workdir)
    task = tasks_lib.make_task(TrainConfig().task)
    phases = task.prior_phases(workdir)
    if not phases:
        return _train_run(workdir, task)
    t0 = time.perf_counter()
    total = len(phases) + 1
    for i, phase in enumerate(phases, 1):
        label = f"phase {i}/{total} {phase.name}"
        if _latest_step(phase.workdir) >= phase.num_steps:
            _say(f"[{label}] complete ({phase.workdir}, step {phase.num_steps}); skipping to the next phase")
            continue
        t_phase = time.perf_counter()
        with config_lib.overridden(phase.bindings):
            _train_run(phase.workdir, tasks_lib.make_task(TrainConfig().task), label)
        if _latest_step(phase.workdir) < phase.num_steps:  # stopped by SIGTERM/SIGINT: its checkpoint resumes it
            return {}
        _say(f"[{label}] done in {metrics_lib.format_duration(time.perf_counter() - t_phase)}")
    t_phase = time.perf_counter()
    label = f"phase {total}/{total} {task.phase_name}"
    last = _train_run(workdir, task, label)
    now = time.perf_counter()
    if _latest_step(workdir) >= TrainConfig().num_steps:  # not stopped by a signal
            _say(f"[{label}] done in {metrics_lib.format_duration(now - t_phase)}; all {total} phases done, this "
             f"command ran {metrics_lib.format_duration(now - t0)}")
    return last


def _say(line: str) -> None:
    if jax.process_index() == 0:
        print(line, file=sys.stderr, flush=True)


def _latest_step(workdir: str) -> int:
    """The newest complete checkpoint's step of a run (-1: none)."""
    checkpointer = checkpointing.Checkpointer(workdir, checkpointing.CheckpointConfig())
    step = checkpointer.latest_step()
    checkpointer.close()
    return -1 if step is None else step


def _train_run(workdir: str, task: tasks_lib.Task, label: str | None = None) -> dict[str, Any]:
    """One run (one phase): build from gin, restore or initialise, step, log, checkpoint, finish."""
    os.makedirs(workdir, exist_ok=True)
    prefix = f"[{label}] " if label else ""
    train_cfg = TrainConfig()
    ckpt_cfg = checkpointing.CheckpointConfig()
    metrics_cfg = metrics_lib.MetricsConfig()
    rules = rules_lib.get_rules()
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig())
    task.setup(train_cfg, mesh, rules, workdir)
    is_primary = jax.process_index() == 0
    shardings = task.shardings
    batch_sharding = rules_lib.batch_sharding(mesh, rules)
    data_iter = task.data_iter

    checkpointer = checkpointing.Checkpointer(workdir, ckpt_cfg)
    start_step = checkpointer.latest_step()
    if start_step is not None:
        state, meta = checkpointer.restore(start_step, task.abstract_state(), data_iter)
        print(f"{prefix}resumed from {checkpointer.directory}/{start_step} (saved on mesh {meta.get('mesh_shape')})",
              file=sys.stderr, flush=True)
    else:
        start_step = 0
        state = task.init_state()

    if is_primary:
        config_lib.write_config(workdir, config_lib.operative_config())
    task.on_start(workdir, is_primary)
    writer = metrics_lib.MetricsWriter(workdir, metrics_cfg, is_primary=is_primary,
                                       run_config_text=config_lib.operative_config())
    writer.truncate_after(start_step)

    step_fn = task.train_step()
    compiled: dict[tuple, Any] = {}
    with rules_lib.activate(mesh, rules):
        jitted = jax.jit(step_fn, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                         donate_argnums=(0,))
        t0 = time.perf_counter()
        abstract_batch = task.abstract_batch(batch_sharding)
        compiled[_signature(abstract_batch)] = jitted.lower(state, abstract_batch).compile()
        compile_sec = time.perf_counter() - t0

    num_devices = jax.device_count()
    peak = mfu_lib.peak_flops_per_device()
    progress = metrics_lib.ProgressLogger(train_cfg.num_steps, start_step)
    stop = _StopFlag()
    stop.install()
    print(f"{prefix}training {train_cfg.num_steps} steps from step {start_step} on {num_devices} device(s), mesh "
          f"{dict(mesh.shape)}; compiled in {compile_sec:.1f}s", file=sys.stderr, flush=True)

    if start_step >= train_cfg.num_steps and is_primary:
        print(f"{prefix}nothing to do: the run in {workdir} is complete at step {start_step} (train.num_steps="
              f"{train_cfg.num_steps}); its metrics are in metrics.jsonl", file=sys.stderr, flush=True)
    last: dict[str, Any] = {}
    step = start_step
    interval_start, interval_steps = time.perf_counter(), 0
    pending = None
    with rules_lib.activate(mesh, rules):
        while step < train_cfg.num_steps:
            batch = task.to_global(next(data_iter), batch_sharding)
            sig = _signature(batch)
            if sig not in compiled:  # a new bucket shape (image task): compile once, reuse afterwards
                compiled[sig] = jitted.lower(state, batch).compile()
            state, pending = compiled[sig](state, batch)
            step += 1
            interval_steps += 1
            final = step == train_cfg.num_steps
            do_eval = task.has_eval() and (final or (train_cfg.eval_every and step % train_cfg.eval_every == 0))
            stopping = stop.any_process()
            if step % train_cfg.log_every == 0 or final or do_eval or stopping:
                values = {k: float(v) for k, v in jax.device_get(pending).items()}
                elapsed = time.perf_counter() - interval_start
                step_time = elapsed / max(interval_steps, 1)
                record = {
                    "step": step, **values,
                    task.units_name: task.units_per_step() / step_time,
                    "mfu": mfu_lib.mfu(task.flops_per_step(batch), step_time, num_devices, peak),
                    "step_time_sec": step_time, **task.record_fields(),
                }
                if do_eval:
                    record.update(task.evaluate(state))
                writer.write(step, record)
                if is_primary:
                    print(prefix + progress.line(step, record), file=sys.stderr, flush=True)
                last = record
                interval_start, interval_steps = time.perf_counter(), 0
            if stopping or final or (train_cfg.checkpoint_every and step % train_cfg.checkpoint_every == 0):
                checkpointer.save(step, state, data_iter, task.meta(state))
            if stopping:
                print(f"{stop.signal_name}: saved checkpoint at step {step}; exiting", file=sys.stderr, flush=True)
                break
    checkpointer.close()
    writer.close()
    task.finish(workdir, state, last, is_primary)
    return last
