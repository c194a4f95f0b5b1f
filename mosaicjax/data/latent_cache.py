"""Latent cache: every record's VAE posterior moments and text embeddings, encoded once, in ArrayRecord files.

With frozen text encoders and VAE, every epoch would run the same encoders over the same images again. With
`image_data.cache_dir` set, the first run encodes each record once — the VAE's (mean, logvar) at the record's bucket
size and fixed centre crop, the text encoder outputs the UNet attends to (SDXL: both penultimate hidden states and
the pooled projection) and the SDXL time ids — and later epochs and runs read them back; the train step then only
samples z = mean + exp(logvar / 2) * eps and never runs an encoder. Caption dropout swaps in the empty prompt's
embeddings, which the cache stores once (empty.npz).

Layout of cache_dir (replaced as a whole; never point it at a folder that holds anything else):

    manifest.json      key (sha256 of `key_parts`), key_parts (what produced the cache: data listing, sizes,
                       encoder configs and weight files, tokenizers, dtype), record count, buckets, array shapes,
                       shard files, unreadable records; written last
    bucket.npy         int32 [records]: each record's bucket
    position.npy       int64 [records]: the record's row in the concatenation of the shard files (-1: unreadable)
    empty.npz          the empty prompt's 'context' [77, width] (+ 'pooled' [proj] for SDXL)
    part-PPPPP-of-NNNNN.arrayrecord    the records encoded by process P (one file per process)

Staleness: a cache whose key differs from the current configuration's is rebuilt (the log names the parts that
changed). Atomicity: a build writes to CACHE_DIR.partial and renames it into place after the manifest is
written, so a run killed while caching leaves no cache that a later run could use (the partial folder is removed
and the build starts over). With several processes, each encodes every P-th record into its own shard file and
cache_dir must be on a filesystem all processes see.

Augmentations: random crops and flips would need a new encoding every epoch, so the cache requires
`image_data.random_crop = False` and `image_data.random_flip = False` (ImageDataConfig refuses the combination).

Size: float32 throughout, per record 4 * (2 * h * w * c + 77 * width [+ proj]) bytes — about 1.1 MB at SDXL's
1024x1024 (latents 128x128x4, width 2048), 0.3 MB for SD1.5 at 512x512.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import struct
import sys
import time
from typing import Callable

import numpy as np

from mosaicjax.data import images as images_lib

CACHE_VERSION = 1
MANIFEST = "manifest.json"
_WRITER_OPTIONS = "group_size:1"  # every record seekable on its own (grain's random access)

_encoder_calls = 0  # encode() calls made by builds in this process (tests check a reuse makes none)


def encoder_calls() -> int:
    return _encoder_calls


def key_of(key_parts: dict) -> str:
    return hashlib.sha256(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()


def files_fingerprint(paths) -> list:
    """(path, size, mtime_ns) of every file under `paths` (files or folders), sorted: cheap, and it changes when
    a file is rewritten (contents are not hashed: a multi-GB weight file would cost seconds at every start)."""
    out = []
    for path in paths:
        if os.path.isfile(path):
            files = [path]
        else:
            files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs)
        for f in files:
            st = os.stat(f)
            out.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    return out


def data_fingerprint(cfg: images_lib.ImageDataConfig, source, seed: int) -> dict:
    """What identifies the records: their files' names, sizes and mtimes (captions included), or the generator."""
    if cfg.source == "shapes":
        return {"shapes": [len(source), cfg.shapes_side or cfg.resolution, int(seed)]}
    if cfg.source == "tfds":
        return {"tfds": [cfg.tfds_name, cfg.tfds_split, cfg.tfds_data_dir, len(source), cfg.tfds_image_feature,
                         cfg.tfds_caption_feature]}
    h = hashlib.sha256()
    if cfg.source == "array_record":
        h.update(json.dumps(files_fingerprint(source.paths)).encode())
        fields = [cfg.image_b64_field, cfg.caption_field]
    else:
        fields = [cfg.image_field, cfg.caption_field]
        if cfg.source == "jsonl":
            h.update(json.dumps(files_fingerprint(p.strip() for p in cfg.paths.split(","))).encode())
        for rec in source.records:
            paths = [p for p in (rec.get("path"), rec.get("caption_path")) if p and os.path.exists(p)]
            h.update(json.dumps([rec.get("name"), files_fingerprint(paths)]).encode())
    return {cfg.source: [h.hexdigest(), len(source), fields]}


# ----------------------------------------------------------------------------------------------- records

def _pack(arrays: dict[str, np.ndarray], meta: dict) -> bytes:
    """One record: u32 header length, JSON header (meta, array names/dtypes/shapes), raw array bytes."""
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    header = json.dumps({"meta": meta, "arrays": [[k, v.dtype.str, list(v.shape)] for k, v in arrays.items()]})
    header = header.encode("utf-8")
    return struct.pack("<I", len(header)) + header + b"".join(v.tobytes() for v in arrays.values())


def _unpack(data: bytes) -> tuple[dict[str, np.ndarray], dict]:
    (n,) = struct.unpack_from("<I", data)
    header = json.loads(data[4:4 + n].decode("utf-8"))
    out, offset = {}, 4 + n
    for name, dtype, shape in header["arrays"]:
        dt = np.dtype(dtype)
        count = int(np.prod(shape))
        out[name] = np.frombuffer(data, dt, count, offset).reshape(shape)
        offset += count * dt.itemsize
    return out, header["meta"]


class LatentCache:
    """A complete cache (its manifest exists): random access to the encoded records by source index."""

    def __init__(self, directory: str):
        import grain  # pylint: disable=import-outside-toplevel
        self.directory = directory
        with open(os.path.join(directory, MANIFEST)) as f:
            self.manifest = json.load(f)
        self.key = self.manifest["key"]
        self.bucket = np.load(os.path.join(directory, "bucket.npy"))
        self.position = np.load(os.path.join(directory, "position.npy"))
        with np.load(os.path.join(directory, "empty.npz")) as z:
            self.empty = {k: np.asarray(z[k]) for k in z.files}
        self.unreadable = {int(k): v for k, v in self.manifest.get("unreadable", {}).items()}
        shards = [os.path.join(directory, s) for s in self.manifest["shards"]]
        self.source = grain.sources.ArrayRecordDataSource(shards) if self.manifest["num_encoded"] else None

    @staticmethod
    def open(directory: str) -> "LatentCache | None":
        """The cache at `directory`, or None when there is none (or it is incomplete or unreadable)."""
        try:
            return LatentCache(directory)
        except (FileNotFoundError, json.JSONDecodeError, KeyError, ValueError, OSError):
            return None

    def __len__(self):
        return len(self.bucket)

    def read(self, i: int) -> dict[str, np.ndarray]:
        """Record i's arrays {'latent_mean', 'latent_logvar', 'context'[, 'pooled'], 'time_ids'}; ValueError
        (naming the file) for a record that was unreadable when the cache was built."""
        pos = int(self.position[i])
        if pos < 0:
            raise ValueError(self.unreadable.get(i, f"record {i} was unreadable when the cache was built"))
        arrays, _ = _unpack(self.source[pos])
        return arrays


# ------------------------------------------------------------------------------------------------- build

def _barrier(name: str) -> None:
    import jax  # pylint: disable=import-outside-toplevel
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        multihost_utils.sync_global_devices(name)


def _changed(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _fmt_time(sec: float) -> str:
    sec = int(sec)
    return f"{sec // 60}m{sec % 60:02d}s" if sec >= 60 else f"{sec}s"


def open_or_build(cfg: images_lib.ImageDataConfig, source, key_parts: dict,
                  encode: Callable[[np.ndarray, dict], dict], tokenizers: list, *, process_index: int = 0,
                  process_count: int = 1, log=None) -> LatentCache:
    """The cache for this configuration: reused when its key matches, else (re)built.

    encode(pixels float32 [b, H, W, 3] in [-1, 1], ids {'input_ids': int32 [b, 77], ...}) -> {'latent_mean',
    'latent_logvar' [b, h, w, c], 'context' [b, 77, width][, 'pooled' [b, proj]]} as numpy: the frozen encoders
    (the image task passes diffusion.training's latent_moments and text_conditioning, jitted). Called with b =
    cfg.cache_batch_size every time (the last batch of a bucket is padded) so it compiles once per bucket, and
    once with the empty prompt (its pixels are ignored) for caption dropout.
    tokenizers: caption lists -> int32 [b, 77], one per text encoder (input_ids, input_ids_2).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    directory = os.path.abspath(cfg.cache_dir)
    key = key_of(key_parts)
    cache = LatentCache.open(directory)
    if cache is not None and cache.key == key:
        if process_index == 0:
            log(f"latent cache: reusing {directory} ({len(cache)} records; the encoders will not run)")
        return cache
    if process_index == 0:
        if cache is not None:
            log(f"latent cache: {directory} was built for a different configuration (changed: "
                f"{', '.join(_changed(cache.manifest.get('key_parts', {}), key_parts))}); rebuilding it")
        elif os.path.isdir(directory) and os.listdir(directory) and not os.path.exists(
                os.path.join(directory, "bucket.npy")):
            raise ValueError(f"image_data.cache_dir={directory} exists and is not a latent cache; the cache "
                             f"replaces its folder as a whole, so give an empty or new directory")
    _build(cfg, source, key, key_parts, encode, tokenizers, directory, process_index, process_count, log)
    cache = LatentCache.open(directory)
    if cache is None or cache.key != key:
        raise RuntimeError(f"latent cache at {directory} is missing after building it (another run replacing it?)")
    return cache


def _build(cfg, source, key, key_parts, encode, tokenizers, directory, process_index, process_count, log):
    global _encoder_calls  # pylint: disable=global-statement
    partial = directory + ".partial"
    if process_index == 0:
        for leftover in (partial, directory + ".stale"):
            shutil.rmtree(leftover, ignore_errors=True)
        os.makedirs(partial)
    _barrier("latent_cache_start")
    n = len(source)
    sizes = images_lib.bucket_sizes(cfg.resolution, cfg.size_multiple, cfg.buckets)
    bucket = np.zeros(n, np.int32)
    if len(sizes) > 1:
        bucket = np.asarray([images_lib.nearest_bucket(*source.size_of(i), sizes) for i in range(n)], np.int32)
    mine = np.arange(process_index, n, process_count)
    shard = f"part-{process_index:05d}-of-{process_count:05d}.arrayrecord"
    bs = max(1, int(cfg.cache_batch_size))
    order, unreadable = [], {}
    from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
    writer = array_record_module.ArrayRecordWriter(os.path.join(partial, shard), _WRITER_OPTIONS)
    start, last_log, done = time.perf_counter(), 0.0, 0

    def load(i):
        try:
            img, cap = images_lib.load_record(source[int(i)])
        except ValueError as e:
            if cfg.on_error == "raise":
                raise
            return i, None, str(e)
        th, tw = sizes[bucket[i]]
        oh, ow = img.shape[:2]
        img, (top, left) = images_lib.resize_and_crop(img, (th, tw), None)
        pixels = img.astype(np.float32) / 127.5 - 1.0  # [th, tw, 3] in [-1, 1], as BatchLoader makes them
        return i, (pixels, cap, np.asarray([oh, ow, top, left, th, tw], np.float32)), None

    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            for b in range(len(sizes)):
                members = mine[bucket[mine] == b]
                for k in range(0, len(members), bs):
                    rows = []
                    for i, row, err in pool.map(load, members[k:k + bs]):
                        if row is None:
                            unreadable[int(i)] = err
                        else:
                            rows.append((int(i), *row))
                    if rows:
                        pad = rows + [rows[-1]] * (bs - len(rows))  # fixed batch: one compile per bucket
                        ids = {("input_ids" if j == 0 else f"input_ids_{j + 1}"):
                               np.asarray(tok([r[2] for r in pad]), np.int32) for j, tok in enumerate(tokenizers)}
                        out = encode(np.stack([r[1] for r in pad]), ids)
                        _encoder_calls += 1
                        for j, (i, _, _, time_ids) in enumerate(rows):
                            arrays = {name: np.asarray(v[j], np.float32) for name, v in out.items()}
                            arrays["time_ids"] = time_ids
                            writer.write(_pack(arrays, {"index": i}))
                            order.append(i)
                    done += len(members[k:k + bs])
                    now = time.perf_counter()
                    if process_index == 0 and (now - last_log > 5.0 or done == len(mine)):
                        rate = done / max(now - start, 1e-9)
                        log(f"latent cache: encoded {done * process_count}/{n} records ({rate * process_count:.1f}"
                            f" records/s, eta {_fmt_time((len(mine) - done) / max(rate, 1e-9))})")
                        last_log = now
    finally:
        writer.close()
    with open(os.path.join(partial, f"order-{process_index:05d}.json"), "w") as f:
        json.dump({"order": order, "unreadable": unreadable}, f)
    _barrier("latent_cache_shards")
    if process_index == 0:
        empty_ids = {("input_ids" if j == 0 else f"input_ids_{j + 1}"): np.asarray(tok([""] * bs), np.int32)
                     for j, tok in enumerate(tokenizers)}
        th, tw = sizes[0]
        empty = encode(np.zeros((bs, th, tw, 3), np.float32), empty_ids)
        _encoder_calls += 1
        np.savez(os.path.join(partial, "empty.npz"),
                 **{k: np.asarray(v[0], np.float32) for k, v in empty.items() if k in ("context", "pooled")})
        position = np.full(n, -1, np.int64)
        unreadable_all, offset, shards = {}, 0, []
        for p in range(process_count):
            with open(os.path.join(partial, f"order-{p:05d}.json")) as f:
                part = json.load(f)
            position[np.asarray(part["order"], np.int64)] = offset + np.arange(len(part["order"]))
            offset += len(part["order"])
            unreadable_all.update(part["unreadable"])
            shards.append(f"part-{p:05d}-of-{process_count:05d}.arrayrecord")
        np.save(os.path.join(partial, "bucket.npy"), bucket)
        np.save(os.path.join(partial, "position.npy"), position)
        manifest = {"version": CACHE_VERSION, "key": key, "key_parts": key_parts, "num_records": n,
                    "num_encoded": int(offset), "buckets": [list(s) for s in sizes], "shards": shards,
                    "unreadable": unreadable_all}
        with open(os.path.join(partial, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1, default=str)
        # Swap into place: a kill between the renames leaves no cache (rebuilt next time), never a mixed one.
        if os.path.exists(directory):
            os.rename(directory, directory + ".stale")
        os.rename(partial, directory)
        shutil.rmtree(directory + ".stale", ignore_errors=True)
        skipped = f", {len(unreadable_all)} unreadable record(s) skipped" if unreadable_all else ""
        log(f"latent cache: wrote {offset} records to {directory} in {_fmt_time(time.perf_counter() - start)}"
            f"{skipped}")
    _barrier("latent_cache_done")
