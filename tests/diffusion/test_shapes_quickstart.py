"""The image quickstart (experiments/imageai/shapes.gin) shrunk: both phases through the real CLI, the PNG grid and
the adherence report, a re-run that skips the finished VAE phase and resumes the UNet phase; and the errors of an
architecture-only (weights-less) folder.

The run uses the quickstart's own gin file and a tiny model folder written by the same generator as the committed
experiments/imageai/shapes_model/ (only smaller), at 16x16.
"""
import importlib.util
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "trainer"))
import cli_support as cs  # noqa: E402

GIN = os.path.join(cs.REPO, "experiments", "imageai", "shapes.gin")
COMMITTED = os.path.join(cs.REPO, "experiments", "imageai", "shapes_model")


def _generator():
    path = os.path.join(cs.REPO, "experiments", "imageai", "make_shapes_model.py")
    spec = importlib.util.spec_from_file_location("make_shapes_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _compile_cache(monkeypatch):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", os.path.join(cs.REPO, ".pytest_cache", "xla_image"))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return _generator().main(
        str(tmp_path_factory.mktemp("shapes_model") / "m"),
        text=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2),
        vae=dict(block_out_channels=[8, 16], layers_per_block=1, latent_channels=4, norm_num_groups=8,
                 scaling_factor=1.0),
        unet=dict(block_out_channels=[16, 32], layers_per_block=1, attention_head_dim=2, norm_num_groups=8,
                  down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"]),
        side=16)


def _command(workdir, folder, **overrides):
    params = {"image.init_from": f"'{folder}'", "image.vae_pretrain_steps": 2, "train.num_steps": 1,
              "train.batch_size": 4, "train.log_every": 1, "train.checkpoint_every": 1,
              "image_data.resolution": 16, "image_data.shapes_num_records": 64, "image.num_samples": 4,
              "image.sample_steps": 2, "metrics.tensorboard": False,
              "image.vae_pretrain_bindings": "('train.log_every = 1',)", **overrides}
    return ([sys.executable, "-m", "mosaicjax.train", f"--gin_file={GIN}", f"--workdir={workdir}"]
            + [f"--gin_param={k} = {v}" for k, v in params.items()])


def _run(cmd):
    import subprocess  # pylint: disable=import-outside-toplevel
    proc = subprocess.run(cmd, env=cs.cli_env(), cwd=cs.REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def test_two_phases_samples_report_and_resume(tiny_folder, tmp_path):
    workdir = str(tmp_path / "shapes")
    err = _run(_command(workdir, tiny_folder))
    assert "[phase 1/2 vae] step 2/2" in err and "[phase 2/2 unet] step 1/1" in err, err[-3000:]
    vae_rows = cs.read_metrics(os.path.join(workdir, "vae"))
    assert [r["step"] for r in vae_rows] == [1, 2] and "reconstruction_loss" in vae_rows[-1]
    assert [r["step"] for r in cs.read_metrics(workdir)] == [1]
    assert "prompt adherence on 4 held-out prompts" in err
    assert "[phase 1/2 vae] done in" in err and "all 2 phases done" in err
    report = json.load(open(os.path.join(workdir, "samples", "report.json")))
    for key in ("color_accuracy", "shape_accuracy", "both_accuracy"):
        assert 0.0 <= report[key] <= 1.0, key
    assert report["num_images"] == 4 and len(report["images"]) == 4
    assert os.path.getsize(os.path.join(workdir, "samples", "step_1.png")) > 0
    # Phase 2 starts from phase 1's VAE (EMA off in phase 1, so its weights) and keeps it frozen.
    assert json.load(open(os.path.join(workdir, "mosaicjax.json")))["trained"] == ["unet", "text_encoder"]
    assert json.load(open(os.path.join(workdir, "vae", "mosaicjax.json")))["trained"] == ["vae"]

    # The command again with one more UNet step (and no samples, to keep the test short): phase 1 is complete and
    # skipped, phase 2 resumes from its checkpoint.
    err = _run(_command(workdir, tiny_folder, **{"train.num_steps": 2, "image.num_samples": 0}))
    assert "[phase 1/2 vae] complete" in err and "[phase 1/2 vae] step" not in err, err[-3000:]
    assert "[phase 2/2 unet] resumed from" in err and "[phase 2/2 unet] step 2/2" in err, err[-3000:]
    assert [r["step"] for r in cs.read_metrics(workdir)] == [1, 2]
    assert [r["step"] for r in cs.read_metrics(os.path.join(workdir, "vae"))] == [1, 2]


def test_weightless_folder_needs_reinit(tmp_path):
    import gin
    from mosaicjax import config
    from mosaicjax.trainer import loop
    try:
        config.parse([GIN], ["image.reinit = ('vae', 'unet')", "metrics.tensorboard = False"])
        with pytest.raises(config.ConfigError,
                           match=r"no weights for text_encoder .*add 'text_encoder' to image.reinit"):
            loop.train(str(tmp_path / "a"))
        config.parse([GIN], ["image.reinit = ('vae', 'unet', 'text_encoder', 'safety_checker')"])
        with pytest.raises(config.ConfigError, match="only components of the model"):
            loop.train(str(tmp_path / "b"))
    finally:
        gin.clear_config()


def test_committed_model_folder_is_the_generators_output(tmp_path):
    """experiments/imageai/shapes_model/ is what make_shapes_model.py writes (edit the script, not the files)."""
    fresh = _generator().main(str(tmp_path / "m"))
    for root, _, files in os.walk(fresh):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), fresh)
            with open(os.path.join(fresh, rel), "rb") as a, open(os.path.join(COMMITTED, rel), "rb") as b:
                assert a.read() == b.read(), rel


def test_evaluator_names_softened_shapes():
    """A square whose corners a VAE rounded off is still a square; blobs are not squares (shapes_eval's docstring)."""
    from mosaicjax.data import shapes
    from mosaicjax.diffusion import shapes_eval
    square = shapes.render("blue", "square", "large", "center", 32)
    ys, xs = (square[..., 2] < 250).nonzero()
    rounded = square.copy()
    for r, inward_r in ((ys.min(), 1), (ys.max(), -1)):
        for c, inward_c in ((xs.min(), 1), (xs.max(), -1)):
            for dr, dc in ((0, 0), (0, 1), (1, 0)):  # three pixels off each corner
                rounded[r + inward_r * dr, c + inward_c * dc] = 255
    assert shapes_eval.classify(rounded)["shape"] == "square"
    assert shapes_eval.classify(rounded)["fill"] < 0.97  # what the fill rule called a circle
    assert shapes_eval.classify(shapes.render("red", "circle", "small", "top", 32))["shape"] == "circle"
    blob = np.minimum(shapes.render("red", "circle", "large", "center", 32),
                      np.roll(shapes.render("red", "circle", "large", "center", 32), 5, axis=1))
    assert shapes_eval.classify(blob)["shape"] != "square"
