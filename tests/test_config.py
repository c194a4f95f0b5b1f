"""Config errors are caught at parse time, before anything compiles, and name the fix."""
import os

import pytest

from mosaicjax import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_misspelt_parameter_suggests_the_right_one():
    with pytest.raises(config.ConfigError) as e:
        config.parse([], ["train.num_step = 3"])
    assert "train.num_steps" in str(e.value)


def test_unknown_configurable_suggests_the_right_one():
    with pytest.raises(config.ConfigError) as e:
        config.parse([], ["trian.num_steps = 3"])
    assert "'train'" in str(e.value)


def test_missing_file_is_named():
    with pytest.raises(config.ConfigError) as e:
        config.parse(["experiments/nope.gin"], [])
    assert "nope.gin" in str(e.value)


def test_files_include_each_other_and_params_override(tmp_path):
    base = tmp_path / "base.gin"
    base.write_text("train.num_steps = 7\ntrain.seed = 3\n")
    top = tmp_path / "top.gin"
    top.write_text(f"include '{base}'\ntrain.seed = 4\n")
    config.parse([str(top)], ["train.batch_size = 16"])
    from mosaicjax.trainer.config import TrainConfig
    cfg = TrainConfig()
    assert (cfg.num_steps, cfg.seed, cfg.batch_size) == (7, 4, 16)
    path = config.write_config(str(tmp_path / "run"), config.operative_config())
    assert "train.num_steps = 7" in open(path).read()


def test_every_experiment_parses():
    for dirpath, _, files in os.walk(os.path.join(ROOT, "experiments")):
        for f in files:
            if f.endswith(".gin"):
                config.parse([os.path.join(dirpath, f)], [])
