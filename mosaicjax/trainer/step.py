"""The jitted train and eval steps: next-token loss, MoE auxiliary losses, gradient accumulation, AdamW update."""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mosaicjax.trainer.state import TrainState

LN2 = math.log(2.0)


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy (nats) and logsumexp, in float32."""
    logits = logits.astype(jnp.float32)                                       # [batch, seq, vocab]
    lse = jax.nn.logsumexp(logits, axis=-1)                                   # [batch, seq]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [batch, seq]
    return lse - target_logit, lse


def _microbatches(batch: dict, n: int) -> dict:
    """[batch, ...] -> [n, batch/n, ...], interleaved so each microbatch stays spread over all data shards.

    Row r goes to microbatch r % n: a contiguous reshape would instead put whole microbatches on single shards.
    """
    def split(x):
        b = x.shape[0]
        x = x.reshape((b // n, n) + x.shape[1:])                             # [batch/n, n, ...]
        x = jnp.swapaxes(x, 0, 1)                                            # [n, batch/n, ...]
        return nn.with_logical_constraint(x, (None, "act_batch") + (None,) * (x.ndim - 2))
    return jax.tree.map(split, batch)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule, *, grad_accum_steps: int,
                    z_loss_weight: float, moe_loss_weight: float, router_z_loss_weight: float):
    """Builds train_step(state, batch) -> (state, metrics). Losses are token-weighted so that accumulation over
    microbatches gives the same cross-entropy gradient as one big batch."""

    def loss_fn(params, mb, rng, total_weight):
        logits, aux = model.apply({"params": params}, mb["inputs"], mb["positions"], mb["segment_ids"],
                                  deterministic=False, rngs={"jitter": rng})
        ce, lse = token_cross_entropy(logits, mb["targets"])
        w = mb["weights"]
        ce_sum = jnp.sum(ce * w)
        z_sum = jnp.sum(jnp.square(lse) * w)
        moe_lb = aux.get("moe_lb_loss", 0.0)
        router_z = aux.get("router_z_loss", 0.0)
        # The MoE losses are per-microbatch means; dividing by the microbatch count averages them.
        total = (ce_sum + z_loss_weight * z_sum) / total_weight + (
            moe_loss_weight * moe_lb + router_z_loss_weight * router_z) / grad_accum_steps
        stats = {"ce_sum": ce_sum, "z_sum": z_sum, "moe_lb_loss": moe_lb / grad_accum_steps,
                 "router_z_loss": router_z / grad_accum_steps,
                 "moe_dropped_fraction": aux.get("dropped_fraction", 0.0) / grad_accum_steps}
        return total, stats

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict[str, Any]]:
        rng = jax.random.fold_in(state.rng, state.step)
        total_weight = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
        if grad_accum_steps == 1:
            (_, stats), grads = grad_fn(state.params, batch, rng, total_weight)
        else:
            mbs = _microbatches(batch, grad_accum_steps)

            def body(carry, xs):
                grads_acc, stats_acc = carry
                mb, i = xs
                (_, stats), grads = grad_fn(state.params, mb, jax.random.fold_in(rng, i), total_weight)
                return (jax.tree.map(jnp.add, grads_acc, grads), jax.tree.map(jnp.add, stats_acc, stats)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            zero_stats = {k: jnp.zeros((), jnp.float32) for k in
                          ("ce_sum", "z_sum", "moe_lb_loss", "router_z_loss", "moe_dropped_fraction")}
            (grads, stats), _ = jax.lax.scan(body, (zeros, zero_stats),
                                             (mbs, jnp.arange(grad_accum_steps)))
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": stats["ce_sum"] / total_weight,
            "z_loss": stats["z_sum"] / total_weight,
            "moe_lb_loss": stats["moe_lb_loss"],
            "router_z_loss": stats["router_z_loss"],
            "moe_dropped_fraction": stats["moe_dropped_fraction"],
            "grad_norm": grad_norm,
            "learning_rate": schedule(state.step),
            "num_tokens": total_weight,
        }
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_eval_step(model: nn.Module):
    """eval_step(params, batch, token_bytes) -> sums of (nats, target tokens, target bytes) for bits per byte."""

    def eval_step(params, batch, token_bytes):
        logits, _ = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
                                deterministic=True)
        ce, _ = token_cross_entropy(logits, batch["targets"])
        w = batch["weights"]
        nbytes = jnp.take(token_bytes, batch["targets"]).astype(jnp.float32)   # [batch, seq]
        return {"nats": jnp.sum(ce * w), "tokens": jnp.sum(w), "bytes": jnp.sum(nbytes * w)}

    return eval_step
