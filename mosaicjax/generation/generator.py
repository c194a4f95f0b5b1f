"""Batched KV-cache generation for DBRX: jitted prefill + decode loop over fixed shape buckets.

    gen = Generator(config, params, tokenizer)
    [c] = gen.generate([[1, 2, 3]], SamplingParams(max_tokens=32, temperature=0.0, stop=('\\n\\n',)))
    c.tokens, c.text, c.finish_reason ('stop' | 'length'), c.logprobs, c.stop_reason

Two compiled programs per bucket (see kv_cache.py for the cache layout, right padding and the buckets):
  prefill(params, tokens [B, P], lengths [B], ...)   -> decode state, first token drawn
      runs the training forward over the right-padded prompts (padding is its own segment), fills the cache
      and computes logits only at each row's last prompt token.
  decode(params, state, ..., n_steps)                -> state
      a lax.while_loop of single-token steps (cached attention, gathered experts) that stops early once every
      row is done; n_steps is a traced scalar, so any step count reuses the program. The state (cache
      included) is donated and updated in place.
Stop token ids and max_tokens end rows inside the loop. Stop strings need the tokenizer: with any in the
batch the loop runs `stop_check_steps` tokens at a time and the host checks the new text in between.
Top logprobs (OpenAI's top_logprobs): prefill(..., num_top=K) adds 'top_ids' / 'top_logprobs' [B, S, K] to the
state, the K most likely tokens of each step's raw distribution, computed only while some live row asks for them
(samp['n_top'] > 0), so serving pays for the top-k only when a request wants it.

Finished rows keep computing (their outputs are frozen) until the whole batch is done; the server's
continuous batching will instead refill their slots.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import secrets
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mosaicjax.generation import kv_cache
from mosaicjax.generation import sampling as sampling_lib
from mosaicjax.models import dbrx

# Per-row finish codes inside the compiled loop (the host adds stop strings itself).
_RUNNING, _STOP_TOKEN, _LENGTH = 0, 1, 2
_STOP_ID_BUCKETS = (4, 8, 16, 32, 64, 128)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one prompt is continued.

    Attributes:
      max_tokens: tokens to generate at most (clipped to max_seq_len - prompt length); >= 1.
      temperature: 0 = greedy; else logits are divided by it before sampling.
      top_p: nucleus sampling mass (1 = off). top_k: keep the k most likely tokens (None or 0 = off).
      seed: the row's randomness is a function of (seed, position) only; None draws a fresh seed.
        Seeds are taken modulo 2**32.
      stop: strings that end the completion; the returned text stops before the first occurrence (in the
        generated text only) and the tokens end with the token that completed it.
      stop_token_ids: token ids that end the completion; the stop token is not returned.
    """
    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f'max_tokens must be >= 1, got {self.max_tokens}')
        if self.temperature < 0:
            raise ValueError(f'temperature must be >= 0, got {self.temperature}')
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f'top_p must be in (0, 1], got {self.top_p}')
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f'top_k must be >= 0 or None, got {self.top_k}')
        if any(not s for s in self.stop):
            raise ValueError('stop strings must be non-empty')


@dataclasses.dataclass
class Completion:
    """One prompt's continuation.

    tokens / logprobs: generated ids and their raw model log-probabilities (aligned; a stop token id is
    dropped from both). text: tokenizer.decode(tokens), cut before a matched stop string (None without a
    tokenizer). finish_reason: 'stop' (stop token or string) or 'length' (max_tokens or max_seq_len).
    stop_reason: the stop token id or stop string that ended it, else None.
    """
    tokens: list[int]
    logprobs: list[float]
    text: str | None
    finish_reason: str
    stop_reason: int | str | None
    prompt_tokens: int


class Generator:
    """Compiles and runs prefill/decode for one model; reuse one instance so compiled programs are reused.

    Args:
      config, params: the model (params: the 'params' collection, plain arrays).
      tokenizer: needed for text and stop strings only (anything with decode(ids) -> str).
      max_batch: largest batch run at once (more prompts run in successive batches, shortest first).
      min_length: smallest prompt/cache length bucket.
      stop_check_steps: decode steps between host-side stop-string checks.
      vocab_limit: ids >= it are never sampled (lm_head rows past the tokenizer's vocabulary).
      mesh, rules: when given, programs are traced under rules.activate(mesh, rules) so the model's logical
        constraints shard activations; params should already be placed on the mesh.
    """

    def __init__(self, config: dbrx.DbrxConfig, params: Any, tokenizer: Any = None, *, max_batch: int = 16,
                 min_length: int = 16, stop_check_steps: int = 16, vocab_limit: int | None = None,
                 mesh=None, rules=None):
        self.config = config
        # Host (numpy) leaves would be copied to the device on every call: place them once. Arrays already
        # on devices (e.g. sharded over a mesh by load_lm) are kept where they are.
        self.params = jax.tree.map(lambda a: a if isinstance(a, jax.Array) else jax.device_put(a), params)
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.length_buckets = kv_cache.length_buckets(config.max_seq_len, min_length)
        self.batch_buckets = kv_cache.batch_buckets(max_batch)
        self.stop_check_steps = stop_check_steps
        self.vocab_limit = vocab_limit
        self.mesh, self.rules = mesh, rules
        self.model = dbrx.Dbrx(config)
        # Incremented while tracing only, i.e. once per compiled program: tests assert no recompilation.
        self.trace_counts: collections.Counter = collections.Counter()
        # The compiled programs, a public lower-level API (the serving engine drives them itself):
        #   prefill(params, tokens [B, P], lengths [B], active [B], samp, cache_len=S, num_top=0) -> state
        #   decode(params, state, samp, n_steps) -> state (state donated; updated in place)
        # Call both under context(). state: {'cache': {'k','v'} [L, B, S, kv, hd], 'cur', 'pos', 'n_gen',
        # 'done', 'finish' [B], 'tokens', 'logprobs' [B, S]} (+ 'top_ids', 'top_logprobs' [B, S, K] when
        # num_top = K > 0); finish codes 0 running, 1 stop token, 2 length. samp: {'seed' uint32,
        # 'temperature' f32, 'top_k' i32, 'top_p' f32, 'max_tokens' i32 [B], 'stop_ids' i32 [B, n] (-1 = none)}
        # and, with num_top, 'n_top' i32 [B] (rows wanting top logprobs; > 0 switches the top-k on).
        self.prefill = jax.jit(self._prefill_impl, static_argnames=('cache_len', 'num_top'))
        self.decode = jax.jit(self._decode_impl, donate_argnames=('state',))

    # ------------------------------------------------------------------------------------------------------
    # Compiled programs

    def _finish(self, state, tok, lp, live, samp, top=None):
        """Records token tok/lp (and top = (ids, logprobs) [batch, K]) for live rows; ends rows that hit a stop
        id or max_tokens."""
        b, g = state['tokens'].shape
        rows = jnp.arange(b)
        slot = jnp.where(live, state['n_gen'], g)  # [batch]; g = out of bounds: dropped
        tokens = state['tokens'].at[rows, slot].set(tok, mode='drop')  # [batch, G]
        logprobs = state['logprobs'].at[rows, slot].set(lp, mode='drop')  # [batch, G]
        extra = {}
        if top is not None:
            extra['top_ids'] = state['top_ids'].at[rows, slot].set(top[0], mode='drop')  # [batch, G, K]
            extra['top_logprobs'] = state['top_logprobs'].at[rows, slot].set(top[1], mode='drop')
        n_gen = state['n_gen'] + live.astype(jnp.int32)
        hit_stop = jnp.any(tok[:, None] == samp['stop_ids'], axis=-1) & live  # [batch]
        hit_len = (n_gen >= samp['max_tokens']) & live & ~hit_stop
        finish = jnp.where(hit_stop, _STOP_TOKEN, jnp.where(hit_len, _LENGTH, state['finish']))
        return dict(state, tokens=tokens, logprobs=logprobs, n_gen=n_gen, finish=finish, **extra,
                    done=state['done'] | hit_stop | hit_len, cur=jnp.where(live, tok, state['cur']))

    def _top(self, logits, live, samp, k):
        """(ids int32, logprobs f32) [batch, k] of the raw distribution, or zeros when no live row wants them."""
        if not k:
            return None
        b = logits.shape[0]
        want = jnp.any((samp['n_top'] > 0) & live) if 'n_top' in samp else False
        return jax.lax.cond(want, lambda x: sampling_lib.top_logprobs(x, k, self.vocab_limit),
                            lambda x: (jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k), jnp.float32)), logits)

    def _prefill_impl(self, params, tokens, lengths, active, samp, *, cache_len, num_top=0):
        """tokens int32 [B, P] right-padded, lengths int32 [B] (>= 1), active bool [B] (False: batch padding)."""
        self.trace_counts['prefill'] += 1
        b, p = tokens.shape
        cache = kv_cache.init_cache(self.config, b, cache_len)  # [L, B, S, kv, hd] each
        segment_ids = (jnp.arange(p)[None, :] < lengths[:, None]).astype(jnp.int32)  # [B, P]; 0 = padding
        logits, aux = self.model.apply({'params': params}, tokens, segment_ids=segment_ids, kv_cache=cache,
                                       logits_index=lengths - 1)  # [B, 1, V]
        tok, lp = sampling_lib.sample(logits[:, 0], samp['seed'], lengths, samp['temperature'], samp['top_k'],
                                      samp['top_p'], self.vocab_limit)  # [B], [B]
        state = {
            'cache': aux['kv_cache'],
            'cur': tok,  # last drawn token, not yet in the cache
            'pos': lengths,  # [B] slot (= position) the current token goes to
            'n_gen': jnp.zeros((b,), jnp.int32),
            'tokens': jnp.zeros((b, cache_len), jnp.int32),  # generated ids; a row never exceeds cache_len
            'logprobs': jnp.zeros((b, cache_len), jnp.float32),
            'done': ~active,
            'finish': jnp.zeros((b,), jnp.int32),
        }
        if num_top:
            state['top_ids'] = jnp.zeros((b, cache_len, num_top), jnp.int32)
            state['top_logprobs'] = jnp.zeros((b, cache_len, num_top), jnp.float32)
        return self._finish(state, tok, lp, active, samp, self._top(logits[:, 0], active, samp, num_top))

    def _decode_impl(self, params, state, samp, n_steps):
        """Up to n_steps (traced int32) single-token steps; stops early when every row is done."""
        self.trace_counts['decode'] += 1

        def cond(carry):
            i, st = carry
            return (i < n_steps) & ~jnp.all(st['done'])

        def body(carry):
            i, st = carry
            live = ~st['done']
            logits, aux = self.model.apply({'params': params}, st['cur'][:, None], kv_cache=st['cache'],
                                           cache_index=st['pos'])  # [B, 1, V]
            # The drawn token's position is one past the slot just written.
            tok, lp = sampling_lib.sample(logits[:, 0], samp['seed'], st['pos'] + 1, samp['temperature'],
                                          samp['top_k'], samp['top_p'], self.vocab_limit)
            top = self._top(logits[:, 0], live, samp, st['top_ids'].shape[-1] if 'top_ids' in st else 0)
            st = dict(st, cache=aux['kv_cache'], pos=st['pos'] + live.astype(jnp.int32))
            return i + 1, self._finish(st, tok, lp, live, samp, top)

        _, state = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state))
        return state

    def context(self):
        """The mesh/rules context prefill and decode must be traced and called under (a no-op without a mesh)."""
        if self.mesh is None:
            return contextlib.nullcontext()
        from mosaicjax.parallel import rules as rules_lib  # pylint: disable=import-outside-toplevel
        return rules_lib.activate(self.mesh, self.rules if self.rules is not None else rules_lib.get_rules())

    def init_state(self, samp: dict, cache_len: int, num_top: int = 0) -> dict:
        """An all-done decode state for len(samp['seed']) rows (shapes from prefill's, nothing computed):
        what a continuous-batching server scatters prefilled rows into."""
        b = samp['seed'].shape[0]
        shapes = jax.eval_shape(lambda: self.prefill(self.params, np.zeros((b, 1), np.int32), np.ones((b,), np.int32),
                                                     np.zeros((b,), bool), samp, cache_len=cache_len, num_top=num_top))
        state = jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype)), shapes)
        state['done'] = jax.device_put(np.ones((b,), bool))
        return state

    # ------------------------------------------------------------------------------------------------------
    # Host side

    def generate(self, prompts: Sequence[Sequence[int]],
                 sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams()) -> list[Completion]:
        """Continues each prompt (a list of token ids, non-empty); one SamplingParams for all or one each."""
        prompts = [[int(t) for t in p] for p in prompts]
        params = [sampling] * len(prompts) if isinstance(sampling, SamplingParams) else list(sampling)
        if len(params) != len(prompts):
            raise ValueError(f'{len(params)} SamplingParams for {len(prompts)} prompts')
        limit = self.config.max_seq_len
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f'prompt {i} is empty')
            if len(p) >= limit:
                raise ValueError(f'prompt {i} has {len(p)} tokens; max_seq_len={limit} leaves no room to generate')
            if min(p) < 0 or max(p) >= self.config.vocab_size:
                raise ValueError(f'prompt {i} has token ids outside [0, {self.config.vocab_size})')
            if params[i].stop and self.tokenizer is None:
                raise ValueError('stop strings need a tokenizer')
        # Fix unseeded rows now, so a row's seed does not depend on how the batch is split.
        params = [sp if sp.seed is not None else dataclasses.replace(sp, seed=secrets.randbits(32))
                  for sp in params]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
        out: list[Completion | None] = [None] * len(prompts)
        for start in range(0, len(order), self.max_batch):
            idx = order[start:start + self.max_batch]
            for i, c in zip(idx, self._generate_batch([prompts[i] for i in idx], [params[i] for i in idx])):
                out[i] = c
        return out

    def _generate_batch(self, prompts, params) -> list[Completion]:
        n = len(prompts)
        b = kv_cache.bucket(n, self.batch_buckets)
        lengths = np.ones((b,), np.int32)
        lengths[:n] = [len(p) for p in prompts]
        max_tokens = np.ones((b,), np.int32)
        max_tokens[:n] = [min(sp.max_tokens, self.config.max_seq_len - len(p)) for p, sp in zip(prompts, params)]
        p_len = kv_cache.bucket(int(lengths.max()), self.length_buckets)
        cache_len = max(p_len, kv_cache.bucket(int((lengths + max_tokens).max()), self.length_buckets))
        tokens = np.zeros((b, p_len), np.int32)
        for r, p in enumerate(prompts):
            tokens[r, :len(p)] = p
        n_stop = kv_cache.bucket(max([len(sp.stop_token_ids) for sp in params] + [1]), _STOP_ID_BUCKETS)
        stop_ids = np.full((b, n_stop), -1, np.int32)
        for r, sp in enumerate(params):
            stop_ids[r, :len(sp.stop_token_ids)] = sp.stop_token_ids
        pad = [SamplingParams(max_tokens=1, temperature=0.0, seed=0)] * (b - n)
        samp = {
            'seed': np.array([sp.seed % 2**32 for sp in params + pad], np.uint32),
            'temperature': np.array([sp.temperature for sp in params + pad], np.float32),
            'top_k': np.array([sp.top_k or 0 for sp in params + pad], np.int32),
            'top_p': np.array([sp.top_p for sp in params + pad], np.float32),
            'max_tokens': max_tokens,
            'stop_ids': stop_ids,
        }
        active = np.arange(b) < n
        with self.context():
            state = self.prefill(self.params, tokens, lengths, active, samp, cache_len=cache_len)
            string_stops = [s.stop for s in params]
            checked = np.zeros((n,), np.int64)  # tokens of each row already searched for stop strings
            matched: dict[int, tuple[str, int, str]] = {}  # row -> (stop string, tokens kept, text)
            while True:
                host = jax.device_get({k: state[k] for k in ('done', 'finish', 'n_gen')})
                if any(string_stops):
                    done = np.array(host['done'])
                    toks = np.asarray(jax.device_get(state['tokens']))
                    for r in range(n):
                        if not string_stops[r] or r in matched or host['n_gen'][r] == checked[r]:
                            continue
                        hit = self._find_stop_string(toks[r], host, r, string_stops[r], checked[r])
                        checked[r] = host['n_gen'][r]
                        if hit is not None:
                            matched[r] = hit
                            done[r] = True
                    state['done'] = jax.device_put(done)  # (jnp.asarray would compile a tiny program)
                    host['done'] = done
                if np.all(host['done']):
                    break
                live = ~np.asarray(host['done'])
                steps = int(np.max((max_tokens - host['n_gen'])[live]))
                if any(string_stops):
                    steps = min(steps, self.stop_check_steps)
                state = self.decode(self.params, state, samp, np.int32(steps))
        final = jax.device_get({k: state[k] for k in ('tokens', 'logprobs', 'n_gen', 'finish')})
        return [self._completion(r, prompts[r], final, matched.get(r)) for r in range(n)]

    def _find_stop_string(self, toks, host, r, stops, checked):
        """Earliest stop string in row r's generated text -> (string, tokens to keep, text before it)."""
        n = int(host['n_gen'][r]) - (1 if host['finish'][r] == _STOP_TOKEN else 0)
        text = self.tokenizer.decode(toks[:n].tolist())
        hits = [(text.find(s), s) for s in stops if s in text]
        if not hits:
            return None
        cut, s = min(hits)
        keep = n
        for m in range(max(1, int(checked)), n + 1):  # the first prefix that completes a stop string
            prefix = self.tokenizer.decode(toks[:m].tolist())
            if any(x in prefix for x in stops):
                keep = m
                break
        return s, keep, text[:cut]

    def _completion(self, r, prompt, final, matched) -> Completion:
        n = int(final['n_gen'][r])
        toks = [int(t) for t in final['tokens'][r, :n]]
        lps = [float(x) for x in final['logprobs'][r, :n]]
        code = int(final['finish'][r])
        if matched is not None:
            s, keep, text = matched
            return Completion(toks[:keep], lps[:keep], text, 'stop', s, len(prompt))
        stop_reason = None
        if code == _STOP_TOKEN:
            stop_reason = toks.pop()
            lps.pop()
        text = None if self.tokenizer is None else self.tokenizer.decode(toks)
        return Completion(toks, lps, text, 'stop' if code == _STOP_TOKEN else 'length', stop_reason, len(prompt))
