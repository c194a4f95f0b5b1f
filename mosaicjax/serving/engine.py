"""Continuous-batching LM engine: a fixed set of KV-cache slots that requests join and leave at every step.

One background thread owns the device state {cache [L, slots, cache_len, kv, hd], cur, pos, n_gen, tokens,
logprobs, top_ids, top_logprobs, done, finish} (mosaicjax.generation's decode state, batch = slots) and loops:

  1. admit: waiting requests take free slots. They are prefilled together (the generator's compiled `prefill`,
     padded to its batch and length buckets, cache_len = the engine's; a prefill call holds at most
     max_prefill_tokens padded prompt tokens, so long prompts go a few at a time) and their rows scattered into
     the slot state by one compiled `insert` (out-of-range slot indices drop the batch-padding rows).
  2. step: `steps_per_sync` decode steps (the generator's compiled `decode` while_loop; finished or empty slots
     are frozen) over the first `nb` slots only, nb = the smallest batch bucket holding every occupied slot
     (requests take the lowest free slots, so one stream decodes at batch 1, not at batch `slots`), and in the
     same program a [nb, steps_per_sync + 1] window of the tokens each slot produced since the host last looked:
     the host copies O(slots) numbers per step, not the [slots, cache_len] token history.
  3. on the host: each slot's new tokens go to its request (incremental detokenisation, stop strings checked in
     the new text only, a request cancelled by a client disconnect ends), finished slots are freed for step 1.

Steps 2 and 3 overlap (asynchronous scheduling, as vLLM's): step N+1 is dispatched before the host reads step N's
window, so the device decodes while the host detokenises and answers. Host decisions therefore act one step late:
a request ended on the host (stop string, disconnect) has its row stopped after the step already in flight (one
wasted row-step), and a window is ignored for requests inserted after its step was dispatched. Each step's window
starts where the previous one ended for that row (a per-slot 'win_start' kept on the device; 0 for a new row).

Warm-up: before serving (and before the app's /health says ready) the thread compiles every program a request
can need -- prefill for every (batch bucket, length bucket), insert, the decode step, and the scoring forward
(lm.logits) of every length bucket -- so no request pays compilation.

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
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mosaicjax.generation import SamplingParams
from mosaicjax.generation import kv_cache

log = logging.getLogger(__name__)
_STOP_TOKEN, _LENGTH = 1, 2  # the generator's finish codes
_N_STOP_IDS = 16  # stop-id columns per slot (fixed so the decode program never recompiles)
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs; the engine always tracks this many (when asked)


class QueueFull(Exception):
    """The waiting queue is full; the caller answers 429."""


class ShuttingDown(Exception):
    """The engine is draining (SIGTERM): it takes no new requests; the caller answers 503."""


@dataclasses.dataclass
class Event:
    """What a request's consumer receives: new text/tokens, then one final event (finish_reason set).

    top: per new token, its request's top_logprobs as [(token id, logprob)], best first (empty lists unless the
    request asked for top_logprobs).
    """
    text: str = ""
    tokens: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    top: list = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None


class Request:
    """One prompt continued in one slot. Events arrive on `queue` (an asyncio.Queue of the caller's loop)."""

    def __init__(self, prompt: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop,
                 top_logprobs: int = 0):
        self.prompt, self.params, self.loop = prompt, params, loop
        self.top_logprobs = int(top_logprobs)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.t_arrival = time.perf_counter()
        self.t_first: float | None = None
        self.tokens: list[int] = []  # generated so far (a stop token excluded)
        self.logprobs: list[float] = []
        self.top: list[list[tuple[int, float]]] = []
        self.text = ""  # decoded so far (may end inside a held-back stop-string prefix)
        self.emitted = ""  # text already sent
        self.finish_reason: str | None = None
        self.slot: int | None = None
        self._n_read = 0  # device tokens of this request the host has read (stop token included)
        self._first_step = 0  # the first decode step dispatched after this request's row was inserted
        self._prefix_off = self._read_off = 0  # incremental detokenisation offsets (as vLLM's)

    def cancel(self):
        """Ends the request at the next step (client went away); safe from any thread."""
        self.cancelled = True

    def _push(self, ev: Event):
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)


def _deliver(pairs):
    for r, ev in pairs:
        r.queue.put_nowait(ev)


def _insert_impl(state, rows, idx):
    """Scatters prefilled rows into slots idx [b] (idx >= slots: dropped). Cache leaves are [L, B, ...]."""
    def put(path, big, small):
        if getattr(path[0], "key", None) == "cache":
            return big.at[:, idx].set(small.astype(big.dtype), mode="drop")
        return big.at[idx].set(small.astype(big.dtype), mode="drop")
    return jax.tree_util.tree_map_with_path(put, state, rows)


_insert = jax.jit(_insert_impl, donate_argnums=(0,))
_STEP_PROGRAMS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _rows(state, nb):
    """The first nb slots of a decode state (cache leaves are [L, B, ...], the others [B, ...])."""
    return {k: (jax.tree.map(lambda a: a[:, :nb], v) if k == "cache" else v[:nb]) for k, v in state.items()}


def _put_rows(state, rows):
    """state with its first slots replaced by rows (in place when state is donated)."""
    def put(big, small):
        return jax.lax.dynamic_update_slice(big, small, (0,) * big.ndim)
    return {k: (jax.tree.map(put, v, rows[k]) if k == "cache" else put(v, rows[k])) for k, v in state.items()}


def _step_program(gen, width: int):
    """jit(decode of the first nb slots + the window of new tokens) for one generator, shared by every engine over
    it: step(params, state [slots] (+ 'win_start'), samp [nb], n_steps) -> (state, window [nb, ...]). nb (from
    samp's shape) is a batch bucket; one program per bucket."""
    progs = _STEP_PROGRAMS.setdefault(gen, {})
    if width not in progs:
        def step(params, state, samp, n_steps):
            nb, slots = samp["seed"].shape[0], state["done"].shape[0]
            state = dict(state)
            win_start = state.pop("win_start")  # [slots] where each row's next window starts
            sub = state if nb == slots else _rows(state, nb)  # [nb] rows (the cache: a copy of nb / slots of it)
            sub = gen.decode(params, sub, samp, n_steps)  # inlined into this program
            state = sub if nb == slots else _put_rows(state, sub)
            start = win_start[:nb]
            s = sub["tokens"].shape[1]
            idx = jnp.minimum(start[:, None] + jnp.arange(width, dtype=jnp.int32)[None, :], s - 1)  # [nb, W]
            win = {k: sub[k] for k in ("n_gen", "done", "finish")}
            win["start"] = start
            for k in ("tokens", "logprobs", "top_ids", "top_logprobs"):
                if k in sub:  # [nb, W] or [nb, W, K]
                    win[k] = jnp.take_along_axis(sub[k], idx.reshape(idx.shape + (1,) * (sub[k].ndim - 2)), axis=1)
            state["win_start"] = jax.lax.dynamic_update_slice(win_start, sub["n_gen"], (0,))
            return state, win
        progs[width] = jax.jit(step, donate_argnums=(1,))
    return progs[width]


class Engine:
    """Continuous batching over one LanguageModel's generator (see the module docstring).

    Args:
      lm: mosaicjax.lm.LanguageModel. slots: KV-cache rows decoded together. queue_size: waiting requests
      allowed before QueueFull. cache_len: slots' length (default max_seq_len). steps_per_sync: decode steps per
      host round trip (1 = requests join/leave at every token). metrics/model_name: optional Prometheus sink.
      warmup: compile every program before serving (`ready` is set when done; requests queue meanwhile).
      max_prefill_tokens: the most (padded) prompt tokens one prefill call takes, batch x length bucket (at least
        one prompt); bounds prefill memory and the number of prefill programs.
      overlap: dispatch step N+1 before reading step N (see the module docstring); False reads each step before
        the next is dispatched.
    """

    def __init__(self, lm, *, slots: int = 8, queue_size: int = 256, cache_len: int | None = None,
                 steps_per_sync: int = 1, metrics=None, model_name: str = "model", warmup: bool = True,
                 max_prefill_tokens: int = 4096, overlap: bool = True):
        self.lm = lm
        self.gen = lm.generator
        self.cfg = lm.config
        self.slots = int(slots)
        self.queue_size = int(queue_size)
        self.cache_len = int(cache_len or self.cfg.max_seq_len)
        self.steps_per_sync = int(steps_per_sync)
        if self.steps_per_sync < 1:
            raise ValueError(f"steps_per_sync must be >= 1, got {steps_per_sync}")
        self.metrics, self.model_name = metrics, model_name
        self.tokenizer = lm.tokenizer
        self.warmup = warmup
        self.max_prefill_tokens = int(max_prefill_tokens)
        self.overlap = overlap
        self.ready = threading.Event()
        self.warmup_seconds: float | None = None
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: dict[int, Request] = {}
        self._cv = threading.Condition()
        self._stopping = False
        self._step = _step_program(self.gen, self.steps_per_sync + 1)
        self._state = None
        self._samp = None
        self._admitting: list[Request] = []  # taken off the queue, maybe not in a slot yet (failed on error)
        self.steps = 0  # decode steps dispatched (tests/benchmarks); also the id of the next step
        self._t_last = time.perf_counter()  # when a window was last read (the tokens/s gauge)
        self._thread = threading.Thread(target=self._run, name=f"engine-{model_name}", daemon=True)
        self._thread.start()
        if metrics is not None:
            metrics.slots_total.labels(model=model_name).set(self.slots)

    # ------------------------------------------------------------------------------------------ public
    def submit(self, prompt: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop,
               top_logprobs: int = 0) -> Request:
        """Queues a request (prompt already validated against the context length); QueueFull when full.

        top_logprobs: how many of each step's most likely tokens the request's events carry (<= 20)."""
        if params.seed is None:
            params = dataclasses.replace(params, seed=secrets.randbits(32))
        if len(params.stop_token_ids) > _N_STOP_IDS:
            raise ValueError(f"at most {_N_STOP_IDS} stop token ids")
        if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]")
        # Convert the settings here, on the caller's thread: a value that does not fit the device arrays
        # (e.g. top_k >= 2**31) is the caller's ValueError, never an exception inside the engine thread.
        try:
            self._samp_arrays([params], 1)
        except (OverflowError, TypeError, ValueError) as e:
            raise ValueError(f"invalid sampling settings: {e}") from e
        req = Request(list(prompt), params, loop, top_logprobs)
        with self._cv:
            if self._stopping:
                raise ShuttingDown("not accepting new requests")
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
    def _samp_arrays(self, params: list[SamplingParams], b: int, max_tokens=None, n_top=None) -> dict:
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
                "max_tokens": mt, "stop_ids": stop_ids,
                "n_top": np.zeros((b,), np.int32) if n_top is None else n_top}

    def _empty_state(self):
        samp = self._samp_arrays([SamplingParams(max_tokens=1, temperature=0.0, seed=0)] * self.slots, self.slots)
        state = self.gen.init_state(samp, self.cache_len, MAX_TOP_LOGPROBS)
        state["win_start"] = jax.device_put(np.zeros((self.slots,), np.int32))
        return state, samp

    def prefill_batch(self, p_len: int) -> int:
        """The largest batch bucket one prefill of length bucket p_len runs (within slots and the token budget)."""
        fits = [b for b in self.gen.batch_buckets
                if b <= min(self.slots, self.gen.max_batch) and b * p_len <= self.max_prefill_tokens]
        return max(fits, default=1)

    def _prefill(self, prompts: list[list[int]], params: list[SamplingParams], n_top: list[int], p_len: int):
        """Prefills one group (same length bucket, <= max_batch) -> (rows, padded samp arrays)."""
        b = kv_cache.bucket(max(len(prompts), 1), self.gen.batch_buckets)
        tokens = np.zeros((b, p_len), np.int32)
        lengths = np.ones((b,), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = p
            lengths[i] = len(p)
        max_tokens = np.ones((b,), np.int32)
        max_tokens[:len(prompts)] = [min(sp.max_tokens, self.cache_len - len(p)) for p, sp in zip(prompts, params)]
        top = np.zeros((b,), np.int32)
        top[:len(prompts)] = n_top
        samp = self._samp_arrays(params, b, max_tokens, top)
        rows = self.gen.prefill(self.gen.params, tokens, lengths, np.arange(b) < len(prompts), samp,
                                cache_len=self.cache_len, num_top=MAX_TOP_LOGPROBS)
        rows["win_start"] = np.zeros((b,), np.int32)  # a new row's first window starts at its prefill token
        return rows, samp

    def _admit(self, new: list[Request], free: list[int]):
        """Prefills `new` (grouped by length bucket) into the `free` slots."""
        by_bucket: dict[int, list[Request]] = collections.defaultdict(list)
        for r in new:
            by_bucket[kv_cache.bucket(len(r.prompt), self.gen.length_buckets)].append(r)
        for p_len, reqs in by_bucket.items():
            cap = self.prefill_batch(p_len)
            for start in range(0, len(reqs), cap):
                group = reqs[start:start + cap]
                rows, samp = self._prefill([r.prompt for r in group], [r.params for r in group],
                                           [r.top_logprobs for r in group], p_len)
                idx = np.full((samp["seed"].shape[0],), self.slots, np.int32)
                for i, r in enumerate(group):
                    r.slot = free.pop(0)
                    r._first_step = self.steps  # pylint: disable=protected-access
                    idx[i] = r.slot
                    self._active[r.slot] = r
                    for k in self._samp:
                        self._samp[k][r.slot] = samp[k][i]
                self._state = _insert(self._state, rows, idx)
                if self.metrics is not None:
                    self.metrics.prompt_tokens.labels(model=self.model_name).inc(sum(len(r.prompt) for r in group))

    def _warmup(self):
        """Compiles (and runs once) every program serving can need; see the module docstring."""
        t0 = time.perf_counter()
        max_p = min(self.cache_len, self.cfg.max_seq_len)
        lengths = [p for p in self.gen.length_buckets if p <= max_p]
        dummy = SamplingParams(max_tokens=1, temperature=0.0, seed=0)
        n = 0
        for p_len in lengths:
            for b in self.gen.batch_buckets:
                if b > self.prefill_batch(p_len):
                    break
                rows, _ = self._prefill([[0]] * b, [dummy] * b, [0] * b, p_len)
                self._state = _insert(self._state, rows, np.full((b,), self.slots, np.int32))  # all dropped
                n += 1
        for nb in self._decode_buckets():
            self._state, _ = self._step(self.gen.params, self._state, {k: v[:nb] for k, v in self._samp.items()},
                                        np.int32(1))
        self._state["done"] = jnp.logical_or(self._state["done"], np.zeros((self.slots,), bool))  # (_process's op)
        jax.block_until_ready(self._state)
        self.warmup_seconds = time.perf_counter() - t0
        log.info("engine %s: compiled %d prefill programs and %d decode steps in %.1f s", self.model_name, n,
                 len(self._decode_buckets()), self.warmup_seconds)

    def _decode_buckets(self) -> list[int]:
        return list(kv_cache.batch_buckets(self.slots))

    # ------------------------------------------------------------------------------------------ loop
    def _run(self):
        if self.warmup:
            try:  # the scoring forward (echo / logprobs) is called outside the generator's context
                t0 = time.perf_counter()
                for p_len in self.gen.length_buckets:
                    if p_len <= min(self.cache_len, self.cfg.max_seq_len):
                        self.lm.logits(np.zeros((1, p_len), np.int32))
                log.info("engine %s: compiled scoring in %.1f s", self.model_name, time.perf_counter() - t0)
            except Exception:  # pylint: disable=broad-except
                log.exception("engine %s: scoring warm-up failed (it will compile on first use)", self.model_name)
        with self.gen.context():
            first = True
            while True:
                try:
                    self._state, self._samp = self._empty_state()
                    if first and self.warmup:
                        first = False
                        self._warmup()
                    self.ready.set()
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
        pending = None  # (step id, nb, window) of the step in flight, read after the next one is dispatched
        while True:
            with self._cv:
                while not self._active and not self._waiting and pending is None:
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
                self._admit(new, free)  # queued on the device after the step in flight
            self._admitting = []
            self._gauges()
            current = None
            if self._active:
                nb = kv_cache.bucket(max(self._active) + 1, tuple(self._decode_buckets()))
                # Copies: admission edits self._samp in place while this step may still be running (and JAX may
                # alias host numpy buffers on CPU).
                self._state, win = self._step(self.gen.params, self._state,
                                              {k: v[:nb].copy() for k, v in self._samp.items()},
                                              np.int32(self.steps_per_sync))
                current = (self.steps, nb, win)
                self.steps += 1
            if pending is not None:
                self._process(*pending)  # overlaps with the step just dispatched
            pending = current
            if not self.overlap and pending is not None:
                self._process(*pending)
                pending = None

    def _process(self, step: int, nb: int, win: dict):
        """Reads one step's window: new tokens to their requests, finished requests out of their slots."""
        t0 = time.perf_counter()
        host = jax.device_get(win)  # waits for that step (only)
        forced = np.zeros((self.slots,), bool)
        n_new = 0
        out: dict[Any, list] = collections.defaultdict(list)  # event loop -> [(request, event)]
        for slot, r in list(self._active.items()):
            if r._first_step > step or slot >= nb:  # pylint: disable=protected-access
                continue  # inserted after this step was dispatched: its window is another request's
            n_new += int(host["n_gen"][slot] - host["start"][slot])
            ev = self._update(r, host, slot)
            if ev is not None:
                out[r.loop].append((r, ev))
            if r.finish_reason is not None:
                del self._active[slot]
                forced[slot] = not host["done"][slot]
        for loop, pairs in out.items():  # one wake-up per event loop, not one per request
            loop.call_soon_threadsafe(_deliver, pairs)
        if forced.any():  # stop strings / cancellations end rows the device still thinks are live
            self._state["done"] = jnp.logical_or(self._state["done"], forced)
        if self.metrics is not None and n_new > 0:
            self.metrics.generation_tokens.labels(model=self.model_name).inc(n_new)
            self.metrics.tokens_per_second.labels(model=self.model_name).set(
                n_new / max(time.perf_counter() - min(self._t_last, t0), 1e-9))
        self._t_last = time.perf_counter()

    def _gauges(self):
        if self.metrics is not None:
            self.metrics.queue_depth.labels(model=self.model_name).set(len(self._waiting))
            self.metrics.slots_used.labels(model=self.model_name).set(len(self._active))

    # ------------------------------------------------------------------------------------------ host side
    def _detokenize(self, r: Request, final: bool) -> str:
        """New text of r's tokens since the last call (vLLM's incremental detokenisation: decode a short window
        of tokens before and after the read offset and diff, so every step costs O(new tokens), and a character
        split over several byte tokens is held back until complete)."""
        toks = r.tokens
        prefix = self.tokenizer.decode(toks[r._prefix_off:r._read_off])  # pylint: disable=protected-access
        full = self.tokenizer.decode(toks[r._prefix_off:])  # pylint: disable=protected-access
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            r._prefix_off, r._read_off = r._read_off, len(toks)  # pylint: disable=protected-access
            return full[len(prefix):]
        return ""

    def _update(self, r: Request, host: dict, slot: int) -> Event | None:
        """Reads slot's new tokens into r; the event to send (None: nothing new). Sets r.finish_reason when r
        is finished (its slot can then be reused)."""
        if r.cancelled:
            r.finish_reason = "cancelled"
            return Event(finish_reason="cancelled")
        n = int(host["n_gen"][slot])
        k = n - int(host["start"][slot])  # this window's tokens of the row
        r._n_read = n  # pylint: disable=protected-access
        finished = bool(host["done"][slot])
        code = int(host["finish"][slot])
        new_toks = host["tokens"][slot, :k].tolist()
        new_lps = host["logprobs"][slot, :k].tolist()
        m = r.top_logprobs
        new_top = ([list(zip(host["top_ids"][slot, j, :m].tolist(), host["top_logprobs"][slot, j, :m].tolist()))
                    for j in range(k)] if m else [[] for _ in range(k)])
        if finished and code == _STOP_TOKEN and k > 0:  # the stop token is not part of the completion
            new_toks, new_lps, new_top = new_toks[:-1], new_lps[:-1], new_top[:-1]
        prev = len(r.tokens)
        r.tokens += new_toks
        r.logprobs += new_lps
        r.top += new_top
        if r.t_first is None and (n > 0 or finished):
            r.t_first = time.perf_counter()
            if self.metrics is not None:
                self.metrics.ttft.labels(model=self.model_name).observe(r.t_first - r.t_arrival)
        finish = ("stop" if code == _STOP_TOKEN else "length") if finished else None
        old_len = len(r.text)
        if self.tokenizer is not None and (new_toks or finished):
            r.text += self._detokenize(r, final=finished)
        text = r.text
        stops = r.params.stop
        safe = len(text)
        if stops:
            longest = max(len(s) for s in stops)
            from_ = max(0, old_len - longest + 1)  # earlier text was checked: a new match ends in the new text
            hits = [(i, s) for i, s in ((text.find(s, from_), s) for s in stops) if i >= 0]
            if hits:
                cut = min(hits)[0]
                r.text = text = text[:cut]
                safe, finish = cut, "stop"
                # Keep the tokens up to the one that completed the stop string (as the generator does); earlier
                # checks found none in tokens[:prev], so that token is new.
                for j in range(prev + 1, len(r.tokens) + 1):
                    if any(s in self.tokenizer.decode(r.tokens[:j]) for s in stops):
                        r.tokens, r.logprobs, r.top = r.tokens[:j], r.logprobs[:j], r.top[:j]
                        break
            elif finish is None:  # hold back a tail that may be the start of a stop string
                for s in stops:
                    for j in range(min(len(s) - 1, len(text)), 0, -1):
                        if text.endswith(s[:j]):
                            safe = min(safe, len(text) - j)
                            break
        delta = text[len(r.emitted):safe] if safe > len(r.emitted) else ""
        if finish is not None:
            delta = text[len(r.emitted):]
            r.finish_reason = finish
            if self.metrics is not None:
                self.metrics.e2e.labels(model=self.model_name).observe(time.perf_counter() - r.t_arrival)
        ev_toks = r.tokens[prev:]
        if delta or ev_toks or finish is not None:
            r.emitted += delta
            return Event(text=delta, tokens=ev_toks, logprobs=r.logprobs[prev:], top=r.top[prev:],
                         finish_reason=finish)
        return None
