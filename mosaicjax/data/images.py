"""grain pipelines of (image, caption) for text-to-image training.

Sources (random access; each record remembers where it came from so errors name the file):
  'folder'       PATHS is a directory; every *.png/*.jpg/*.jpeg/*.webp/*.bmp with a caption sidecar of the same
                 stem (.txt next to it).
  'jsonl'        PATHS is a JSONL manifest (comma separated for several); each line {"file_name": relative or
                 absolute path, "text": caption} (field names configurable).
  'array_record' PATHS globs ArrayRecord files of JSON records {"image_b64": PNG/JPEG bytes in base64, "text":
                 caption} (field names configurable; write them with mosaicjax.data.arrayrecord).
  'tfds'         a tfds data_source (`tfds.data_source(name, split=...)`) with image and caption features.
  'shapes'       the procedural coloured-shapes set (mosaicjax/data/shapes.py; no files).

Batches (per process): {'pixels': float32 [b, H, W, 3] in [-1, 1], 'input_ids': int32 [b, 77] (one array per
tokenizer: 'input_ids_2' for SDXL's second), 'time_ids': float32 [b, 6] = SDXL's (original_h, original_w,
crop_top, crop_left, target_h, target_w)}. With `buckets`, every batch holds one aspect-ratio bucket
(1024x1024, 1280x768, 768x1280 scaled to `resolution`); images are resized to cover the bucket and cropped
(centre, or random with `random_crop`).

The iterator is a grain MapDataset over global batch numbers: batch i is a pure function of (seed, i) — its
epoch, the per-epoch shuffle of each bucket, and the crop offsets — so its checkpointed state is one integer and a
resumed run reads exactly the batches an uninterrupted one would. Each process loads only its rows of every
global batch. Unreadable images or captions raise ValueError naming the file, or with on_error='skip' are
replaced by the next record of the same bucket and counted (`skipped_records()`).

With `cache_dir` (mosaicjax/data/latent_cache.py) the same batches — same order, buckets and skips — carry each
record's cached VAE moments and text embeddings instead of pixels and token ids.
"""
from __future__ import annotations

import base64
import dataclasses
import glob
import io
import json
import os
import threading
from typing import Callable

import gin
import grain
import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# SDXL's three training sizes (width, height); scaled to `resolution` for small runs.
BASE_BUCKETS = ((1024, 1024), (1280, 768), (768, 1280))

_skipped = 0
_skipped_lock = threading.Lock()


def skipped_records() -> int:
    """Records dropped by on_error='skip' in this process so far."""
    return _skipped


def _count_skip():
    global _skipped  # pylint: disable=global-statement
    with _skipped_lock:
        _skipped += 1


@gin.configurable("image_data")
@dataclasses.dataclass(frozen=True)
class ImageDataConfig:
    # 'folder' | 'jsonl' | 'array_record' | 'tfds' | 'shapes' (see the module docstring).
    source: str = "shapes"
    # Folder, manifest(s) or ArrayRecord glob(s), comma separated.
    paths: str | None = None
    # JSONL / ArrayRecord field names of the image path (or base64 bytes: image_b64_field) and caption.
    image_field: str = "file_name"
    image_b64_field: str = "image_b64"
    caption_field: str = "text"
    # tfds data_source name, split, data_dir and feature names.
    tfds_name: str | None = None
    tfds_split: str = "train"
    tfds_data_dir: str | None = None
    tfds_image_feature: str = "image"
    tfds_caption_feature: str = "caption"
    # Side of the square bucket (pixels); the other buckets keep SDXL's aspect ratios at about the same area.
    resolution: int = 32
    # Aspect-ratio buckets (each batch one bucket). False: every image is resized and cropped to a square.
    buckets: bool = False
    # Bucket sides are rounded to multiples of this (the VAE factor times the UNet's downsampling: 64 for SD).
    size_multiple: int = 8
    # Random crops (else centre crops) and random horizontal flips.
    random_crop: bool = False
    random_flip: bool = False
    # 'raise': an unreadable image or caption stops the run naming the file; 'skip': count and replace it.
    on_error: str = "raise"
    # Shuffle records each epoch (deterministically from train.seed and the epoch).
    shuffle: bool = True
    # 'shapes' source: records, image side (None: `resolution`) and generator seed.
    shapes_num_records: int = 4096
    shapes_side: int | None = None
    # Latent cache (mosaicjax/data/latent_cache.py): a directory for the VAE moments and text embeddings of every
    # record, encoded once and reused by every epoch and later run whose data, sizes and encoders are the same
    # (rebuilt otherwise). Needs frozen VAE and text encoders and random_crop = random_flip = False. None: off.
    cache_dir: str | None = None
    # Records per encoder call while building the cache.
    cache_batch_size: int = 16

    def __post_init__(self):
        if self.source not in ("folder", "jsonl", "array_record", "tfds", "shapes"):
            raise ValueError(f"image_data.source={self.source!r}; use folder, jsonl, array_record, tfds or shapes")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"image_data.on_error={self.on_error!r}; use 'raise' or 'skip'")
        if self.cache_dir and (self.random_crop or self.random_flip):
            raise ValueError(
                "image_data.cache_dir caches each record's latents once, at its fixed centre crop; random crops "
                "and flips would need a new encoding every epoch. Set image_data.random_crop = False and "
                "image_data.random_flip = False (or unset image_data.cache_dir)")


# ----------------------------------------------------------------------------------------------------- sources

class FileRecordsSource:
    """Records {'path', 'caption' or 'caption_path', 'name'} from a folder with sidecars or JSONL manifests."""

    def __init__(self, cfg: ImageDataConfig):
        if not cfg.paths:
            raise ValueError(f"image_data.paths is required for source={cfg.source!r}")
        self.records: list[dict] = []
        if cfg.source == "folder":
            for folder in cfg.paths.split(","):
                folder = folder.strip()
                if not os.path.isdir(folder):
                    raise FileNotFoundError(f"image_data.paths: {folder} is not a directory")
                for root, _, files in sorted(os.walk(folder)):
                    for f in sorted(files):
                        if f.lower().endswith(IMAGE_EXTENSIONS):
                            path = os.path.join(root, f)
                            self.records.append({"path": path, "caption_path": os.path.splitext(path)[0] + ".txt",
                                                 "name": path})
        else:
            for manifest in cfg.paths.split(","):
                manifest = manifest.strip()
                base = os.path.dirname(os.path.abspath(manifest))
                with open(manifest, encoding="utf-8") as fh:
                    for n, line in enumerate(fh, 1):
                        if not line.strip():
                            continue
                        name = f"{manifest}:{n}"
                        try:
                            obj = json.loads(line)
                            rec = {"path": os.path.join(base, obj[cfg.image_field]),
                                   "caption": obj[cfg.caption_field], "name": name}
                        except (json.JSONDecodeError, KeyError, TypeError) as e:
                            rec = {"error": f"{name}: bad manifest line ({type(e).__name__}: {e})", "name": name}
                        self.records.append(rec)
        if not self.records:
            raise ValueError(f"image_data.paths={cfg.paths!r}: no images found")

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[int(i)]

    def size_of(self, i) -> tuple[int, int]:
        rec = self.records[int(i)]
        try:
            from PIL import Image  # pylint: disable=import-outside-toplevel
            with Image.open(rec["path"]) as im:
                return im.size[1], im.size[0]
        except Exception:  # pylint: disable=broad-except
            return (1, 1)  # unreadable: the loader reports it (or skips it) when the batch is read


class ArrayRecordImageSource:
    """JSON records {image_b64_field: base64 PNG/JPEG bytes, caption_field: text} in ArrayRecord files."""

    def __init__(self, cfg: ImageDataConfig):
        paths = sorted(p for pat in (cfg.paths or "").split(",") for p in glob.glob(pat.strip()))
        if not paths:
            raise FileNotFoundError(f"image_data.paths={cfg.paths!r} matches no ArrayRecord files")
        from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
        self.src = grain.sources.ArrayRecordDataSource(paths)
        self.cfg, self.paths = cfg, paths
        counts = []
        for p in paths:
            reader = array_record_module.ArrayRecordReader(p)
            counts.append(reader.num_records())
            reader.close()
        self.starts = np.cumsum([0] + counts)  # record i lives in paths[k] with starts[k] <= i < starts[k + 1]

    def __len__(self):
        return len(self.src)

    def __getitem__(self, i):
        k = int(np.searchsorted(self.starts, int(i), side="right")) - 1
        name = f"{self.paths[k]}[record {int(i) - int(self.starts[k])}]"
        try:
            obj = json.loads(self.src[int(i)])
            return {"bytes": base64.b64decode(obj[self.cfg.image_b64_field]),
                    "caption": obj[self.cfg.caption_field], "name": name}
        except Exception as e:  # pylint: disable=broad-except
            return {"error": f"{name}: bad record ({type(e).__name__}: {e})", "name": name}

    def size_of(self, i):
        return (1, 1)  # decoding every image to bucket is too slow: ArrayRecord sets are used without buckets


class TfdsImageSource:
    """`tfds.data_source(tfds_name, split, data_dir)` (ArrayRecord-prepared datasets; no TensorFlow needed to read
    them): records {tfds_image_feature: uint8 [H, W, 3], tfds_caption_feature: bytes or str}."""

    def __init__(self, cfg: ImageDataConfig):
        if not cfg.tfds_name:
            raise ValueError("image_data.source='tfds' needs image_data.tfds_name")
        try:
            import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
        except ImportError:
            raise ValueError("image_data.source='tfds' needs tensorflow-datasets: pip install tensorflow-datasets"
                             ) from None
        try:
            self.src = tfds.data_source(cfg.tfds_name, split=cfg.tfds_split, data_dir=cfg.tfds_data_dir)
        except Exception as e:  # pylint: disable=broad-except  # DatasetNotFoundError, unknown split, ...
            raise ValueError(f"image_data.tfds_name={cfg.tfds_name!r} split={cfg.tfds_split!r} data_dir="
                             f"{cfg.tfds_data_dir!r}: {type(e).__name__}: {e}") from None
        self.cfg = cfg

    def __len__(self):
        return len(self.src)

    def __getitem__(self, i):
        name = f"{self.cfg.tfds_name}/{self.cfg.tfds_split}[{int(i)}]"
        try:
            rec = self.src[int(i)]
            cap = rec[self.cfg.tfds_caption_feature]
            return {"image": np.asarray(rec[self.cfg.tfds_image_feature]),
                    "caption": cap.decode("utf-8") if isinstance(cap, bytes) else str(cap), "name": name}
        except Exception as e:  # pylint: disable=broad-except
            return {"error": f"{name}: bad record ({type(e).__name__}: {e})", "name": name}

    def size_of(self, i):
        return (1, 1)


def build_source(cfg: ImageDataConfig, seed: int = 0):
    if cfg.source == "shapes":
        from mosaicjax.data import shapes  # pylint: disable=import-outside-toplevel
        return shapes.ShapesSource(cfg.shapes_num_records, cfg.shapes_side or cfg.resolution, "train", seed)
    if cfg.source in ("folder", "jsonl"):
        return FileRecordsSource(cfg)
    if cfg.source == "array_record":
        return ArrayRecordImageSource(cfg)
    return TfdsImageSource(cfg)


# ------------------------------------------------------------------------------------------------ processing

def bucket_sizes(resolution: int, multiple: int, enabled: bool = True) -> list[tuple[int, int]]:
    """(height, width) of each bucket: SDXL's sizes scaled so the square one has side `resolution`."""
    if not enabled:
        return [(resolution, resolution)]
    out = []
    for w, h in BASE_BUCKETS:
        s = resolution / 1024.0
        out.append((max(multiple, int(round(h * s / multiple)) * multiple),
                    max(multiple, int(round(w * s / multiple)) * multiple)))
    return out


def nearest_bucket(height: int, width: int, sizes: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is closest (in log space) to the image's."""
    ar = np.log(max(width, 1) / max(height, 1))
    return int(np.argmin([abs(ar - np.log(w / h)) for h, w in sizes]))


def load_record(rec: dict) -> tuple[np.ndarray, str]:
    """(uint8 [H, W, 3], caption); ValueError naming the file when the image or the caption cannot be read."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    name = rec.get("name", "?")
    if "error" in rec:
        raise ValueError(rec["error"])
    if "image" in rec:
        img = np.asarray(rec["image"])
    else:
        try:
            src = io.BytesIO(rec["bytes"]) if "bytes" in rec else rec["path"]
            with Image.open(src) as im:
                img = np.asarray(im.convert("RGB"))
        except Exception as e:  # pylint: disable=broad-except
            raise ValueError(f"{rec.get('path', name)}: unreadable image ({type(e).__name__}: {e})") from None
    if "caption" in rec:
        caption = rec["caption"]
        if not isinstance(caption, str):
            raise ValueError(f"{name}: caption is {type(caption).__name__}, not a string")
    else:
        try:
            with open(rec["caption_path"], encoding="utf-8") as f:
                caption = f.read().strip()
        except FileNotFoundError:
            raise ValueError(f"{rec['path']}: no caption file {rec['caption_path']}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{rec['caption_path']}: caption is not UTF-8 ({e})") from None
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return img[..., :3].astype(np.uint8), caption


def resize_and_crop(img: np.ndarray, size: tuple[int, int], rng: np.random.Generator | None
                    ) -> tuple[np.ndarray, tuple[int, int]]:
    """Resizes to cover (height, width) keeping the aspect ratio, then crops; returns (image, (top, left))."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    th, tw = size
    h, w = img.shape[:2]
    scale = max(th / h, tw / w)
    nh, nw = max(th, int(round(h * scale))), max(tw, int(round(w * scale)))
    if (nh, nw) != (h, w):
        img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC))
    if rng is None:
        top, left = (nh - th) // 2, (nw - tw) // 2
    else:
        top, left = int(rng.integers(0, nh - th + 1)), int(rng.integers(0, nw - tw + 1))
    return img[top:top + th, left:left + tw], (top, left)


class BatchLoader:
    """Global batch number -> this process's rows of that batch (see the module docstring)."""

    def __init__(self, cfg: ImageDataConfig, source, tokenizers: list[Callable[[list[str]], np.ndarray]], *,
                 global_batch: int, seed: int, process_index: int = 0, process_count: int = 1, cache=None):
        self.cfg, self.source, self.tokenizers, self.cache = cfg, source, tokenizers, cache
        self.global_batch, self.seed = int(global_batch), int(seed)
        self.rows = slice(process_index * global_batch // process_count,
                          (process_index + 1) * global_batch // process_count)
        self.sizes = bucket_sizes(cfg.resolution, cfg.size_multiple, cfg.buckets)
        n = len(source)
        assign = np.zeros(n, np.int64)
        if cache is not None:  # the buckets the cache was encoded at (the same rule; no image headers to read)
            assign = np.asarray(cache.bucket, np.int64)
        elif len(self.sizes) > 1:
            for i in range(n):
                assign[i] = nearest_bucket(*source.size_of(i), self.sizes)
        self.members = [np.nonzero(assign == b)[0] for b in range(len(self.sizes))]
        self.batches_per_epoch = sum(len(m) // self.global_batch for m in self.members)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{n} records ({[len(m) for m in self.members]} per bucket) make no full batch of "
                             f"train.batch_size={global_batch}; lower train.batch_size or add data")
        self._epoch_cache: tuple[int, list] | None = None

    def _epoch_batches(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """(bucket, record indices) of every batch of `epoch`, in order."""
        if self._epoch_cache and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for b, members in enumerate(self.members):
            order = rng.permutation(members) if self.cfg.shuffle else members
            for k in range(len(order) // self.global_batch):
                batches.append((b, order[k * self.global_batch:(k + 1) * self.global_batch]))
        if self.cfg.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._epoch_cache = (epoch, batches)
        return batches

    def _read(self, i: int):
        """(uint8 image, caption) of record i, or its cached arrays (latent cache)."""
        return self.cache.read(i) if self.cache is not None else load_record(self.source[i])

    def _load(self, bucket: int, index: int) -> tuple:
        """(what _read gives, index): the record or, with on_error='skip', the next readable one of its bucket."""
        members = self.members[bucket]
        pos = int(np.searchsorted(members, index))
        for attempt in range(len(members)):
            i = int(members[(pos + attempt) % len(members)])
            try:
                return self._read(i), i
            except ValueError:
                if self.cfg.on_error == "raise":
                    raise
                _count_skip()
        raise ValueError(f"every record of bucket {self.sizes[bucket]} is unreadable")

    def __call__(self, batch_number: int) -> dict:
        epoch, k = divmod(int(batch_number), self.batches_per_epoch)
        bucket, indices = self._epoch_batches(epoch)[k]
        th, tw = self.sizes[bucket]
        if self.cache is not None:  # cached moments, embeddings and time ids (mosaicjax/data/latent_cache.py)
            rows = [self._load(bucket, int(index))[0] for index in indices[self.rows]]
            return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        pixels, captions, time_ids = [], [], []
        for index in indices[self.rows]:
            (img, cap), i = self._load(bucket, int(index))
            rng = np.random.default_rng([self.seed, epoch, i, 1])
            oh, ow = img.shape[:2]
            img, (top, left) = resize_and_crop(img, (th, tw), rng if self.cfg.random_crop else None)
            if self.cfg.random_flip and rng.random() < 0.5:
                img = img[:, ::-1]
            pixels.append(img.astype(np.float32) / 127.5 - 1.0)  # [th, tw, 3] in [-1, 1]
            captions.append(cap)
            time_ids.append([oh, ow, top, left, th, tw])
        out = {"pixels": np.stack(pixels), "time_ids": np.asarray(time_ids, np.float32)}
        for j, tok in enumerate(self.tokenizers):
            out["input_ids" if j == 0 else f"input_ids_{j + 1}"] = np.asarray(tok(captions), np.int32)
        return out


def make_train_iterator(cfg: ImageDataConfig, tokenizers, *, global_batch: int, seed: int,
                        process_index: int = 0, process_count: int = 1, source=None,
                        cache=None) -> grain.DatasetIterator:
    """Infinite, checkpointable iterator of this process's batches (state = the next global batch number).

    With `cache` (a latent_cache.LatentCache of this source) batches hold the cached {'latent_mean',
    'latent_logvar', 'context'[, 'pooled'], 'time_ids'} instead of pixels and token ids, in the same order.
    """
    loader = BatchLoader(cfg, source if source is not None else build_source(cfg, seed), tokenizers,
                         global_batch=global_batch, seed=seed, process_index=process_index,
                         process_count=process_count, cache=cache)
    ds = grain.MapDataset.range(0, 2 ** 62).map(loader)
    # A few batches are read ahead in threads; the state is still the next batch number (prefetch is not state).
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)))
