"""LanguageModel: a loaded DBRX with its tokenizer, for scoring (`logits`) and generation (`generate`).

`mosaicjax.load_lm(path)` builds one from a Hugging Face folder, a mosaicjax checkpoint or a training workdir.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mosaicjax import chat
from mosaicjax import generation
from mosaicjax.models import dbrx


class LanguageModel:
    """Parameters live on `mesh` (one device when None); calls are jitted once per input shape."""

    def __init__(self, config: dbrx.DbrxConfig, params: Any, tokenizer: Any, *, mesh=None, rules=None,
                 chat_template: str | None = None, generator_options: dict | None = None):
        self.config = config
        # Host (numpy) leaves would be copied to the device on every call: place them once.
        self.params = jax.tree.map(lambda a: a if isinstance(a, jax.Array) else jax.device_put(a), params)
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.rules = rules
        self.chat_template = chat_template
        self.model = dbrx.Dbrx(config)
        self._logits_fn = jax.jit(self._forward)
        self._generator = None
        self._default_stop_ids = None
        # Extra mosaicjax.generation.Generator arguments (max_batch, min_length, stop_check_steps).
        self.generator_options = dict(generator_options or {})

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

    @property
    def generator(self) -> generation.Generator:
        """The KV-cache generation engine (built on first use; keeps its compiled programs across calls).

        Its `generate(token_lists, SamplingParams | [SamplingParams])` returns full Completion records
        (tokens, text, finish_reason, stop_reason, logprobs): what the server uses.
        """
        if self._generator is None:
            vocab = getattr(self.tokenizer, "vocab_size", None)
            limit = vocab if vocab is not None and 0 < vocab < self.config.vocab_size else None
            self._generator = generation.Generator(self.config, self.params, self.tokenizer, vocab_limit=limit,
                                                   mesh=self.mesh, rules=self.rules, **self.generator_options)
        return self._generator

    @property
    def default_stop_token_ids(self) -> list[int]:
        """The tokenizer's EOS and, when they are single tokens, <|im_end|> and <|endoftext|>."""
        if self._default_stop_ids is None:
            self._default_stop_ids = chat.stop_token_ids(self.tokenizer) if self.tokenizer is not None else []
        return list(self._default_stop_ids)

    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], max_tokens: int = 64,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None, seed: int | None = None,
                 stop: Sequence[str | int] | str | None = None, return_tokens: bool = False):
        """Continues each prompt with the KV-cache engine (mosaicjax.generation).

        prompts: a list of strings (encoded with the tokenizer, nothing prepended) or of token-id lists.
        temperature 0 is greedy; top_p / top_k filter before sampling; seed makes the output reproducible and
        independent of the other prompts in the call (each prompt's randomness depends only on the seed and
        the position). stop: strings (and/or token ids) that end a completion, on top of the default stop ids
        (the tokenizer's EOS and <|im_end|> / <|endoftext|> when present); neither the stop string nor the
        stop token is returned. Returns a list of str, or of generated token-id lists with return_tokens=True.
        """
        if isinstance(prompts, (str, bytes)) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
            raise TypeError("prompts must be a list of strings or a list of token-id lists")
        if not return_tokens and self.tokenizer is None:
            raise ValueError("no tokenizer to decode with; pass return_tokens=True")
        if isinstance(stop, str):
            stop = [stop]
        stop = list(stop or [])
        stop_strings = tuple(s for s in stop if isinstance(s, str))
        extra_ids = [int(s) for s in stop if not isinstance(s, str)]
        stop_ids = tuple(dict.fromkeys(self.default_stop_token_ids + extra_ids))  # ordered, no duplicates
        token_lists = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("text prompts need a tokenizer; pass token-id lists")
                ids = self.tokenizer.encode(p)
                if not ids:  # an empty prompt starts a new document
                    specials = (getattr(self.tokenizer, "eos_id", -1), getattr(self.tokenizer, "bos_id", -1))
                    start = [i for i in specials if i is not None and i >= 0]
                    if not start:
                        raise ValueError("empty prompt and the tokenizer has no EOS/BOS to start from")
                    ids = start[:1]
                token_lists.append(ids)
            else:
                token_lists.append([int(t) for t in p])
        params = generation.SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                           top_k=top_k, seed=seed, stop=stop_strings, stop_token_ids=stop_ids)
        completions = self.generator.generate(token_lists, params)
        if return_tokens:
            return [c.tokens for c in completions]
        return [c.text for c in completions]
