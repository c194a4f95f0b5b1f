"""Chat completions, completions and tokenizer endpoints for one LanguageModel, on top of the Engine.

Responses are built from the openai.types classes (the SDK's own schema) and dumped with exclude_unset.
Logprobs: the chosen tokens' logprobs and chat's top_logprobs (streamed or not) come from the engine (the raw
model distribution of each decode step, top-k taken on the device); completions' top logprobs and the prompt's
logprobs (echo) come from one scoring forward over prompt + completion (lm.logits on a right-padded length
bucket: causal attention makes the padding invisible to the real positions).
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from openai.types import Completion, CompletionChoice, CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat import chat_completion as cc
from openai.types.chat import chat_completion_chunk as ccc
from openai.types.chat.chat_completion_token_logprob import ChatCompletionTokenLogprob, TopLogprob
from openai.types.completion_choice import Logprobs

from mosaicjax import chat as chat_lib
from mosaicjax.generation import SamplingParams
from mosaicjax.generation import kv_cache
from mosaicjax.serving import engine as engine_lib
from mosaicjax.serving import protocol
from mosaicjax.serving.errors import APIError, bad_request, error_body

_POLL_S = 0.25  # how often a non-streaming handler checks that its client is still connected
_MARK = "\u0000mosaicjax-content\u0000"  # placeholder spliced out of rendered stream chunks


def _dump(obj) -> dict:
    return obj.model_dump(mode="json", exclude_unset=True)


def _sse(payload) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class LMService:
    """Serves one model name; `engine` does the generation."""

    def __init__(self, name: str, lm, engine: engine_lib.Engine, metrics=None):
        self.name, self.lm, self.engine, self.metrics = name, lm, engine, metrics
        self.tokenizer = lm.tokenizer
        self.max_len = min(lm.config.max_seq_len, engine.cache_len)
        self.chat_format = chat_lib.ChatFormat(lm.tokenizer, lm.chat_template) if lm.tokenizer is not None else None
        self.vocab = getattr(lm.tokenizer, "vocab_size", None) or lm.config.vocab_size
        self.vocab = min(self.vocab, lm.config.vocab_size)

    # -------------------------------------------------------------------------------------- helpers
    def _need_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise bad_request(f"model {self.name!r} has no tokenizer: {what} needs one; send token ids")

    def _check_ids(self, ids: list[int], param: str):
        if ids and (min(ids) < 0 or max(ids) >= self.vocab):
            raise bad_request(f"token ids must be in [0, {self.vocab})", param=param)

    def _check_length(self, n_prompt: int, max_tokens: int, param: str):
        if n_prompt + max_tokens > self.max_len or n_prompt >= self.max_len:
            raise APIError(400, f"This model's maximum context length is {self.max_len} tokens. However, you "
                                f"requested {n_prompt + max_tokens} tokens ({n_prompt} in the prompt, "
                                f"{max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                           param=param, code="context_length_exceeded")

    def _params(self, req, max_tokens: int, i: int, extra_stops=()) -> SamplingParams:
        seed = None if req.seed is None else (req.seed + i) % 2**32  # n choices differ, each reproducible
        # top_k >= vocab keeps every token: the same as off (and keeps huge values out of int32 arrays).
        top_k = req.top_k if req.top_k and 0 < req.top_k < self.vocab else None
        # ignore_eos (vLLM's extra, for benchmarks): only max_tokens and stop strings end the completion.
        stop_ids = () if req.ignore_eos else tuple(self.lm.default_stop_token_ids)
        return SamplingParams(max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                              top_p=1.0 if req.top_p is None else req.top_p, top_k=top_k, seed=seed,
                              stop=tuple(req.stop or ()) + tuple(extra_stops), stop_token_ids=stop_ids)

    def _submit(self, prompts_params, top_logprobs: int = 0) -> list[engine_lib.Request]:
        loop = asyncio.get_running_loop()
        reqs = []
        try:
            for prompt, params in prompts_params:
                reqs.append(self.engine.submit(prompt, params, loop, top_logprobs))
        except engine_lib.ShuttingDown as e:
            for r in reqs:
                r.cancel()
            raise APIError(503, f"server is shutting down: {e}", code="shutting_down") from e
        except engine_lib.QueueFull as e:
            for r in reqs:
                r.cancel()
            raise APIError(429, f"server busy: {e}; retry later", code="queue_full",
                           headers={"Retry-After": "1"}) from e
        except ValueError as e:  # settings the engine cannot represent
            for r in reqs:
                r.cancel()
            raise bad_request(str(e)) from e
        return reqs

    async def _collect(self, reqs, http: Request) -> list[engine_lib.Request]:
        """Waits for every request's final event; cancels them all if the client disconnects."""
        async def drain(r):
            while True:
                ev = await r.queue.get()
                if ev.finish_reason is not None:
                    if ev.error:
                        raise RuntimeError(ev.error)
                    return r
        tasks = [asyncio.ensure_future(drain(r)) for r in reqs]
        try:
            while True:
                done, _ = await asyncio.wait(tasks, timeout=_POLL_S)
                if len(done) == len(tasks):
                    return [t.result() for t in tasks]
                if await http.is_disconnected():
                    raise asyncio.CancelledError
        finally:
            for t in tasks:
                t.cancel()
            for r in reqs:
                if r.finish_reason is None:
                    r.cancel()

    def _score(self, seqs: list[list[int]]) -> list[np.ndarray]:
        """log_softmax of the model's logits for each sequence: float32 [len, vocab] each (blocking)."""
        out = []
        for s in seqs:
            t = kv_cache.bucket(len(s), self.lm.generator.length_buckets)
            toks = np.zeros((1, t), np.int32)  # [1, bucket] right-padded; causal: padding changes nothing
            toks[0, :len(s)] = s
            logits = self.lm.logits(toks)[0, :len(s)].astype(np.float64)  # [len, vocab]
            m = logits.max(-1, keepdims=True)
            lse = m + np.log(np.exp(logits - m).sum(-1, keepdims=True))
            out.append((logits - lse).astype(np.float32))
        return out

    def _tok_str(self, t: int) -> str:
        return self.tokenizer.decode([int(t)]) if self.tokenizer is not None else f"token_id:{t}"

    def _top(self, lp_row: np.ndarray, k: int) -> list[tuple[int, float]]:
        lp_row = lp_row[:self.vocab]
        idx = np.argsort(-lp_row, kind="stable")[:k]
        return [(int(i), float(lp_row[i])) for i in idx]

    # -------------------------------------------------------------------------------------- chat
    async def chat(self, req: protocol.ChatCompletionRequest, http: Request):
        self._need_tokenizer("chat")
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        try:
            prompt = self.chat_format.encode(messages)
        except Exception as e:  # a template's raise_exception, bad roles ...
            raise bad_request(f"messages could not be formatted: {e}", param="messages") from e
        if not prompt:
            raise bad_request("messages render to an empty prompt", param="messages")
        self._check_ids(prompt, "messages")
        requested = req.max_completion_tokens or req.max_tokens
        max_tokens = requested if requested is not None else self.max_len - len(prompt)
        self._check_length(len(prompt), max(max_tokens, 1),
                           "max_completion_tokens" if req.max_completion_tokens else "messages")
        if req.top_logprobs and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", param="top_logprobs")
        stops = self.chat_format.stop_strings
        n_top = (req.top_logprobs or 0) if req.logprobs else 0
        reqs = self._submit([(prompt, self._params(req, max_tokens, i, stops)) for i in range(req.n)], n_top)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._chat_stream(reqs, rid, created, len(prompt), include_usage, req),
                                     media_type="text/event-stream")
        reqs = await self._collect(reqs, http)
        choices = []
        for i, r in enumerate(reqs):
            logprobs = None
            if req.logprobs:
                logprobs = cc.ChoiceLogprobs(content=self._chat_logprobs(r.tokens, r.logprobs, r.top))
            choices.append(cc.Choice(index=i, message=ChatCompletionMessage(role="assistant", content=r.emitted),
                                     finish_reason=r.finish_reason, logprobs=logprobs))
        n_gen = sum(len(r.tokens) for r in reqs)
        resp = ChatCompletion(id=rid, object="chat.completion", created=created, model=self.name, choices=choices,
                              usage=CompletionUsage(prompt_tokens=len(prompt), completion_tokens=n_gen,
                                                    total_tokens=len(prompt) + n_gen))
        return JSONResponse(_dump(resp))

    def _chat_logprobs(self, tokens, lps, tops) -> list[ChatCompletionTokenLogprob]:
        """tokens, their logprobs and, per token, [(id, logprob)] of its step's most likely tokens (the engine's)."""
        out = []
        for t, lp, top in zip(tokens, lps, tops):
            s = self._tok_str(t)
            top = [TopLogprob(token=self._tok_str(i), logprob=v, bytes=list(self._tok_str(i).encode()))
                   for i, v in top]
            out.append(ChatCompletionTokenLogprob(token=s, logprob=lp, bytes=list(s.encode()), top_logprobs=top))
        return out

    async def _chat_stream(self, reqs, rid, created, n_prompt, include_usage, req) -> AsyncIterator[str]:
        def chunk(choices, usage=None):
            kw = {"usage": usage} if usage is not None else {}
            return _sse(_dump(ChatCompletionChunk(id=rid, object="chat.completion.chunk", created=created,
                                                  model=self.name, choices=choices, **kw)))
        templates = {}

        def content_chunk(i, text):
            # The hot path (one chunk per token per stream): the SDK class renders a chunk once per choice with a
            # marker as its content, and every later chunk is that JSON with the text spliced in -- the same bytes
            # as rendering each one through the class, at a fraction of the cost.
            if i not in templates:
                marked = chunk([ccc.Choice(index=i, delta=ccc.ChoiceDelta(content=_MARK), finish_reason=None)])
                templates[i] = marked.split(json.dumps(_MARK), 1)
            pre, post = templates[i]
            return pre + json.dumps(text) + post

        try:
            for i in range(len(reqs)):
                yield chunk([ccc.Choice(index=i, delta=ccc.ChoiceDelta(role="assistant", content=""),
                                        finish_reason=None)])
            single = len(reqs) == 1
            queue: asyncio.Queue = reqs[0].queue if single else asyncio.Queue()

            async def pump(i, r):
                while True:
                    ev = await r.queue.get()
                    await queue.put((i, ev))
                    if ev.finish_reason is not None:
                        return
            pumps = [] if single else [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(reqs)]
            try:
                remaining = len(reqs)
                while remaining:
                    items = [await queue.get()]
                    while not queue.empty():  # everything already delivered goes out in one write
                        items.append(queue.get_nowait())
                    parts = []
                    for i, ev in ((0, x) for x in items) if single else items:
                        if ev.error:
                            raise RuntimeError(ev.error)
                        if req.logprobs and ev.tokens:
                            logprobs = ccc.ChoiceLogprobs(content=self._chat_logprobs(ev.tokens, ev.logprobs,
                                                                                      ev.top))
                            parts.append(chunk([ccc.Choice(index=i, delta=ccc.ChoiceDelta(content=ev.text),
                                                           finish_reason=None, logprobs=logprobs)]))
                        elif ev.text:
                            parts.append(content_chunk(i, ev.text))
                        if ev.finish_reason is not None:
                            remaining -= 1
                            parts.append(chunk([ccc.Choice(index=i, delta=ccc.ChoiceDelta(),
                                                           finish_reason=ev.finish_reason)]))
                    if parts:
                        yield "".join(parts)
            finally:
                for p in pumps:
                    p.cancel()
            if include_usage:
                n_gen = sum(len(r.tokens) for r in reqs)
                yield chunk([], CompletionUsage(prompt_tokens=n_prompt, completion_tokens=n_gen,
                                                total_tokens=n_prompt + n_gen))
            yield "data: [DONE]\n\n"
        except Exception as e:  # pylint: disable=broad-except
            # Headers (200) are gone: the error travels as an event, as OpenAI's and vLLM's servers do.
            if self.metrics is not None:
                self.metrics.errors.labels(status="500").inc()
            yield _sse(error_body(500, f"generation failed: {e}"))
            yield "data: [DONE]\n\n"
        finally:  # client disconnect closes this generator: free the slots
            for r in reqs:
                if r.finish_reason is None:
                    r.cancel()

    # -------------------------------------------------------------------------------------- completions
    def _encode_prompt(self, p, i: int) -> list[int]:
        if isinstance(p, str):
            self._need_tokenizer("text prompts")
            ids = self.tokenizer.encode(p)
            if not ids:
                specials = (getattr(self.tokenizer, "eos_id", -1), getattr(self.tokenizer, "bos_id", -1))
                ids = [s for s in specials if s is not None and s >= 0][:1]
            if not ids:
                raise bad_request(f"prompt {i} is empty", param="prompt")
            return ids
        if not p:
            raise bad_request(f"prompt {i} is an empty token list", param="prompt")
        ids = [int(t) for t in p]
        self._check_ids(ids, "prompt")
        return ids

    async def completions(self, req: protocol.CompletionRequest, http: Request):
        prompts = [self._encode_prompt(p, i) for i, p in enumerate(req.prompts())]
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        for p in prompts:
            self._check_length(len(p), max_tokens, "max_tokens")
        if req.suffix:
            raise bad_request("suffix is not supported", param="suffix")
        n = req.n
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            if max_tokens == 0 or req.echo or req.logprobs is not None:
                raise bad_request("stream=true supports plain generation only (no echo / logprobs / max_tokens=0)",
                                  param="stream")
            reqs = self._submit([(p, self._params(req, max_tokens, j)) for p in prompts for j in range(n)])
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._completion_stream(reqs, rid, created, sum(map(len, prompts)) * 1,
                                                             include_usage), media_type="text/event-stream")
        gen = []
        if max_tokens > 0:
            reqs = self._submit([(p, self._params(req, max_tokens, j)) for p in prompts for j in range(n)])
            gen = await self._collect(reqs, http)
        k = req.logprobs
        scores = None
        if k is not None:
            seqs = [prompts[c // n] + (gen[c].tokens if gen else []) for c in range(len(prompts) * n)]
            scores = await asyncio.to_thread(self._score, seqs)
        choices = []
        n_gen = 0
        for c in range(len(prompts) * n):
            p = prompts[c // n]
            raw = req.prompts()[c // n]
            prompt_text = raw if isinstance(raw, str) else (self.tokenizer.decode(p) if self.tokenizer else "")
            toks = gen[c].tokens if gen else []
            text = gen[c].emitted if gen else ""
            finish = gen[c].finish_reason if gen else "length"
            n_gen += len(toks)
            logprobs = None
            if k is not None:
                logprobs = self._completion_logprobs(p, toks, scores[c], k, req.echo,
                                                     0 if req.echo else len(prompt_text))
            choices.append(CompletionChoice.model_construct(
                index=c, text=(prompt_text + text) if req.echo else text, finish_reason=finish, logprobs=logprobs))
        n_prompt = sum(map(len, prompts))
        resp = Completion.model_construct(id=rid, object="text_completion", created=created, model=self.name,
                                          choices=choices, usage=CompletionUsage(
                                              prompt_tokens=n_prompt, completion_tokens=n_gen,
                                              total_tokens=n_prompt + n_gen))
        return JSONResponse(resp.model_dump(mode="json", exclude_unset=True, warnings=False))

    def _completion_logprobs(self, prompt, toks, scores, k, echo, offset0) -> Logprobs:
        """OpenAI legacy logprobs: per token its string, logprob (None for the first prompt token), top-k dict."""
        seq = prompt + toks
        start = 0 if echo else len(prompt)
        tokens, lps, tops, offsets = [], [], [], []
        off = offset0
        for j in range(start, len(seq)):
            s = self._tok_str(seq[j])
            tokens.append(s)
            offsets.append(off)
            off += len(s)
            if j == 0:
                lps.append(None)
                tops.append(None)
                continue
            row = scores[j - 1]  # [vocab] distribution of token j
            lps.append(float(row[seq[j]]))
            top = {}
            for i, v in self._top(row, max(k, 0)):
                top.setdefault(self._tok_str(i), v)
            tops.append(top)
        return Logprobs.model_construct(tokens=tokens, token_logprobs=lps, top_logprobs=tops, text_offset=offsets)

    async def _completion_stream(self, reqs, rid, created, n_prompt, include_usage) -> AsyncIterator[str]:
        def chunk(choices, usage=None):
            kw = {"usage": usage} if usage is not None else {}
            return _sse(_dump(Completion(id=rid, object="text_completion", created=created, model=self.name,
                                         choices=choices, **kw)))
        try:
            for i, r in enumerate(reqs):
                while True:
                    ev = await r.queue.get()
                    if ev.error:
                        raise RuntimeError(ev.error)
                    if ev.text or ev.finish_reason is not None:
                        yield chunk([CompletionChoice(index=i, text=ev.text, finish_reason=ev.finish_reason
                                                      if ev.finish_reason in ("stop", "length") else None)])
                    if ev.finish_reason is not None:
                        break
            if include_usage:
                n_gen = sum(len(r.tokens) for r in reqs)
                yield chunk([], CompletionUsage(prompt_tokens=n_prompt, completion_tokens=n_gen,
                                                total_tokens=n_prompt + n_gen))
            yield "data: [DONE]\n\n"
        except Exception as e:  # pylint: disable=broad-except
            yield _sse(error_body(500, f"generation failed: {e}"))
            yield "data: [DONE]\n\n"
        finally:
            for r in reqs:
                if r.finish_reason is None:
                    r.cancel()

    # -------------------------------------------------------------------------------------- tokenizer
    def tokenize(self, req: protocol.TokenizeRequest) -> dict:
        self._need_tokenizer("tokenize")
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of prompt or messages", param="prompt")
        if req.messages is not None:
            try:
                ids = self.chat_format.encode([m.model_dump(exclude_none=True) for m in req.messages],
                                              req.add_generation_prompt)
            except Exception as e:  # pylint: disable=broad-except
                raise bad_request(f"messages could not be formatted: {e}", param="messages") from e
        else:
            ids = self.tokenizer.encode(req.prompt)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.max_len}

    def detokenize(self, req: protocol.DetokenizeRequest) -> dict:
        self._need_tokenizer("detokenize")
        self._check_ids(req.tokens, "tokens")
        return {"prompt": self.tokenizer.decode(req.tokens)}

    def tokenizer_info(self) -> dict:
        tok = self.tokenizer
        fmt = self.chat_format
        return {"model": self.name, "tokenizer_class": type(tok).__name__ if tok is not None else None,
                "vocab_size": self.vocab, "max_model_len": self.max_len,
                "bos_token_id": getattr(tok, "bos_id", None), "eos_token_id": getattr(tok, "eos_id", None),
                "pad_token_id": getattr(tok, "pad_id", None),
                "stop_token_ids": list(self.lm.default_stop_token_ids),
                "chat_format": fmt.style if fmt is not None else None,
                "chat_template": self.lm.chat_template}
