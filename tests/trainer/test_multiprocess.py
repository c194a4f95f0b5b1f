"""Multi-host code paths (jax.distributed, per-process data shards, global arrays, checkpoints) on one machine:
two processes with gloo CPU collectives on 127.0.0.1 train as well as one process with the same devices.

Each process reads its own disjoint slice of the files, so the global batches differ from a single process's and
the losses are close, not equal.
"""
import os
import socket
import subprocess

import pytest

from cli_support import REPO, cli_command, cli_env, losses, run_cli, tiny_params


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tiny_corpus, tmp_path):
    params = tiny_params(tiny_corpus, **{"train.num_steps": 16, "train.checkpoint_every": 8})
    single = tmp_path / "single"
    run_cli(single, params, devices=4)
    multi = tmp_path / "multi"
    port = _free_port()
    procs = []
    for pid in range(2):
        cmd = cli_command(multi, params) + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                            f"--process_id={pid}"]
        procs.append(subprocess.Popen(cmd, env=cli_env(devices=2), cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    ref, got = losses(single), losses(multi)
    assert sorted(got) == list(range(1, 17))
    assert got[1] == pytest.approx(ref[1], rel=0.02)  # same initialisation, different documents
    assert got[16] < got[1] - 0.5 and ref[16] < ref[1] - 0.5
    assert got[16] == pytest.approx(ref[16], rel=0.1)
    assert sorted(os.listdir(multi / "checkpoints")) == ["16", "8"]
    assert "held-out bits per byte" in outs[0]
