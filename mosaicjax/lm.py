"""LanguageModel: a loaded DBRX with its tokenizer, for scoring (`logits`) and generation (`generate`).

`mosaicjax.load_lm(path)` builds one from a Hugging Face folder, a mosaicjax checkpoint or a training workdir.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mosaicjax.models import dbrx


class LanguageModel:
    """Parameters live on `mesh` (one device when None); calls are jitted once per input shape."""

    def __init__(self, config: dbrx.DbrxConfig, params: Any, tokenizer: Any, *, mesh=None, rules=None,
                 chat_template: str | None = None):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.rules = rules
        self.chat_template = chat_template
        self.model = dbrx.Dbrx(config)
        self._logits_fn = jax.jit(self._forward)
        self._generator = None

    def _forward(self, params, tokens):
        logits, _ = self.model.apply({"params": params}, tokens, deterministic=True)
        return logits

    def logits(self, tokens) -> np.ndarray:
        """int array [batch, seq] -> float32 numpy [batch, seq, vocab] (no padding, no masking)."""
        tokens = jnp.asarray(np.asarray(tokens, dtype=np.int32))
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens exceeds max_seq_len={self.config.max_seq_len}")
        return np.asarray(self._logits_fn(self.params, tokens), dtype=np.float32)

    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], max_tokens: int = 64,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None, seed: int | None = None,
                 stop: Sequence[str] | str | None = None, return_tokens: bool = False):
        """Generates a continuation per prompt (see mosaicjax.generation)."""
        raise NotImplementedError("generation is built in mosaicjax.generation")
