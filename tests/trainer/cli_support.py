"""Helpers for trainer tests: tiny run bindings, running and killing the real CLI, reading its metrics."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A DBRX small enough to step in milliseconds yet with every feature on: GQA, clamping, 4 experts top-2.
TINY_MODEL = [
    "DbrxConfig.d_model = 32", "DbrxConfig.n_heads = 4", "DbrxConfig.kv_n_heads = 2", "DbrxConfig.n_layers = 2",
    "DbrxConfig.max_seq_len = 64", "DbrxConfig.vocab_size = 320", "DbrxConfig.clip_qkv = 4.0",
    "DbrxConfig.rope_theta = 10000.0", "DbrxConfig.ffn_hidden_size = 32", "DbrxConfig.moe_num_experts = 4",
    "DbrxConfig.moe_top_k = 2", "DbrxConfig.moe_loss_weight = 0.01",
]


def tiny_params(corpus, **overrides):
    """Gin bindings for a fast, fully featured run; overrides as name=value pairs."""
    params = TINY_MODEL + [
        "data.source = 'text_files'", f"data.paths = '{corpus['glob']}'", "data.eval_fraction = 0.2",
        "data.shuffle_window_rows = 16", "data.read_threads = 1",
        "tokenizer.kind = 'sentencepiece'", f"tokenizer.path = '{corpus['tokenizer']}'",
        "train.num_steps = 30", "train.batch_size = 8", "train.seq_len = 32", "train.log_every = 1",
        "train.checkpoint_every = 10", "train.eval_every = 0", "train.eval_batches = 2", "train.seed = 0",
        "optimizer.learning_rate = 0.01", "optimizer.warmup_steps = 5",
        "mesh.shape = {'data': -1, 'fsdp': 1, 'expert': 1, 'tensor': 1}",
        "metrics.tensorboard = False",
    ]
    for k, v in overrides.items():
        params.append(f"{k} = {v}")
    return params


def cli_command(workdir, params):
    return [sys.executable, "-m", "mosaicjax.train", f"--workdir={workdir}"] + [f"--gin_param={p}" for p in params]


def cli_env(devices=1):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["MOSAICJAX_CACHE_DIR"] = env.get("MOSAICJAX_CACHE_DIR", os.path.join(REPO, ".pytest_cache", "mosaicjax"))
    return env


def run_cli(workdir, params, devices=1, timeout=300, check=True):
    proc = subprocess.run(cli_command(workdir, params), env=cli_env(devices), cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train CLI failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def start_cli(workdir, params, devices=1):
    return subprocess.Popen(cli_command(workdir, params), env=cli_env(devices), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_metrics(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written right now
                pass
    return out


def wait_for_step(workdir, proc, step, timeout=240):
    """Polls metrics.jsonl until a logged step >= `step`; fails if the process ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = read_metrics(workdir)
        if rows and rows[-1]["step"] >= step:
            return rows[-1]["step"]
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc={proc.returncode}) before step {step}:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for step {step}")


def kill(proc, sig=signal.SIGKILL):
    proc.send_signal(sig)
    return proc.wait(timeout=120)


def losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir)}
