"""64 concurrent streaming clients all complete; 1,000+ malformed requests never get a 5xx."""
import asyncio
import http.client
import json
import os
import sys

import openai
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving_common import API_KEY, IMAGE_NAME, LM_NAME  # noqa: E402  pylint: disable=wrong-import-position


def test_64_concurrent_streams(server):
    client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)

    async def one(i):
        stream = await client.chat.completions.create(
            model=LM_NAME, messages=[{"role": "user", "content": f"request {i}"}], max_tokens=4 + i % 5,
            temperature=1.0, seed=i, stream=True, stream_options={"include_usage": True})
        text, finish, usage = "", None, None
        async for ch in stream:
            if ch.choices:
                text += ch.choices[0].delta.content or ""
                finish = ch.choices[0].finish_reason or finish
            if ch.usage:
                usage = ch.usage
        return finish, usage

    async def main():
        return await asyncio.gather(*[one(i) for i in range(64)])
    results = asyncio.run(main())
    assert len(results) == 64
    assert all(f in ("stop", "length") and u is not None and u.completion_tokens >= 1 for f, u in results)


# ---------------------------------------------------------------------------------------------------- fuzz
_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                     | st.text(max_size=20),
                     lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                     max_leaves=12)
_BASES = {
    "/v1/chat/completions": {"model": LM_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    "/v1/completions": {"model": LM_NAME, "prompt": "hi", "max_tokens": 1},
    "/v1/images/generations": {"model": IMAGE_NAME, "prompt": "a fox", "size": "32x32", "num_inference_steps": 1},
    "/tokenize": {"model": LM_NAME, "prompt": "hi"},
    "/detokenize": {"model": LM_NAME, "tokens": [1, 2]},
    "/tokenizer_info": {"model": LM_NAME},
}
_FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
           "n", "stop", "seed", "stream", "stream_options", "logprobs", "top_logprobs", "echo", "size",
           "negative_prompt", "num_inference_steps", "guidance_scale", "scheduler", "response_format", "tokens",
           "messages", "suffix", "best_of"]
# Values that are wrong for the field they replace (images: never a valid size, so no new compile runs).
_BAD = st.one_of(st.text(max_size=10), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3),
                 st.integers(), max_size=2), st.integers(-10**20, -1), st.integers(10**6, 10**20),
                 st.floats(allow_nan=False) .filter(lambda x: abs(x) > 100), st.none(), st.booleans())


@st.composite
def malformed(draw):
    path = draw(st.sampled_from(sorted(_BASES)))
    kind = draw(st.integers(0, 3))
    if kind == 0:  # arbitrary JSON
        body = json.dumps(draw(_JSON)).encode()
    elif kind == 1:  # arbitrary bytes
        body = draw(st.binary(max_size=64))
    else:  # a good request with one or two fields broken
        obj = dict(_BASES[path])
        for _ in range(kind):
            obj[draw(st.sampled_from(_FIELDS))] = draw(_BAD)
        if path == "/v1/images/generations":
            obj["size"] = draw(st.sampled_from(["31x32", "9999x9999", "x", ""]))
        if path in ("/v1/chat/completions", "/v1/completions"):
            obj["stream"] = False  # keep the fuzz fast; streaming is covered above
        body = json.dumps(obj).encode()
    return path, body


def test_fuzz_malformed_requests_no_5xx(server):
    conn = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)]
    statuses = []

    @settings(max_examples=1000, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(malformed())
    def check(case):
        path, body = case
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
        try:
            conn[0].request("POST", path, body=body, headers=headers)
            resp = conn[0].getresponse()
            data = resp.read()
        except (http.client.HTTPException, OSError):
            conn[0].close()
            conn[0] = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            conn[0].request("POST", path, body=body, headers=headers)
            resp = conn[0].getresponse()
            data = resp.read()
        statuses.append(resp.status)
        assert resp.status < 500, (path, body[:200], resp.status, data[:300])
        if resp.status >= 400:
            err = json.loads(data)["error"]
            assert set(err) == {"message", "type", "param", "code"}

    check()
    assert len(statuses) == 1000
    assert any(s >= 400 for s in statuses)
    conn[0].request("GET", "/health")
    assert conn[0].getresponse().status == 200  # still up
