"""AdamW with linear warmup, cosine decay and global-norm clipping (gin name `optimizer`)."""
from __future__ import annotations

import dataclasses

import gin
import jax
import optax


@gin.configurable("optimizer")
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    # Peak learning rate, reached at the end of warmup.
    learning_rate: float = 3e-4
    # Steps of linear warmup from 0 to `learning_rate`.
    warmup_steps: int = 100
    # Steps over which the cosine decays after warmup; None: until train.num_steps.
    decay_steps: int | None = None
    # The cosine ends at learning_rate * min_learning_rate_ratio.
    min_learning_rate_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    # Decoupled weight decay, applied to matrices only (not to norm scales: decaying them fights the norm).
    weight_decay: float = 0.1
    # Clip the global gradient norm to this value; None or 0 disables clipping.
    grad_clip_norm: float | None = 1.0


def make_schedule(config: OptimizerConfig, num_steps: int) -> optax.Schedule:
    decay = config.decay_steps if config.decay_steps is not None else max(num_steps - config.warmup_steps, 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=config.warmup_steps + decay,
        end_value=config.learning_rate * config.min_learning_rate_ratio,
    )


def _decay_mask(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config: OptimizerConfig, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(config, num_steps)
    parts = []
    if config.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                             weight_decay=config.weight_decay, mask=_decay_mask))
    return optax.chain(*parts), schedule
