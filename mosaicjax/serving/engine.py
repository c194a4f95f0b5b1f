"""Continuous-batching LM engine: a fixed set of KV-cache slots that requests join and leave at every step.

One background thread owns the device state {cache [L, slots, cache_len, kv, hd], cur, pos, n_gen, tokens,
logprobs, done, finish} (the layout of mosaicjax.generation's decode state, batch = slots) and loops:

  1. admit: waiting requests take free slots. They are prefilled together (mosaicjax.generation's compiled
     prefill, padded to its batch and length buckets, cache_len = the engine's) and their rows scattered into
     the slot state by one compiled `insert` (out-of-range slot indices drop the batch-padding rows).
  2. decode `steps_per_sync` tokens for every live slot (the generator's compiled while_loop; finished or empty
     slots are frozen).
  3. on the host: new tokens of each slot go to its request (incremental text, stop strings checked in the
     text, a request cancelled by a client disconnect ends), and finished slots are freed for step 1.

Sampling settings are per slot arrays, and a row's randomness depends only on (seed, position), so a seeded
request gives the same tokens whatever else shares the batch. The waiting queue is bounded (QueueFull -> 429).
Request settings are converted to the device arrays in submit (a bad value is the caller's ValueError); should a
step still raise, the requests the thread holds get an error event and the loop restarts on a fresh slot state.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import secrets
import threading
import time
from typing import Any

import jax
import numpy as np

from mosaicjax.generation import SamplingParams
from mosaicjax.generation import kv_cache

log = logging.getLogger(__name__)
_STOP_TOKEN, _LENGTH = 1, 2  # the generator's finish codes
_N_STOP_IDS = 16  # stop-id columns per slot (fixed so the decode program never recompiles)


class QueueFull(Exception):
    """The waiting queue is full; the caller answers 429."""


@dataclasses.dataclass
class Event:
    """What a request's consumer receives: new text/tokens, then one final event (finish_reason set)."""
    text: str = ""
    tokens: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None


class Request:
    """One prompt continued in one slot. Events arrive on `queue` (an asyncio.Queue of the caller's loop)."""

    def __init__(self, prompt: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop):
        self.prompt, self.params, self.loop = prompt, params, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.t_arrival = time.perf_counter()
        self.t_first: float | None = None
        self.tokens: list[int] = []  # generated so far (a stop token excluded)
        self.logprobs: list[float] = []
        self.emitted = ""  # text already sent
        self.finish_reason: str | None = None
        self.slot: int | None = None

    def cancel(self):
        """Ends the request at the next step (client went away); safe from any thread."""
        self.cancelled = True

    def _push(self, ev: Event):
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)


class Engine:
    """Continuous batching over one LanguageModel's generator (see the module docstring).

    Args:
      lm: mosaicjax.lm.LanguageModel. slots: KV-cache rows decoded together. queue_size: waiting requests
      allowed before QueueFull. cache_len: slots' length (default max_seq_len). steps_per_sync: decode steps per
      host round trip (1 = requests join/leave at every token). metrics/model_name: optional Prometheus sink.
    """

    def __init__(self, lm, *, slots: int = 8, queue_size: int = 256, cache_len: int | None = None,
                 steps_per_sync: int = 1, metrics=None, model_name: str = "model"):
        self.lm = lm
        self.gen = lm.generator
        self.cfg = lm.config
        self.slots = int(slots)
        self.queue_size = int(queue_size)
        self.cache_len = int(cache_len or self.cfg.max_seq_len)
        self.steps_per_sync = int(steps_per_sync)
        self.metrics, self.model_name = metrics, model_name
        self.tokenizer = lm.tokenizer
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: dict[int, Request] = {}
        self._cv = threading.Condition()
        self._stopping = False
        self._insert = jax.jit(self._insert_impl, donate_argnums=(0,))
        self._state = None
        self._samp = None
        self._admitting: list[Request] = []  # taken off the queue, maybe not in a slot yet (failed on error)
        self.steps = 0  # decode calls run (tests/benchmarks)
        self._thread = threading.Thread(target=self._run, name=f"engine-{model_name}", daemon=True)
        self._thread.start()
        if metrics is not None:
            metrics.slots_total.labels(model=model_name).set(self.slots)

    # ------------------------------------------------------------------------------------------ public
    def submit(self, prompt: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop) -> Request:
        """Queues a request (prompt already validated against the context length); QueueFull when full."""
        if params.seed is None:
            params = dataclasses.replace(params, seed=secrets.randbits(32))
        if len(params.stop_token_ids) > _N_STOP_IDS:
            raise ValueError(f"at most {_N_STOP_IDS} stop token ids")
        # Convert the settings here, on the caller's thread: a value that does not fit the device arrays
        # (e.g. top_k >= 2**31) is the caller's ValueError, never an exception inside the engine thread.
        try:
            self._samp_arrays([params], 1)
        except (OverflowError, TypeError, ValueError) as e:
            raise ValueError(f"invalid sampling settings: {e}") from e
        req = Request(list(prompt), params, loop)
        with self._cv:
            if self._stopping:
                raise QueueFull("server is shutting down")
            if len(self._waiting) >= self.queue_size:
                raise QueueFull(f"queue full ({self.queue_size} waiting)")
            self._waiting.append(req)
            self._cv.notify()
        self._gauges()
        return req

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def busy(self) -> int:
        return len(self._active) + len(self._waiting)

    def shutdown(self, timeout: float = 30.0):
        """Stops admitting; lets running requests finish (up to timeout), then ends the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)

    # ------------------------------------------------------------------------------------------ device
    @staticmethod
    def _insert_impl(state, rows, idx):
        """Scatters prefilled rows into slots idx [b] (idx >= slots: dropped). Cache leaves are [L, B, ...]."""
        def put(path, big, small):
            axis = 1 if getattr(path[0], "key", None) == "cache" else 0
            if axis == 1:
                return big.at[:, idx].set(small.astype(big.dtype), mode="drop")
            return big.at[idx].set(small.astype(big.dtype), mode="drop")
        return jax.tree_util.tree_map_with_path(put, state, rows)

    def _empty_state(self):
        """All-done slot state with the generator's decode-state structure (shapes from eval_shape)."""
        s = self.slots
        samp = self._samp_arrays([SamplingParams(max_tokens=1, temperature=0.0, seed=0)] * s, s)
        shapes = jax.eval_shape(lambda: self.gen._prefill(  # pylint: disable=protected-access
            self.gen.params, np.zeros((s, 1), np.int32), np.ones((s,), np.int32), np.zeros((s,), bool), samp,
            cache_len=self.cache_len))
        state = jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype)), shapes)
        state["done"] = jax.device_put(np.ones((s,), bool))
        return state, samp

    def _samp_arrays(self, params: list[SamplingParams], b: int, max_tokens=None) -> dict:
        pad = [SamplingParams(max_tokens=1, temperature=0.0, seed=0)] * (b - len(params))
        ps = list(params) + pad
        stop_ids = np.full((b, _N_STOP_IDS), -1, np.int32)
        for r, sp in enumerate(ps):
            stop_ids[r, :len(sp.stop_token_ids)] = sp.stop_token_ids
        mt = np.array([sp.max_tokens for sp in ps], np.int32) if max_tokens is None else max_tokens
        return {"seed": np.array([sp.seed % 2**32 for sp in ps], np.uint32),
                "temperature": np.array([sp.temperature for sp in ps], np.float32),
                "top_k": np.array([min(sp.top_k or 0, np.iinfo(np.int32).max) for sp in ps], np.int32),
                "top_p": np.array([sp.top_p for sp in ps], np.float32),
                "max_tokens": mt, "stop_ids": stop_ids}

    def _admit(self, new: list[Request], free: list[int]):
        """Prefills `new` (grouped by length bucket) into the `free` slots."""
        by_bucket: dict[int, list[Request]] = collections.defaultdict(list)
        for r in new:
            by_bucket[kv_cache.bucket(len(r.prompt), self.gen.length_buckets)].append(r)
        for p_len, reqs in by_bucket.items():
            for start in range(0, len(reqs), self.gen.max_batch):
                group = reqs[start:start + self.gen.max_batch]
                b = kv_cache.bucket(len(group), self.gen.batch_buckets)
                tokens = np.zeros((b, p_len), np.int32)
                lengths = np.ones((b,), np.int32)
                for i, r in enumerate(group):
                    tokens[i, :len(r.prompt)] = r.prompt
                    lengths[i] = len(r.prompt)
                max_tokens = np.ones((b,), np.int32)
                max_tokens[:len(group)] = [min(r.params.max_tokens, self.cache_len - len(r.prompt)) for r in group]
                samp = self._samp_arrays([r.params for r in group], b, max_tokens)
                rows = self.gen._prefill(self.gen.params, tokens, lengths,  # pylint: disable=protected-access
                                         np.arange(b) < len(group), samp, cache_len=self.cache_len)
                idx = np.full((b,), self.slots, np.int32)
                for i, r in enumerate(group):
                    r.slot = free.pop(0)
                    idx[i] = r.slot
                    self._active[r.slot] = r
                    for k in self._samp:
                        self._samp[k][r.slot] = samp[k][i]
                self._state = self._insert(self._state, rows, idx)
                if self.metrics is not None:
                    self.metrics.prompt_tokens.labels(model=self.model_name).inc(sum(len(r.prompt) for r in group))

    # ------------------------------------------------------------------------------------------ loop
    def _run(self):
        with self.gen._context():  # pylint: disable=protected-access
            while True:
                try:
                    self._state, self._samp = self._empty_state()
                    self._loop()
                    return
                except Exception as e:  # pylint: disable=broad-except
                    # Fail the requests in flight -- those in slots and those being admitted (already off the
                    # queue: nobody else would ever answer them) -- and keep serving with a fresh slot state.
                    with self._cv:
                        pending = list(self._active.values())
                        pending += [r for r in self._admitting if all(r is not p for p in pending)]
                        self._active.clear()
                        self._admitting = []
                    log.exception("engine %s step failed; failing %d requests", self.model_name, len(pending))
                    for r in pending:
                        r.finish_reason = "error"
                        r._push(Event(finish_reason="error", error=f"engine failure: {type(e).__name__}: {e}"))
                    time.sleep(0.05)  # no busy loop if the device keeps failing

    def _loop(self):
        while True:
            with self._cv:
                while not self._active and not self._waiting:
                    if self._stopping:
                        return
                    self._cv.wait(0.5)
                while self._waiting and self._waiting[0].cancelled:
                    self._waiting.popleft()
                free = [s for s in range(self.slots) if s not in self._active]
                new = []
                while free and self._waiting and len(new) < len(free):
                    r = self._waiting.popleft()
                    if not r.cancelled:
                        new.append(r)
                self._admitting = new
            if new:
                self._admit(new, free)
            self._admitting = []
            self._gauges()
            if not self._active:
                continue
            t0 = time.perf_counter()
            self._state = self.gen._decode(self.gen.params, self._state,  # pylint: disable=protected-access
                                           self._samp, np.int32(self.steps_per_sync))
            self.steps += 1
            host = jax.device_get({k: self._state[k] for k in ("tokens", "logprobs", "n_gen", "done", "finish")})
            done = np.array(host["done"])
            forced = False
            n_new = 0
            for slot, r in list(self._active.items()):
                n_new += int(host["n_gen"][slot]) - len(r.tokens)
                if self._update(r, host, slot):
                    del self._active[slot]
                    if not done[slot]:
                        done[slot] = True
                        forced = True
            if forced:  # stop strings / cancellations end rows the device still thinks are live
                self._state["done"] = jax.device_put(done)
            if self.metrics is not None and n_new > 0:
                self.metrics.generation_tokens.labels(model=self.model_name).inc(n_new)
                self.metrics.tokens_per_second.labels(model=self.model_name).set(
                    n_new / max(time.perf_counter() - t0, 1e-9))

    def _gauges(self):
        if self.metrics is not None:
            self.metrics.queue_depth.labels(model=self.model_name).set(len(self._waiting))
            self.metrics.slots_used.labels(model=self.model_name).set(len(self._active))

    def _update(self, r: Request, host: dict, slot: int) -> bool:
        """Sends slot's new tokens to r; True when r is finished (its slot can be reused)."""
        if r.cancelled:
            r.finish_reason = "cancelled"
            r._push(Event(finish_reason="cancelled"))
            return True
        n = int(host["n_gen"][slot])
        finished = bool(host["done"][slot])
        code = int(host["finish"][slot])
        if finished and code == _STOP_TOKEN:
            n -= 1  # the stop token is not part of the completion
        toks = [int(t) for t in host["tokens"][slot, :n]]
        lps = [float(x) for x in host["logprobs"][slot, :n]]
        prev = len(r.tokens)
        if r.t_first is None and (n > 0 or finished):
            r.t_first = time.perf_counter()
            if self.metrics is not None:
                self.metrics.ttft.labels(model=self.model_name).observe(r.t_first - r.t_arrival)
        r.tokens, r.logprobs = toks, lps
        finish = ("stop" if code == _STOP_TOKEN else "length") if finished else None
        text = self.tokenizer.decode(toks) if self.tokenizer is not None else ""
        stops = r.params.stop
        safe = len(text)
        if stops:
            hits = [(text.find(s), s) for s in stops if s in text]
            if hits:
                cut = min(hits)[0]
                text, safe, finish = text[:cut], cut, "stop"
                # Keep the tokens up to the one that completed the stop string (as the generator does);
                # earlier checks found none in toks[:prev], so that token is new.
                for m in range(prev + 1, len(toks) + 1):
                    if any(s in self.tokenizer.decode(toks[:m]) for s in stops):
                        r.tokens, r.logprobs = toks[:m], lps[:m]
                        break
            elif finish is None:  # hold back a tail that may be the start of a stop string
                for s in stops:
                    for k in range(min(len(s) - 1, len(text)), 0, -1):
                        if text.endswith(s[:k]):
                            safe = min(safe, len(text) - k)
                            break
        if finish is None and text.endswith("\ufffd"):
            safe = min(safe, len(text) - 1)  # an incomplete UTF-8 character: wait for its other bytes
        delta = text[len(r.emitted):safe] if safe > len(r.emitted) else ""
        if finish is not None:
            delta = text[len(r.emitted):]
            r.finish_reason = finish
            if self.metrics is not None:
                self.metrics.e2e.labels(model=self.model_name).observe(time.perf_counter() - r.t_arrival)
        new_toks, new_lps = r.tokens[prev:], r.logprobs[prev:]
        if delta or new_toks or finish is not None:
            r.emitted += delta
            r._push(Event(text=delta, tokens=new_toks, logprobs=new_lps, finish_reason=finish))
        return finish is not None
