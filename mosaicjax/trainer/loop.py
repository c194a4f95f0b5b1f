"""The training loop: build everything from gin, resume if possible, step, log, evaluate, checkpoint, stop cleanly.

Order matters for users: every configuration check (gin bindings, mesh, batch divisibility, vocabulary) runs before
anything is compiled or allocated, so a bad launch fails in seconds with a message that names the fix.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mosaicjax import config as config_lib
from mosaicjax.data import pipeline as data_pipeline
from mosaicjax.data import tokenizers as tokenizers_lib
from mosaicjax.models import dbrx
from mosaicjax.parallel import mesh as mesh_lib
from mosaicjax.parallel import rules as rules_lib
from mosaicjax.trainer import checkpointing, metrics as metrics_lib, mfu as mfu_lib
from mosaicjax.trainer import optimizer as optimizer_lib
from mosaicjax.trainer import state as state_lib
from mosaicjax.trainer import step as step_lib
from mosaicjax.trainer.config import TrainConfig

log = logging.getLogger("mosaicjax")

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


def validate(train: TrainConfig, model: dbrx.DbrxConfig, mesh) -> None:
    """Checks that need the mesh but no compilation; every message names the binding and the fix."""
    shards = mesh_lib.batch_shards(mesh)
    per_update = shards * train.grad_accum_steps
    if train.batch_size % per_update:
        raise config_lib.ConfigError(
            f"train.batch_size={train.batch_size} must be divisible by the data-parallel size "
            f"({shards} = data x fsdp x expert of mesh {dict(mesh.shape)}) times train.grad_accum_steps="
            f"{train.grad_accum_steps}, i.e. by {per_update}; use e.g. train.batch_size="
            f"{max(per_update, train.batch_size // per_update * per_update)}")
    if train.batch_size % jax.process_count():
        raise config_lib.ConfigError(
            f"train.batch_size={train.batch_size} must be divisible by the number of processes "
            f"({jax.process_count()})")
    eval_bs = train.eval_batch_size or train.batch_size
    if eval_bs % shards:
        raise config_lib.ConfigError(
            f"train.eval_batch_size={eval_bs} must be divisible by the data-parallel size {shards}")
    if train.seq_len > model.max_seq_len:
        raise config_lib.ConfigError(
            f"train.seq_len={train.seq_len} exceeds DbrxConfig.max_seq_len={model.max_seq_len}")
    tensor = mesh.shape["tensor"]
    for field in ("n_heads", "kv_n_heads", "ffn_hidden_size"):
        if getattr(model, field) % tensor:
            raise config_lib.ConfigError(
                f"DbrxConfig.{field}={getattr(model, field)} is not divisible by mesh tensor size {tensor}; "
                f"change mesh.shape['tensor'] or the model size")
    if model.moe_num_experts % mesh.shape["expert"]:
        raise config_lib.ConfigError(
            f"DbrxConfig.moe_num_experts={model.moe_num_experts} is not divisible by mesh expert size "
            f"{mesh.shape['expert']}; change mesh.shape['expert']")
    for name in ("num_steps", "log_every", "batch_size", "seq_len", "grad_accum_steps"):
        if getattr(train, name) <= 0:
            raise config_lib.ConfigError(f"train.{name}={getattr(train, name)} must be positive")


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


def _to_global(batch: dict, sharding) -> dict:
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k])) for k in BATCH_KEYS}


def _eval(eval_fn, params, eval_batches, token_bytes, sharding) -> dict[str, float]:
    totals = {"nats": 0.0, "tokens": 0.0, "bytes": 0.0}
    for batch in eval_batches:
        out = jax.device_get(eval_fn(params, _to_global(batch, sharding), token_bytes))
        for k in totals:
            totals[k] += float(out[k])
    tokens, nbytes = max(totals["tokens"], 1.0), max(totals["bytes"], 1.0)
    loss = totals["nats"] / tokens
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)),
            "eval_bits_per_byte": totals["nats"] / math.log(2.0) / nbytes, "eval_tokens": totals["tokens"]}


def train(workdir: str) -> dict[str, Any]:
    """Runs (or resumes) the training configured in gin; returns the last logged metrics."""
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    train_cfg = TrainConfig()
    model_cfg = dbrx.DbrxConfig()
    opt_cfg = optimizer_lib.OptimizerConfig()
    data_cfg = data_pipeline.DataConfig()
    tok_cfg = tokenizers_lib.TokenizerConfig()
    ckpt_cfg = checkpointing.CheckpointConfig()
    metrics_cfg = metrics_lib.MetricsConfig()
    rules = rules_lib.get_rules()
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig())
    validate(train_cfg, model_cfg, mesh)
    is_primary = jax.process_index() == 0

    tokenizer = data_pipeline.load_tokenizer_for(data_cfg, tok_cfg, workdir)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise config_lib.ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but DbrxConfig.vocab_size={model_cfg.vocab_size}; "
            f"set DbrxConfig.vocab_size >= {tokenizer.vocab_size}")

    model = dbrx.Dbrx(model_cfg)
    tx, schedule = optimizer_lib.make_optimizer(opt_cfg, train_cfg.num_steps)
    example = (jnp.zeros((1, min(8, train_cfg.seq_len)), jnp.int32),)
    shardings = state_lib.state_shardings(model, tx, example, mesh, rules)
    batch_sharding = rules_lib.batch_sharding(mesh, rules)

    local_batch = train_cfg.batch_size // jax.process_count()
    data_iter = data_pipeline.make_train_iterator(
        data_cfg, tokenizer, batch_size=local_batch, seq_len=train_cfg.seq_len, seed=train_cfg.seed,
        process_index=jax.process_index(), process_count=jax.process_count())
    eval_bs = (train_cfg.eval_batch_size or train_cfg.batch_size) // jax.process_count()
    # Empty when the config names no held-out data: evaluation is then skipped, not reported as zeros.
    eval_batches = data_pipeline.make_eval_batches(
        data_cfg, tokenizer, batch_size=eval_bs, seq_len=train_cfg.seq_len, max_batches=train_cfg.eval_batches,
        process_index=jax.process_index(), process_count=jax.process_count())

    checkpointer = checkpointing.Checkpointer(workdir, ckpt_cfg)
    start_step = checkpointer.latest_step()
    if start_step is not None:
        abstract = state_lib.abstract_state(model, tx, example, train_cfg.seed, shardings)
        state, meta = checkpointer.restore(start_step, abstract, data_iter)
        print(f"resumed from {checkpointer.directory}/{start_step} (saved on mesh {meta.get('mesh_shape')})",
              file=sys.stderr, flush=True)
    else:
        start_step = 0
        state, _ = state_lib.create_sharded_state(model, tx, example, train_cfg.seed, mesh, rules)

    if is_primary:
        config_lib.write_config(workdir, config_lib.operative_config())
    writer = metrics_lib.MetricsWriter(workdir, metrics_cfg, is_primary=is_primary,
                                       run_config_text=config_lib.operative_config())
    writer.truncate_after(start_step)

    step_fn = step_lib.make_train_step(
        model, tx, schedule, grad_accum_steps=train_cfg.grad_accum_steps, z_loss_weight=train_cfg.z_loss_weight,
        moe_loss_weight=model_cfg.moe_loss_weight, router_z_loss_weight=model_cfg.router_z_loss_weight)
    eval_fn = step_lib.make_eval_step(model)
    token_bytes = jnp.asarray(tokenizer.token_bytes(), jnp.int32)
    if token_bytes.shape[0] < model_cfg.vocab_size:  # ids past the tokenizer's vocab never occur as targets
        token_bytes = jnp.pad(token_bytes, (0, model_cfg.vocab_size - token_bytes.shape[0]))

    with rules_lib.activate(mesh, rules):
        jitted = jax.jit(step_fn, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                         donate_argnums=(0,))
        eval_jitted = jax.jit(eval_fn, in_shardings=(shardings.params, batch_sharding, None))
        t0 = time.perf_counter()
        abstract_batch = {k: jax.ShapeDtypeStruct((train_cfg.batch_size, train_cfg.seq_len),
                                                  jnp.float32 if k == "weights" else jnp.int32,
                                                  sharding=batch_sharding) for k in BATCH_KEYS}
        compiled = jitted.lower(state, abstract_batch).compile()
        compile_sec = time.perf_counter() - t0

    num_devices = jax.device_count()
    tokens_per_step = train_cfg.batch_size * train_cfg.seq_len
    flops_per_step = dbrx.flops_per_token(model_cfg, train_cfg.seq_len) * tokens_per_step
    peak = mfu_lib.peak_flops_per_device()
    progress = metrics_lib.ProgressLogger(train_cfg.num_steps, start_step)
    stop = _StopFlag()
    stop.install()
    print(f"training {train_cfg.num_steps} steps from step {start_step} on {num_devices} device(s), mesh "
          f"{dict(mesh.shape)}; compiled in {compile_sec:.1f}s", file=sys.stderr, flush=True)

    def meta():
        return {"step": int(jax.device_get(state.step)), "mesh_shape": dict(mesh.shape),
                "tokenizer_vocab_size": tokenizer.vocab_size}

    last: dict[str, Any] = {}
    step = start_step
    interval_start, interval_steps = time.perf_counter(), 0
    pending = None
    with rules_lib.activate(mesh, rules):
        while step < train_cfg.num_steps:
            batch = _to_global(next(data_iter), batch_sharding)
            state, pending = compiled(state, batch)
            step += 1
            interval_steps += 1
            final = step == train_cfg.num_steps
            do_eval = bool(eval_batches) and (final or (train_cfg.eval_every and step % train_cfg.eval_every == 0))
            stopping = stop.any_process()
            if step % train_cfg.log_every == 0 or final or do_eval or stopping:
                values = {k: float(v) for k, v in jax.device_get(pending).items()}
                elapsed = time.perf_counter() - interval_start
                step_time = elapsed / max(interval_steps, 1)
                record = {
                    "step": step, **values,
                    "tokens_per_sec": tokens_per_step / step_time,
                    "mfu": mfu_lib.mfu(flops_per_step, step_time, num_devices, peak),
                    "step_time_sec": step_time, "batch_size": train_cfg.batch_size, "seq_len": train_cfg.seq_len,
                    "skipped_records": data_pipeline.skipped_records(),
                }
                if do_eval:
                    record.update(_eval(eval_jitted, state.params, eval_batches, token_bytes, batch_sharding))
                writer.write(step, record)
                if is_primary:
                    print(progress.line(step, record), file=sys.stderr, flush=True)
                last = record
                interval_start, interval_steps = time.perf_counter(), 0
            if stopping or final or (train_cfg.checkpoint_every and step % train_cfg.checkpoint_every == 0):
                checkpointer.save(step, state, data_iter, meta())
            if stopping:
                print(f"{stop.signal_name}: saved checkpoint at step {step}; exiting", file=sys.stderr, flush=True)
                break
    checkpointer.close()
    writer.close()
    if is_primary and "eval_bits_per_byte" in last:
        print(f"held-out bits per byte: {last['eval_bits_per_byte']:.4f} (eval loss {last['eval_loss']:.4f} "
              f"nats/token, step {last['step']})", flush=True)
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump({k: last[k] for k in last if k.startswith("eval_") or k == "step"}, f)
    return last
