"""The latent cache (mosaicjax/data/latent_cache.py) with a stand-in encoder: it is built once and reused, a stale one
is rebuilt, a killed build is never used, unreadable records are skipped exactly as without the cache, and the
cached iterator yields the same batches (order, buckets, time ids) as the uncached one.

The stand-in encoder maps pixels to "moments" by subsampling and token ids to a "context", so every cached value
can be checked against what the uncached pipeline gives for the same record. The real encoders and the cached train
step are tested in tests/diffusion/test_image_step.py and, through the CLI, in tests/diffusion/test_training.py.
"""
import json
import os

import numpy as np
import pytest
from PIL import Image

from mosaicjax.data import images as images_lib
from mosaicjax.data import latent_cache


def _tok(captions):
    ids = np.zeros((len(captions), 77), np.int32)
    for r, c in enumerate(captions):
        b = c.encode()[:77]
        ids[r, :len(b)] = list(b)
    return ids


def _encode(pixels, ids):
    """Stand-in encoders: 'moments' = pixels subsampled by 2 (+ a 4th channel), 'context' = the ids."""
    mean = np.concatenate([pixels[:, ::2, ::2], pixels[:, ::2, ::2, :1]], axis=-1)  # [b, h/2, w/2, 4]
    return {"latent_mean": mean, "latent_logvar": -np.ones_like(mean),
            "context": np.asarray(ids["input_ids"], np.float32)[..., None]}  # [b, 77, 1]


def _folder(root, n_land=5, n_port=4, bad=None):
    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    for i in range(n_land + n_port):
        name = f"img{i:02d}"
        size = (40, 24) if i < n_land else (24, 40)  # (width, height)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
            os.path.join(root, name + ".png"))
        with open(os.path.join(root, name + ".txt"), "w") as f:
            f.write(f"caption {i}")
    if bad:
        with open(os.path.join(root, bad + ".png"), "wb") as f:
            f.write(b"not a png")
        with open(os.path.join(root, bad + ".txt"), "w") as f:
            f.write("bad")
    return str(root)


def _cfg(folder, cache_dir, **kw):
    return images_lib.ImageDataConfig(source="folder", paths=folder, resolution=32, buckets=True,
                                      cache_dir=str(cache_dir), cache_batch_size=3, **kw)


def _key(cfg, source, **extra):
    return {"data": latent_cache.data_fingerprint(cfg, source, 0), "resolution": cfg.resolution,
            "buckets": cfg.buckets, **extra}


def _open(cfg, source, logs=None, **extra):
    return latent_cache.open_or_build(cfg, source, _key(cfg, source, **extra), _encode, [_tok],
                                      log=(logs.append if logs is not None else lambda m: None))


def test_cached_batches_equal_uncached_batches(tmp_path):
    folder = _folder(tmp_path / "data")
    cfg = _cfg(folder, tmp_path / "cache")
    source = images_lib.build_source(cfg)
    logs = []
    cache = _open(cfg, source, logs)
    assert any("encoded 9/9 records" in m for m in logs) and any("wrote 9 records" in m for m in logs)
    assert set(cache.empty) == {"context"} and not cache.empty["context"].any()  # the empty prompt's ids: zeros
    plain = images_lib.make_train_iterator(cfg, [_tok], global_batch=2, seed=5, source=source)
    cached = images_lib.make_train_iterator(cfg, [_tok], global_batch=2, seed=5, source=source, cache=cache)
    shapes = set()
    for _ in range(12):  # several epochs (3 batches each: 2 landscape + 2 portrait of 5 + 4 records)
        want, got = next(plain), next(cached)
        assert sorted(got) == ["context", "latent_logvar", "latent_mean", "time_ids"]
        np.testing.assert_array_equal(got["time_ids"], want["time_ids"])
        np.testing.assert_array_equal(got["latent_mean"][..., :3], want["pixels"][:, ::2, ::2])
        np.testing.assert_array_equal(got["context"][..., 0], want["input_ids"])
        shapes.add(want["pixels"].shape[1:3])
    assert shapes == {(24, 40), (40, 24)}  # both aspect-ratio buckets were cached and read


def test_second_run_reuses_and_a_stale_cache_is_rebuilt(tmp_path):
    folder = _folder(tmp_path / "data")
    cfg = _cfg(folder, tmp_path / "cache")
    source = images_lib.build_source(cfg)
    before = latent_cache.encoder_calls()
    _open(cfg, source)
    built = latent_cache.encoder_calls() - before
    assert built == 5  # ceil(5 / 3) + ceil(4 / 3) batches of records (per bucket) + 1 of the empty prompt
    logs = []
    _open(cfg, images_lib.build_source(cfg), logs)
    assert latent_cache.encoder_calls() - before == built, "a second run must not run the encoders"
    assert any("reusing" in m for m in logs)
    # Stale: an encoder changed (its fingerprint is part of the key) -> rebuilt, saying what changed.
    logs = []
    _open(cfg, source, logs, encoder_weights=[["vae.safetensors", 1, 2]])
    assert latent_cache.encoder_calls() - before == 2 * built
    assert any("different configuration (changed: encoder_weights)" in m for m in logs)
    # Stale: a caption file was rewritten (mtime and size in the data fingerprint).
    with open(os.path.join(folder, "img03.txt"), "w") as f:
        f.write("a new caption")
    logs = []
    cache = _open(cfg, images_lib.build_source(cfg), logs, encoder_weights=[["vae.safetensors", 1, 2]])
    assert any("changed: data" in m for m in logs)
    np.testing.assert_array_equal(cache.read(3)["context"][:13, 0], np.frombuffer(b"a new caption", np.uint8))
    assert not os.path.exists(str(tmp_path / "cache") + ".stale")


def test_a_killed_build_leaves_no_usable_cache(tmp_path):
    folder = _folder(tmp_path / "data")
    cfg = _cfg(folder, tmp_path / "cache")
    source = images_lib.build_source(cfg)
    calls = []

    def dying(pixels, ids):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")  # as a kill mid-build: nothing after this point runs
        return _encode(pixels, ids)

    with pytest.raises(KeyboardInterrupt):
        latent_cache.open_or_build(cfg, source, _key(cfg, source), dying, [_tok], log=lambda m: None)
    assert latent_cache.LatentCache.open(str(tmp_path / "cache")) is None  # the partial build is not a cache
    assert os.path.isdir(str(tmp_path / "cache") + ".partial")
    before = latent_cache.encoder_calls()
    cache = _open(cfg, source)
    assert latent_cache.encoder_calls() > before and len(cache) == 9
    assert not os.path.exists(str(tmp_path / "cache") + ".partial")


def test_unreadable_records_are_skipped_as_without_the_cache(tmp_path):
    folder = _folder(tmp_path / "data", n_land=4, n_port=0, bad="zz_bad")
    cfg = _cfg(folder, tmp_path / "cache", on_error="skip")
    source = images_lib.build_source(cfg)
    logs = []
    cache = _open(cfg, source, logs)
    assert any("1 unreadable record(s) skipped" in m for m in logs)
    bad = [i for i in range(len(source)) if "zz_bad" in source[i]["name"]][0]
    with pytest.raises(ValueError, match="zz_bad.png: unreadable image"):
        cache.read(bad)
    plain = images_lib.make_train_iterator(cfg, [_tok], global_batch=2, seed=1, source=source)
    cached = images_lib.make_train_iterator(cfg, [_tok], global_batch=2, seed=1, source=source, cache=cache)
    for _ in range(6):
        want, got = next(plain), next(cached)
        np.testing.assert_array_equal(got["latent_mean"][..., :3], want["pixels"][:, ::2, ::2])
    # on_error='raise': building stops at the bad file, naming it, and leaves no cache.
    cfg = _cfg(folder, tmp_path / "cache2")
    with pytest.raises(ValueError, match="zz_bad.png"):
        _open(cfg, source)
    assert latent_cache.LatentCache.open(str(tmp_path / "cache2")) is None


def test_refuses_augmentations_and_foreign_folders(tmp_path):
    with pytest.raises(ValueError, match="random_crop = False"):
        images_lib.ImageDataConfig(source="shapes", cache_dir=str(tmp_path), random_flip=True)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    cfg = images_lib.ImageDataConfig(source="shapes", resolution=16, shapes_num_records=8, cache_dir=str(foreign))
    with pytest.raises(ValueError, match="is not a latent cache"):
        _open(cfg, images_lib.build_source(cfg))
    assert (foreign / "notes.txt").read_text() == "precious"


def test_manifest_records_what_built_it(tmp_path):
    cfg = images_lib.ImageDataConfig(source="shapes", resolution=16, shapes_num_records=8,
                                     cache_dir=str(tmp_path / "c"))
    source = images_lib.build_source(cfg)
    _open(cfg, source)
    manifest = json.load(open(tmp_path / "c" / "manifest.json"))
    assert manifest["key_parts"]["data"] == {"shapes": [8, 16, 0]}
    assert manifest["num_records"] == manifest["num_encoded"] == 8
    assert manifest["key"] == latent_cache.key_of(_key(cfg, source))
