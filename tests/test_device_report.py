"""benchmarks/device_report.py end to end on tiny shapes (CPU): every part reports sane, positive numbers."""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One CPU device (conftest fakes 8 for the sharding tests), and a fixed "peak" so MFU needs no CPU measurement.
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
           MOSAICJAX_PEAK_FLOPS="1e11")


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_device_report_tiny(tmp_path):
    # Two dispatches (the dispatches themselves are tested in tests/models/test_moe.py): the report's per-dispatch
    # loop is exercised and the test stays ~15 s shorter than with all four.
    cmd = [sys.executable, "-m", "benchmarks.device_report", "--tiny", "--profile", "--dispatches=sorted,capacity",
           f"--out={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.load(open(tmp_path / "device_report.json"))
    assert set(report) == {"meta", "train", "unet", "decode"}
    assert report["meta"]["backend"] == "cpu" and report["meta"]["hbm_bandwidth_bytes_per_sec"] is None
    assert not any(p.endswith(".partial.json") for p in os.listdir(tmp_path))  # merged into the report

    train = report["train"]
    assert "error" not in train, train.get("error")
    assert set(train["dispatch"]) == {"sorted", "capacity"}
    assert 0 < train["active_params"] < train["total_params"] and _positive(train["flops_per_step"])
    for name, r in train["dispatch"].items():
        assert "error" not in r, (name, r.get("error"))
        for key in ("median_step_sec", "tokens_per_sec", "mfu", "compile_sec", "first_loss"):
            assert _positive(r[key]), (name, key, r[key])
        assert r["timed_steps"] >= 2
        assert r["profile"]["events"] > 0, (name, r["profile"])  # --profile: one traced step per dispatch
    assert train["best_dispatch"] in train["dispatch"]

    unet = report["unet"]
    assert "error" not in unet, unet.get("error")
    assert unet["unet_params"] > 0 and unet["vae_params"] > 0
    assert set(unet["batch"]) == {"1", "2"}  # the tiny batches (full size: 1 and 4)
    for b, r in unet["batch"].items():
        assert "error" not in r, (b, r.get("error"))
        for key in ("denoise_sec", "unet_call_sec", "vae_decode_sec", "sec_per_request", "images_per_sec"):
            assert _positive(r[key]), (b, key, r[key])
        assert r["unet_batch"] == 2 * int(b) and r["image_shape"] == [int(b), 64, 64, 3]
        assert r["sec_per_request"] >= r["denoise_sec"]

    decode = report["decode"]
    assert "error" not in decode, decode.get("error")
    for key in ("decode_tokens_per_sec", "end_to_end_tokens_per_sec", "t_first_sec", "t_full_sec",
                "bytes_per_token", "weight_bytes_per_token"):
        assert _positive(decode[key]), (key, decode[key])
    assert decode["profile"]["events"] > 0, decode["profile"]
    assert decode["bound_tokens_per_sec"] is None and decode["fraction_of_bound"] is None  # no HBM figure on CPU

    assert "train: DBRX" in proc.stdout and "best:" in proc.stdout and "target 3.0 s/image" in proc.stdout


def test_hbm_bandwidth_table():
    from benchmarks import device_report
    assert device_report.hbm_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert device_report.hbm_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert device_report.hbm_bandwidth("NVIDIA H200") == 4.8e12
    assert device_report.hbm_bandwidth("NVIDIA A100-SXM4-80GB") == 2.0e12
    assert device_report.hbm_bandwidth("NVIDIA A100-SXM4-40GB") is None
    assert device_report.hbm_bandwidth("NVIDIA GH200 480GB") is None
    assert device_report.hbm_bandwidth("cpu") is None
