"""Session fixtures for the serving tests: tiny checkpoints and real uvicorn servers on 127.0.0.1.

One tiny HF DBRX folder (tests/checkpoints/lm_fixtures.py: byte-level BPE with ChatML tokens and a chat template)
and one tiny SD1 diffusers folder (tests/diffusion/image_fixtures.py) are built once per session, loaded once,
and served by one main server (API key set, 64 KiB body limit). A second server with one slot and a one-deep
queue over the same LanguageModel exercises 429.
"""
import os
import socket
import sys
import threading
import time

import pytest

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_TESTS, "checkpoints"))
sys.path.insert(0, os.path.join(_TESTS, "diffusion"))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serving_common import API_KEY, IMAGE_NAME, LM_NAME  # noqa: E402,F401  pylint: disable=wrong-import-position


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base_url: str, deadline: float):
    """Polls /health until 200 (engines warmed up); 503 meanwhile."""
    import urllib.error  # pylint: disable=import-outside-toplevel
    import urllib.request  # pylint: disable=import-outside-toplevel
    while True:
        try:
            with urllib.request.urlopen(base_url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.time() > deadline:
            raise RuntimeError(f"{base_url} not ready")
        time.sleep(0.1)


class ServerThread:
    """uvicorn in a daemon thread (no signal handlers off the main thread); stop() drains it."""

    def __init__(self, app):
        import uvicorn  # pylint: disable=import-outside-toplevel
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 120
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        self.base_url = f"http://127.0.0.1:{self.port}"
        wait_ready(self.base_url, deadline)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="session")
def lm_folder(tmp_path_factory):
    """A tiny HF DBRX folder (max_seq_len 64) with a ChatML byte-level BPE tokenizer."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import lm_fixtures  # pylint: disable=import-outside-toplevel
    folder = str(tmp_path_factory.mktemp("lm"))
    lm_fixtures.make_hf_folder(folder, lm_fixtures.small_config(max_seq_len=64))
    return folder


@pytest.fixture(scope="session")
def lm(lm_folder):
    import mosaicjax  # pylint: disable=import-outside-toplevel
    return mosaicjax.load_lm(lm_folder, progress=False)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """A tiny SD1 diffusers folder (default size 32x32)."""
    pytest.importorskip("diffusers")
    import image_fixtures  # pylint: disable=import-outside-toplevel
    folder = str(tmp_path_factory.mktemp("sd1") / "sd1")
    image_fixtures.make_diffusers_folder(folder, "sd1")
    return folder


@pytest.fixture(scope="session")
def image_pipe(image_folder):
    import mosaicjax  # pylint: disable=import-outside-toplevel
    return mosaicjax.load_image_pipeline(image_folder)


@pytest.fixture(scope="session")
def server(lm, image_pipe):
    from mosaicjax.serving import create_app  # pylint: disable=import-outside-toplevel
    app = create_app({LM_NAME: lm, IMAGE_NAME: image_pipe}, api_key=API_KEY, slots=4, queue_size=128,
                     max_body_bytes=64 << 10, max_image_size=64, default_image_steps=2)
    srv = ServerThread(app)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def client(server):
    import openai  # pylint: disable=import-outside-toplevel
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
