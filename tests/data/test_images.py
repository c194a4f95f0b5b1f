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


def _png_b64(img):
    import base64
    import io
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def test_array_record_source_reads_images_and_names_bad_records(tmp_path):
    from mosaicjax.data import arrayrecord
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(5)]
    arrayrecord.write_array_record(str(tmp_path / "a.arrayrecord"),
                                   [{"image_b64": _png_b64(im), "text": f"cap {i}"} for i, im in enumerate(imgs[:3])])
    arrayrecord.write_array_record(str(tmp_path / "b.arrayrecord"),
                                   [{"image_b64": _png_b64(imgs[3]), "text": "cap 3"},
                                    {"image_b64": "not base64 png!", "text": "broken"}])
    cfg = images_lib.ImageDataConfig(source="array_record", paths=str(tmp_path / "*.arrayrecord"), resolution=16,
                                     shuffle=False)
    source = images_lib.build_source(cfg)
    assert len(source) == 5
    it = images_lib.make_train_iterator(cfg, [_tok], global_batch=2, seed=0)
    b = next(it)  # records 0 and 1, unshuffled, at their own size: pixels are the stored images exactly
    np.testing.assert_array_equal(np.round((b["pixels"] + 1.0) * 127.5).astype(np.uint8), np.stack(imgs[:2]))
    assert list(b["input_ids"][:, 0]) == [5, 5]
    next(it)  # records 2 and 3 (across the two files)
    with pytest.raises(ValueError, match=r"b\.arrayrecord\[record 1\]: unreadable image"):
        images_lib.load_record(source[4])
    with pytest.raises(FileNotFoundError, match="matches no ArrayRecord files"):
        images_lib.build_source(images_lib.ImageDataConfig(source="array_record", paths=str(tmp_path / "x*")))


def test_tfds_data_source_with_a_real_builder(tmp_path):
    """A tiny tfds dataset prepared here (array_record files; PNGs encoded with PIL so TensorFlow is not needed),
    read through tfds.data_source as image_data.source='tfds' does."""
    tfds = pytest.importorskip("tensorflow_datasets")
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 255, (24, 32, 3), dtype=np.uint8) for _ in range(4)]

    class MosaicjaxTinyCaptions(tfds.core.GeneratorBasedBuilder):
        # A one-part module name: tfds then locates the builder's code with inspect instead of importlib_resources
        # (not installed here), and finds no metadata files next to it, which this builder does not need.
        __module__ = "mosaicjax_tiny_captions"
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)), "caption": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            import io
            for i, im in enumerate(imgs):
                buf = io.BytesIO()
                Image.fromarray(im).save(buf, format="PNG")
                buf.seek(0)
                yield i, {"image": buf, "caption": f"tfds caption {i}"}

    MosaicjaxTinyCaptions(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    cfg = images_lib.ImageDataConfig(source="tfds", tfds_name="mosaicjax_tiny_captions", tfds_data_dir=str(tmp_path),
                                     resolution=16, shuffle=False)
    source = images_lib.build_source(cfg)
    seen = {}
    for i in range(len(source)):
        img, cap = images_lib.load_record(source[i])
        seen[cap] = img
    assert sorted(seen) == [f"tfds caption {i}" for i in range(4)]
    for i, im in enumerate(imgs):
        np.testing.assert_array_equal(seen[f"tfds caption {i}"], im)  # PNG round trip is lossless
    b = next(images_lib.make_train_iterator(cfg, [_tok], global_batch=4, seed=0))
    assert b["pixels"].shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(b["time_ids"][:, :2], [[24, 32]] * 4)  # original size, before the centre crop
    with pytest.raises(ValueError, match="image_data.tfds_name='no_such_dataset'"):
        images_lib.build_source(images_lib.ImageDataConfig(source="tfds", tfds_name="no_such_dataset",
                                                           tfds_data_dir=str(tmp_path)))
