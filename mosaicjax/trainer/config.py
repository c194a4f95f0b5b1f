"""TrainConfig: the run-level knobs every training config honours (gin name `train`)."""
from __future__ import annotations

import dataclasses

import gin


@gin.configurable("train")
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # What to train: 'lm' (DBRX on packed text) or 'image' (latent diffusion; see mosaicjax/trainer/tasks/).
    task: str = "lm"
    # Optimizer steps to run in total (a resumed run stops at the same step an uninterrupted one would).
    num_steps: int = 1000
    # Write metrics.jsonl / TensorBoard and print a progress line every this many steps.
    log_every: int = 10
    # Save an Orbax checkpoint every this many steps (the last step is always saved). 0 disables periodic saves.
    checkpoint_every: int = 100
    # Seeds parameter init, data shuffling and MoE jitter; the same seed and config give the same run bit for bit.
    seed: int = 0
    # Global batch in sequences, summed over all devices and hosts (and over gradient-accumulation microbatches).
    batch_size: int = 8
    # Tokens per sequence; documents are packed into rows of this length.
    seq_len: int = 512
    # Split each batch into this many microbatches whose gradients are summed before one optimizer update.
    grad_accum_steps: int = 1
    # Evaluate on the held-out set every this many steps (0: only once, at the end of the run).
    eval_every: int = 0
    # Held-out batches per evaluation (each of `eval_batch_size` sequences; None: `batch_size`).
    eval_batches: int = 8
    eval_batch_size: int | None = None
    # Weight of the output z-loss (mean of logsumexp(logits)^2), which keeps logits from drifting; 0 disables it.
    z_loss_weight: float = 0.0
