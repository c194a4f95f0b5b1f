"""Every client mistake is a 4xx in OpenAI's envelope: 401, 404, 400 (naming the field), 413, 429."""
import asyncio
import json
import os
import sys
import urllib.error
import urllib.request

import openai
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving_common import API_KEY, IMAGE_NAME, LM_NAME  # noqa: E402  pylint: disable=wrong-import-position

MSGS = [{"role": "user", "content": "hi"}]


def raw(server, path, body: bytes, key=API_KEY, ctype="application/json"):
    headers = {"Content-Type": ctype}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(server.base_url + path, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null"), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null"), dict(e.headers)


def _envelope(body):
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]


def test_401(server):
    bad = openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    _envelope(e.value.body if "error" in e.value.body else {"error": e.value.body})
    status, body, _ = raw(server, "/v1/chat/completions", json.dumps({"model": LM_NAME, "messages": MSGS}).encode(),
                          key=None)
    assert status == 401
    _envelope(body)


def test_404_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=MSGS)
    assert e.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("body,param", [
    ({"model": LM_NAME, "messages": MSGS, "temperature": "hot"}, "temperature"),
    ({"model": LM_NAME, "messages": MSGS, "temperature": 3.0}, "temperature"),
    ({"model": LM_NAME, "messages": MSGS, "n": 0}, "n"),
    ({"model": LM_NAME, "messages": []}, "messages"),
    ({"model": LM_NAME, "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"model": LM_NAME, "messages": MSGS, "max_tokens": 1000}, "messages"),  # context length
    ({"model": LM_NAME, "messages": MSGS, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": MSGS}, "model"),
])
def test_400_chat(server, body, param):
    status, resp, _ = raw(server, "/v1/chat/completions", json.dumps(body).encode())
    assert status == 400, resp
    _envelope(resp)
    assert resp["error"]["param"] == param


def test_400_misc(server):
    status, resp, _ = raw(server, "/v1/chat/completions", b"{not json")
    assert status == 400
    _envelope(resp)
    status, resp, _ = raw(server, "/v1/completions", json.dumps({"model": LM_NAME, "prompt": [99999]}).encode())
    assert status == 400 and resp["error"]["param"] == "prompt"
    status, resp, _ = raw(server, "/v1/completions", json.dumps({"model": LM_NAME, "prompt": "x" * 300,
                                                                 "max_tokens": 16}).encode())
    assert status == 400 and resp["error"]["code"] == "context_length_exceeded" and "64" in resp["error"]["message"]
    status, resp, _ = raw(server, "/v1/images/generations", json.dumps({"model": LM_NAME, "prompt": "x"}).encode())
    assert status == 400


def test_413(server, client):
    big = json.dumps({"model": LM_NAME, "messages": [{"role": "user", "content": "x" * (100 << 10)}]}).encode()
    status, resp, _ = raw(server, "/v1/chat/completions", big)
    assert status == 413
    _envelope(resp)
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=LM_NAME, prompt="y" * (100 << 10))
    assert e.value.status_code == 413


def test_429_queue_full(lm):
    """A server with one slot and one waiting place: a burst gets 429 with Retry-After, the rest complete."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from conftest import ServerThread  # pylint: disable=import-outside-toplevel
    from mosaicjax.serving import create_app  # pylint: disable=import-outside-toplevel
    srv = ServerThread(create_app({LM_NAME: lm}, slots=1, queue_size=1))
    try:
        client = openai.AsyncOpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0, timeout=120)

        async def one():
            try:
                r = await client.chat.completions.with_raw_response.create(model=LM_NAME, messages=MSGS,
                                                                           max_tokens=40, temperature=0.0)
                return 200, None
            except openai.RateLimitError as e:
                return 429, e.response.headers.get("retry-after")

        async def burst():
            return await asyncio.gather(*[one() for _ in range(8)])
        results = asyncio.run(burst())
        codes = [c for c, _ in results]
        assert 429 in codes and 200 in codes, codes
        assert all(h == "1" for c, h in results if c == 429)
    finally:
        srv.stop()


def test_huge_top_k_is_not_a_server_fault(client):
    """top_k past int32 (found by the fuzz: it once crashed the engine thread) means 'off', like top_k >= vocab."""
    for top_k in (2**40, 10**20):
        r = client.completions.create(model=LM_NAME, prompt="hi", max_tokens=2, temperature=0.0,
                                      extra_body={"top_k": top_k})
        want = client.completions.create(model=LM_NAME, prompt="hi", max_tokens=2, temperature=0.0)
        assert r.choices[0].text == want.choices[0].text


def test_engine_failure_answers_requests_and_recovers(lm):
    """An exception in the engine thread fails the requests it holds (none hangs) and the engine keeps serving."""
    from mosaicjax.generation import SamplingParams  # pylint: disable=import-outside-toplevel
    from mosaicjax.serving.engine import Engine  # pylint: disable=import-outside-toplevel
    eng = Engine(lm, slots=4, queue_size=8)  # the main server's shapes: nothing new compiles
    real, calls = eng._admit, []  # pylint: disable=protected-access

    def flaky(new, free):
        calls.append(len(new))
        if len(calls) == 1:
            raise RuntimeError("injected failure")
        return real(new, free)
    eng._admit = flaky  # pylint: disable=protected-access

    async def final(r):
        while True:
            ev = await asyncio.wait_for(r.queue.get(), 60)
            if ev.finish_reason is not None:
                return ev

    async def main():
        loop = asyncio.get_running_loop()
        sp = SamplingParams(max_tokens=2, temperature=0.0, seed=0)
        ev = await final(eng.submit([1, 2, 3], sp, loop))  # taken off the queue, failed while being admitted
        assert ev.finish_reason == "error" and "injected failure" in ev.error
        ev = await final(eng.submit([1, 2, 3], sp, loop))
        assert ev.finish_reason in ("stop", "length") and ev.error is None
    try:
        asyncio.run(main())
    finally:
        eng.shutdown()
