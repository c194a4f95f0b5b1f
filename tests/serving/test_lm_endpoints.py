"""Chat and completions through the real openai client against a real uvicorn server (see conftest.py)."""
import json
import urllib.request

import numpy as np
import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving_common import API_KEY, IMAGE_NAME, LM_NAME  # noqa: E402  pylint: disable=wrong-import-position

MSGS = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "def add(x, y):"}]


def _strict(cls, obj):
    """Validates a response dict with the SDK's model, strictly (no coercion)."""
    return cls.model_validate(obj.model_dump(mode="json", exclude_unset=True) if hasattr(obj, "model_dump")
                              else obj, strict=True)


def _post(server, path, body, key=API_KEY):
    req = urllib.request.Request(server.base_url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.status, json.loads(r.read())


def test_models(client):
    models = client.models.list()
    assert {m.id for m in models.data} == {LM_NAME, IMAGE_NAME}
    for m in models.data:
        _strict(Model, m)


def test_chat_plain(client, lm):
    r = client.chat.completions.create(model=LM_NAME, messages=MSGS, max_tokens=6, temperature=0.0)
    _strict(ChatCompletion, r)
    c = r.choices[0]
    assert c.message.role == "assistant" and c.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(lm.tokenizer.encode(
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\ndef add(x, y):<|im_end|>\n"
        "<|im_start|>assistant\n"))
    assert r.usage.completion_tokens <= 6
    # Greedy through the server equals greedy through lm.generate (same engine numerics).
    prompt = lm.tokenizer.encode("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n"
                                 "def add(x, y):<|im_end|>\n<|im_start|>assistant\n")
    [want] = lm.generate([prompt], max_tokens=6, temperature=0.0)
    assert c.message.content == want


def test_chat_max_completion_tokens_and_n(client):
    r = client.chat.completions.create(model=LM_NAME, messages=MSGS, max_completion_tokens=5, n=3, seed=7,
                                       temperature=1.0)
    _strict(ChatCompletion, r)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert 3 <= r.usage.completion_tokens <= 15  # 3 choices of 1..5 tokens each
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    assert len({c.message.content for c in r.choices}) > 1  # choices use different seeds


def test_chat_seed_reproducible_whatever_the_batch(client):
    import concurrent.futures as cf
    kw = dict(model=LM_NAME, messages=MSGS, max_tokens=8, seed=1234, temperature=1.0, top_p=0.9,
              extra_body={"top_k": 50})
    alone = client.chat.completions.create(**kw).choices[0].message.content
    with cf.ThreadPoolExecutor(4) as ex:  # the same request next to unrelated ones
        futs = [ex.submit(client.chat.completions.create, model=LM_NAME, messages=[{"role": "user", "content": f"x{i}"}],
                          max_tokens=8, temperature=1.0) for i in range(3)]
        again = ex.submit(client.chat.completions.create, **kw)
        [f.result() for f in futs]
    assert again.result().choices[0].message.content == alone


def test_chat_stop(client, lm):
    base = client.chat.completions.create(model=LM_NAME, messages=MSGS, max_tokens=12, temperature=0.0)
    text = base.choices[0].message.content
    assert len(text) >= 4
    stop = text[2:4]
    r = client.chat.completions.create(model=LM_NAME, messages=MSGS, max_tokens=12, temperature=0.0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text[:text.find(stop)]


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_stream(client, include_usage):
    kw = dict(model=LM_NAME, messages=MSGS, max_tokens=8, temperature=0.0)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = list(client.chat.completions.create(stream=True, **kw, **extra))
    for ch in chunks:
        _strict(ChatCompletionChunk, ch)
    assert chunks[0].choices[0].delta.role == "assistant"
    usage_chunks = [c for c in chunks if c.usage is not None]
    if include_usage:
        assert len(usage_chunks) == 1 and chunks[-1].usage is not None and chunks[-1].choices == []
        assert chunks[-1].usage.completion_tokens >= 1
        body = chunks[:-1]
    else:
        assert not usage_chunks
        body = chunks
    assert body[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in body) == whole


def test_chat_logprobs(client, lm):
    r = client.chat.completions.create(model=LM_NAME, messages=MSGS, max_tokens=4, temperature=0.0,
                                       logprobs=True, top_logprobs=3)
    _strict(ChatCompletion, r)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob >= item.top_logprobs[-1].logprob
        assert abs(item.logprob - item.top_logprobs[0].logprob) < 1e-4  # greedy: the chosen token is the best


def test_chat_stream_top_logprobs(client, lm):
    """logprobs + top_logprobs on streamed chunks: every token once, with its k best alternatives (the engine's
    on-device top-k), equal to the non-streamed answer and to the model's own log-softmax."""
    kw = dict(model=LM_NAME, messages=MSGS, max_tokens=6, temperature=0.0, logprobs=True, top_logprobs=3)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    for ch in chunks:
        _strict(ChatCompletionChunk, ch)
    streamed = [x for ch in chunks if ch.choices and ch.choices[0].logprobs for x in ch.choices[0].logprobs.content]
    want = whole.choices[0].logprobs.content
    assert len(streamed) == len(want) == chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == whole.choices[0].message.content
    prompt = lm.tokenizer.encode("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n"
                                 "def add(x, y):<|im_end|>\n<|im_start|>assistant\n")
    [ids] = lm.generate([prompt], max_tokens=6, temperature=0.0, return_tokens=True)  # the same greedy tokens
    ref = _log_softmax(lm.logits(np.array([prompt + ids]))[0, len(prompt) - 1:])  # [tokens, V]
    for j, (a, b) in enumerate(zip(streamed, want)):
        assert a.token == b.token and abs(a.logprob - b.logprob) < 1e-6
        assert [t.token for t in a.top_logprobs] == [t.token for t in b.top_logprobs] and len(a.top_logprobs) == 3
        assert abs(a.logprob - a.top_logprobs[0].logprob) < 1e-6  # greedy: the chosen token is the best
        best = np.sort(ref[j, :lm.tokenizer.vocab_size])[::-1][:3]
        np.testing.assert_allclose([t.logprob for t in a.top_logprobs], best, atol=1e-4)


def _log_softmax(x):
    x = x.astype(np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


def test_completions_echo_logprobs_match_logits(client, lm):
    """What lm-evaluation-harness' local-completions sends for loglikelihood: echo, logprobs=1, max_tokens=0."""
    prompts = ["def add(x, y):\n    return", "The quick brown fox"]
    r = client.completions.create(model=LM_NAME, prompt=prompts, max_tokens=0, echo=True, logprobs=1,
                                  temperature=0.0)
    assert [c.index for c in r.choices] == [0, 1]
    for p, c in zip(prompts, r.choices):
        ids = lm.tokenizer.encode(p)
        want = _log_softmax(lm.logits(np.array([ids]))[0])  # [T, V]
        lp = c.logprobs
        assert c.text == p
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert len(lp.token_logprobs) == len(ids) == len(lp.tokens)
        np.testing.assert_allclose(lp.token_logprobs[1:], [want[t - 1, ids[t]] for t in range(1, len(ids))],
                                   rtol=1e-4, atol=1e-4)
        for t in range(1, len(ids)):
            [(tok, v)] = lp.top_logprobs[t].items()
            assert tok == lm.tokenizer.decode([int(np.argmax(want[t - 1, :lm.tokenizer.vocab_size]))])
            assert abs(v - want[t - 1].max()) < 1e-4
    # The whole response validates against the SDK's schema once the null first logprob is set aside.
    d = r.model_dump(mode="json", exclude_unset=True)
    for c in d["choices"]:
        c["logprobs"]["token_logprobs"][0] = 0.0
        c["logprobs"]["top_logprobs"][0] = {}
    Completion.model_validate(d, strict=True)


def test_completions_token_ids_and_default_max_tokens(client, lm):
    ids = lm.tokenizer.encode("for i in range(3):")
    r = client.completions.create(model=LM_NAME, prompt=ids, temperature=0.0)
    Completion.model_validate(r.model_dump(mode="json", exclude_unset=True), strict=True)
    c = r.choices[0]
    assert c.finish_reason == "stop" or r.usage.completion_tokens == 16  # max_tokens default 16
    assert r.usage.prompt_tokens == len(ids)
    r2 = client.completions.create(model=LM_NAME, prompt=[ids, ids[:3]], max_tokens=3, temperature=0.0, n=2)
    assert [c.index for c in r2.choices] == [0, 1, 2, 3]
    assert r2.choices[0].text == r2.choices[1].text  # greedy
    r3 = client.completions.create(model=LM_NAME, prompt="for i in range(3):", temperature=0.0)
    assert r3.choices[0].text == c.text  # text and token-id prompts agree


def test_completions_echo_with_generation(client, lm):
    r = client.completions.create(model=LM_NAME, prompt="Hello, world", max_tokens=3, echo=True, logprobs=2,
                                  temperature=0.0)
    c = r.choices[0]
    n_prompt = len(lm.tokenizer.encode("Hello, world"))
    assert c.text.startswith("Hello, world")
    assert len(c.logprobs.tokens) == n_prompt + r.usage.completion_tokens
    assert all(len(t) <= 2 for t in c.logprobs.top_logprobs[1:])


def test_tokenizer_endpoints(server, lm):
    status, tok = _post(server, "/tokenize", {"model": LM_NAME, "prompt": "Hello, world"})
    assert status == 200 and tok["tokens"] == lm.tokenizer.encode("Hello, world")
    status, det = _post(server, "/detokenize", {"model": LM_NAME, "tokens": tok["tokens"]})
    assert det["prompt"] == "Hello, world"
    status, info = _post(server, "/tokenizer_info", {"model": LM_NAME})
    assert info["max_model_len"] == 64 and info["chat_format"] == "template"
    status, chat = _post(server, "/tokenize", {"model": LM_NAME, "messages": MSGS})
    assert chat["count"] > tok["count"]


def test_health_and_metrics(server, client):
    with urllib.request.urlopen(server.base_url + "/health") as r:
        assert json.loads(r.read())["status"] == "ok"
    client.chat.completions.create(model=LM_NAME, messages=MSGS, max_tokens=2)
    req = urllib.request.Request(server.base_url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req) as r:
        text = r.read().decode()
    for name in ("mosaicjax_requests_total", "mosaicjax_time_to_first_token_seconds_bucket",
                 "mosaicjax_generation_tokens_per_second", "mosaicjax_queue_depth", "mosaicjax_slots_used",
                 "mosaicjax_generation_tokens_total"):
        assert name in text, name
