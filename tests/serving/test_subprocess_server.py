"""`python -m mosaicjax.serve` as a real subprocess: README's SDK snippet runs against it, then SIGTERM drains it.

One server process (tiny DBRX as "dbrx", tiny SD1 as "imageai", as the README names them; one KV-cache slot so
queued streams keep it busy while the signal lands). The drain test runs last in this module: it ends the process.
"""
import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import free_port, wait_ready  # noqa: E402  pylint: disable=wrong-import-position

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_README_URL = "http://127.0.0.1:8000/v1"
DRAIN_TIMEOUT = 60


def readme_serving_snippet() -> str:
    """The first python block of README.md's serving section."""
    with open(os.path.join(_REPO, "README.md")) as f:
        text = f.read()
    section = text[text.index("## Serving"):]
    section = section[:section.index("\n## ", 1)]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def proc_server(lm_folder, image_folder, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve_log") / "serve.log"
    log = open(log_path, "w")  # pylint: disable=consider-using-with
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=_REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, "-m", "mosaicjax.serve", f"--model=dbrx={lm_folder}", f"--model=imageai={image_folder}",
         f"--port={port}", "--slots=1", "--default_image_steps=2", f"--drain_timeout={DRAIN_TIMEOUT}"],
        cwd=_REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, time.time() + 240)
    except RuntimeError:
        proc.kill()
        raise RuntimeError("server did not become ready:\n" + open(log_path).read()[-3000:])
    yield proc, base, log_path
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


def test_readme_snippet_runs_against_the_server(proc_server, tmp_path, monkeypatch, capsys):
    _, base, _ = proc_server
    code = readme_serving_snippet()
    # The two SDK calls of the talk, as the README shows them.
    assert 'client.chat.completions.create(model="dbrx", messages=' in code
    assert 'client.images.generate(model="imageai"' in code
    assert 'extra_body={"negative_prompt": "blurry", "seed": 57}' in code
    assert code.count(_README_URL) == 1
    monkeypatch.chdir(tmp_path)  # the snippet writes fox.png
    scope = {}
    exec(compile(code.replace(_README_URL, base + "/v1"), "README.md", "exec"), scope)  # pylint: disable=exec-used
    chat = scope["chat"]
    ChatCompletion.model_validate(chat.model_dump(mode="json", exclude_unset=True), strict=True)
    assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens >= 1
    assert capsys.readouterr().out == chat.choices[0].message.content + "\n"
    png = (tmp_path / "fox.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # Same seed, same bytes (the README's promise), and the server's seed is honoured.
    again = scope["client"].images.generate(model="imageai", prompt="a red fox in snow", response_format="b64_json",
                                            extra_body={"negative_prompt": "blurry", "seed": 57})
    assert base64.b64decode(again.data[0].b64_json) == png


def _health(base: str):
    try:
        with urllib.request.urlopen(base + "/health", timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, ConnectionError):
        return "refused"


def _new_request_refused(base: str) -> str:
    body = json.dumps({"model": "dbrx", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    req = urllib.request.Request(base + "/v1/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return f"accepted ({r.status})"
    except urllib.error.HTTPError as e:
        err = json.loads(e.read())["error"]
        assert e.code == 503 and set(err) == {"message", "type", "param", "code"}, (e.code, err)
        return "503"
    except (urllib.error.URLError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        assert isinstance(reason, ConnectionError), e
        return "refused"


def test_sigterm_drains_in_flight_streams_and_exits_0(proc_server):
    """Streams queued behind one slot are in flight when SIGTERM lands (each has its role chunk; one decodes, the
    rest wait for the slot): all of them run to their end, a new request is refused (503 or connection refused),
    and the process exits 0 within --drain_timeout."""
    proc, base, log_path = proc_server
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
    req = urllib.request.Request(base + "/tokenize", method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"messages": [{"role": "user", "content": "stream 0"}]}).encode())
    with urllib.request.urlopen(req, timeout=30) as r:
        info = json.loads(r.read())
    n_streams, max_tokens = 8, info["max_model_len"] - info["count"]  # as long as the context allows
    started = [threading.Event() for _ in range(n_streams)]  # the role chunk: the server has the request
    results = [None] * n_streams
    last_chunk_at = [0.0] * n_streams  # wall time of each stream's latest chunk

    def stream(i):
        try:
            chunks = list(_iter(i, client.chat.completions.create(
                model="dbrx", messages=[{"role": "user", "content": f"stream {i}"}], max_tokens=max_tokens,
                temperature=0.0, stream=True, stream_options={"include_usage": True},
                extra_body={"ignore_eos": True})))
            for ch in chunks:
                ChatCompletionChunk.model_validate(ch.model_dump(mode="json", exclude_unset=True), strict=True)
            results[i] = chunks
        except Exception as e:  # pylint: disable=broad-except
            results[i] = e

    def _iter(i, s):
        for ch in s:
            started[i].set()
            last_chunk_at[i] = time.time()
            yield ch

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(n_streams)]
    for t in threads:
        t.start()
    assert all(e.wait(60) for e in started)
    t_signal = time.time()
    proc.send_signal(signal.SIGTERM)
    deadline = time.time() + 20  # the signal is handled: /health says draining, or nothing listens any more
    while _health(base) == 200 and time.time() < deadline:
        time.sleep(0.05)
    refused = _new_request_refused(base)
    assert refused in ("503", "refused"), refused
    for t in threads:
        t.join(DRAIN_TIMEOUT)
    rc = proc.wait(timeout=DRAIN_TIMEOUT + 15)
    log = open(log_path).read()
    assert rc == 0, log[-3000:]
    assert time.time() - t_signal < DRAIN_TIMEOUT
    for i, chunks in enumerate(results):
        assert not isinstance(chunks, Exception) and chunks, (i, chunks, log[-2000:])
        assert chunks[-1].usage.completion_tokens == max_tokens  # ran to its end, not cut by the drain
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    # The streams were really in flight across the signal: they kept receiving tokens after it (whether uvicorn
    # itself then logs a wait depends on whether they finished before its shutdown began).
    assert max(last_chunk_at) > t_signal, (max(last_chunk_at), t_signal)
