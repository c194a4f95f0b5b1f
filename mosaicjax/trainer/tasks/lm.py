"""The language-model task: DBRX next-token training on packed text (what loop.py trained before tasks existed).

Everything here is LM-specific: the tokenizer, the packed-text iterators, the DBRX model, the cross-entropy step,
held-out bits per byte and the per-token FLOPs. Metrics fields and the checkpoint layout are those of the
original loop, unchanged.
"""
from __future__ import annotations

import json
import math
import os
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
from mosaicjax.trainer import optimizer as optimizer_lib
from mosaicjax.trainer import state as state_lib
from mosaicjax.trainer import step as step_lib
from mosaicjax.trainer.config import TrainConfig
from mosaicjax.trainer.tasks import Task

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")


def validate(train: TrainConfig, model: dbrx.DbrxConfig, mesh) -> None:
    """Checks that need the mesh but no compilation; every message names the binding and the fix."""
    shards = mesh_lib.batch_shards(mesh)
    validate_batch(train, mesh)
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


def validate_batch(train: TrainConfig, mesh) -> None:
    """The batch-divisibility checks every task shares."""
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


class LMTask(Task):
    """DBRX on packed text."""

    name = "lm"
    units_name = "tokens_per_sec"

    def setup(self, train_cfg, mesh, rules, workdir):
        self.train_cfg = train_cfg
        self.mesh, self.rules = mesh, rules
        self.model_cfg = model_cfg = dbrx.DbrxConfig()
        opt_cfg = optimizer_lib.OptimizerConfig()
        data_cfg = data_pipeline.DataConfig()
        tok_cfg = tokenizers_lib.TokenizerConfig()
        validate(train_cfg, model_cfg, mesh)
        self.tokenizer = tokenizer = data_pipeline.load_tokenizer_for(data_cfg, tok_cfg, workdir)
        if tokenizer.vocab_size > model_cfg.vocab_size:
            raise config_lib.ConfigError(
                f"the tokenizer has {tokenizer.vocab_size} tokens but DbrxConfig.vocab_size="
                f"{model_cfg.vocab_size}; set DbrxConfig.vocab_size >= {tokenizer.vocab_size}")
        self.model = model = dbrx.Dbrx(model_cfg)
        self.tx, self.schedule = optimizer_lib.make_optimizer(opt_cfg, train_cfg.num_steps)
        self.example = (jnp.zeros((1, min(8, train_cfg.seq_len)), jnp.int32),)
        self.shardings = state_lib.state_shardings(model, self.tx, self.example, mesh, rules)
        self.batch_sharding = rules_lib.batch_sharding(mesh, rules)
        local_batch = train_cfg.batch_size // jax.process_count()
        self.data_iter = data_pipeline.make_train_iterator(
            data_cfg, tokenizer, batch_size=local_batch, seq_len=train_cfg.seq_len, seed=train_cfg.seed,
            process_index=jax.process_index(), process_count=jax.process_count())
        eval_bs = (train_cfg.eval_batch_size or train_cfg.batch_size) // jax.process_count()
        # Empty when the config names no held-out data: evaluation is then skipped, not reported as zeros.
        self.eval_batches = data_pipeline.make_eval_batches(
            data_cfg, tokenizer, batch_size=eval_bs, seq_len=train_cfg.seq_len,
            max_batches=train_cfg.eval_batches, process_index=jax.process_index(),
            process_count=jax.process_count())

    def abstract_state(self):
        return state_lib.abstract_state(self.model, self.tx, self.example, self.train_cfg.seed, self.shardings)

    def init_state(self):
        state, _ = state_lib.create_sharded_state(self.model, self.tx, self.example, self.train_cfg.seed,
                                                  self.mesh, self.rules)
        return state

    def train_step(self):
        cfg = self.model_cfg
        step_fn = step_lib.make_train_step(
            self.model, self.tx, self.schedule, grad_accum_steps=self.train_cfg.grad_accum_steps,
            z_loss_weight=self.train_cfg.z_loss_weight, moe_loss_weight=cfg.moe_loss_weight,
            router_z_loss_weight=cfg.router_z_loss_weight)
        eval_fn = step_lib.make_eval_step(self.model)
        token_bytes = jnp.asarray(self.tokenizer.token_bytes(), jnp.int32)
        if token_bytes.shape[0] < cfg.vocab_size:  # ids past the tokenizer's vocab never occur as targets
            token_bytes = jnp.pad(token_bytes, (0, cfg.vocab_size - token_bytes.shape[0]))
        self.token_bytes = token_bytes
        self.eval_jitted = jax.jit(eval_fn, in_shardings=(self.shardings.params, self.batch_sharding, None))
        return step_fn

    def abstract_batch(self, batch_sharding):
        t = self.train_cfg
        return {k: jax.ShapeDtypeStruct((t.batch_size, t.seq_len), jnp.float32 if k == "weights" else jnp.int32,
                                        sharding=batch_sharding) for k in BATCH_KEYS}

    def to_global(self, batch, sharding):
        return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k])) for k in BATCH_KEYS}

    def units_per_step(self):
        return self.train_cfg.batch_size * self.train_cfg.seq_len

    def flops_per_step(self, batch=None):
        return dbrx.flops_per_token(self.model_cfg, self.train_cfg.seq_len) * self.units_per_step()

    def record_fields(self):
        return {"batch_size": self.train_cfg.batch_size, "seq_len": self.train_cfg.seq_len,
                "skipped_records": data_pipeline.skipped_records()}

    def has_eval(self):
        return bool(self.eval_batches)

    def evaluate(self, state) -> dict[str, float]:
        totals = {"nats": 0.0, "tokens": 0.0, "bytes": 0.0}
        for batch in self.eval_batches:
            out = jax.device_get(self.eval_jitted(state.params, self.to_global(batch, self.batch_sharding),
                                                  self.token_bytes))
            for k in totals:
                totals[k] += float(out[k])
        tokens, nbytes = max(totals["tokens"], 1.0), max(totals["bytes"], 1.0)
        loss = totals["nats"] / tokens
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)),
                "eval_bits_per_byte": totals["nats"] / math.log(2.0) / nbytes, "eval_tokens": totals["tokens"]}

    def meta(self, state):
        return {"step": int(jax.device_get(state.step)), "mesh_shape": dict(self.mesh.shape),
                "tokenizer_vocab_size": self.tokenizer.vocab_size}

    def finish(self, workdir, state, last: dict[str, Any], is_primary):
        if is_primary and "eval_bits_per_byte" in last:
            print(f"held-out bits per byte: {last['eval_bits_per_byte']:.4f} (eval loss {last['eval_loss']:.4f} "
                  f"nats/token, step {last['step']})", flush=True)
            with open(os.path.join(workdir, "eval.json"), "w") as f:
                json.dump({k: last[k] for k in last if k.startswith("eval_") or k == "step"}, f)
