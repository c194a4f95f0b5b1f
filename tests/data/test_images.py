"""Image data pipeline: sources with sidecars / manifests, buckets and SDXL time ids, bad files, exact resume."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from mosaicjax.data import images as images_lib
from mosaicjax.data import shapes as shapes_lib


def _tok(captions):
    return np.array([[len(c)] + [0] * 76 for c in captions], np.int32)  # [b, 77]: enough to check captions


def _write(folder, name, size, caption="a cat"):
    Image.fromarray(np.full((size[1], size[0], 3), 128, np.uint8)).save(os.path.join(folder, name + ".png"))
    if caption is not None:
        with open(os.path.join(folder, name + ".txt"), "w") as f:
            f.write(caption)


def test_bucket_sizes_scale_sdxl_sizes():
    assert images_lib.bucket_sizes(1024, 64) == [(1024, 1024), (768, 1280), (1280, 768)]
    assert images_lib.bucket_sizes(32, 8) == [(32, 32), (24, 40), (40, 24)]
    sizes = images_lib.bucket_sizes(32, 8)
    assert images_lib.nearest_bucket(300, 500, sizes) == 1  # landscape (h < w)
    assert images_lib.nearest_bucket(500, 300, sizes) == 2
    assert images_lib.nearest_bucket(400, 410, sizes) == 0


def test_folder_buckets_and_time_ids(tmp_path):
    for i in range(4):
        _write(tmp_path, f"land{i}", (200, 120), "wide")
        _write(tmp_path, f"port{i}", (120, 200), "tall")
    cfg = images_lib.ImageDataConfig(source="folder", paths=str(tmp_path), resolution=32, buckets=True)
    it = images_lib.make_train_iterator(cfg, [_tok], global_batch=2, seed=0)
    shapes = set()
    for _ in range(8):
        b = next(it)
        h, w = b["pixels"].shape[1:3]
        shapes.add((h, w))
        assert b["pixels"].dtype == np.float32 and -1.0 <= b["pixels"].min() <= b["pixels"].max() <= 1.0
        oh, ow, top, left, th, tw = b["time_ids"][0]
        assert (th, tw) == (h, w)
        assert (oh, ow) == ((120, 200) if w > h else (200, 120))
        assert b["input_ids"][0, 0] == (4 if w > h else 4)
    assert shapes == {(24, 40), (40, 24)}


def test_jsonl_manifest_and_bad_files(tmp_path):
    _write(tmp_path, "ok", (32, 32), None)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    lines = [{"file_name": "ok.png", "text": "fine"}, {"file_name": "broken.png", "text": "bad"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    cfg = images_lib.ImageDataConfig(source="jsonl", paths=str(manifest), resolution=16, shuffle=False)
    it = images_lib.make_train_iterator(cfg, [_tok], global_batch=2, seed=0)
    with pytest.raises(ValueError, match="broken.png"):
        next(it)
    cfg = images_lib.ImageDataConfig(source="jsonl", paths=str(manifest), resolution=16, shuffle=False,
                                     on_error="skip")
    before = images_lib.skipped_records()
    b = next(images_lib.make_train_iterator(cfg, [_tok], global_batch=2, seed=0))
    assert b["pixels"].shape == (2, 16, 16, 3) and images_lib.skipped_records() > before  # read-ahead may count more


def test_missing_caption_names_the_file(tmp_path):
    _write(tmp_path, "a", (16, 16))
    _write(tmp_path, "nocap", (16, 16), None)
    cfg = images_lib.ImageDataConfig(source="folder", paths=str(tmp_path), resolution=16, shuffle=False)
    with pytest.raises(ValueError, match="nocap.png: no caption file"):
        next(images_lib.make_train_iterator(cfg, [_tok], global_batch=2, seed=0))


def test_iterator_resumes_exactly():
    cfg = images_lib.ImageDataConfig(source="shapes", resolution=16, shapes_num_records=64, random_crop=True,
                                     random_flip=True)
    it = images_lib.make_train_iterator(cfg, [_tok], global_batch=8, seed=3)
    for _ in range(5):
        next(it)
    state = it.get_state()
    want = [next(it) for _ in range(6)]  # crosses an epoch boundary (8 batches per epoch)
    it2 = images_lib.make_train_iterator(cfg, [_tok], global_batch=8, seed=3)
    it2.set_state(state)
    for w in want:
        g = next(it2)
        for k in w:
            np.testing.assert_array_equal(g[k], w[k])


def test_processes_read_disjoint_rows_of_the_same_batch():
    cfg = images_lib.ImageDataConfig(source="shapes", resolution=16, shapes_num_records=64)
    whole = next(images_lib.make_train_iterator(cfg, [_tok], global_batch=4, seed=0))
    parts = [next(images_lib.make_train_iterator(cfg, [_tok], global_batch=4, seed=0, process_index=i,
                                                 process_count=2)) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([p["pixels"] for p in parts]), whole["pixels"])


def test_shapes_evaluator_is_exact_on_renders():
    from mosaicjax.diffusion import shapes_eval
    imgs, attrs = [], []
    for color, shape, size, pos in shapes_lib.all_combinations():
        imgs.append(shapes_lib.render(color, shape, size, pos, 32))
        attrs.append({"color": color, "shape": shape})
    got = shapes_eval.adherence(imgs, attrs)
    assert got["color_accuracy"] == 1.0 and got["shape_accuracy"] == 1.0
    assert shapes_lib.held_out_prompts()
