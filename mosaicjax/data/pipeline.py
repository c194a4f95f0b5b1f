"""The training and evaluation input pipelines: config -> grain source -> packed batches.

Train: MapDataset.source -> this process's slice -> shuffle(seed) -> repeat forever (each epoch reshuffled with
a seed derived from `seed` and the epoch) -> tokenize (+EOS) -> to_iter_dataset (threaded, prefetching) ->
pack into rows of seq_len -> batch. The result is a grain DatasetIterator whose get_state()/set_state() round-trip
exactly through JSON (Orbax's grain checkpoint handler), so a resumed run sees exactly the batches an
uninterrupted one would.

Batches are dicts of numpy arrays, per process: inputs, targets, segment_ids, positions int32 [b, T] and
weights float32 [b, T] (see packing.py for their meaning).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Iterator

import gin
import grain
import numpy as np

from mosaicjax.data import packing
from mosaicjax.data import sources
from mosaicjax.data import tokenizers as tokenizers_lib
from mosaicjax.data.sources import reset_skipped_records, skipped_records  # noqa: F401  (re-exported for metrics)

SOURCE_KINDS = ("text_files", "jsonl", "tfds", "array_record")


@gin.configurable("data")
@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where training text comes from and how it is read (gin name 'data')."""

    # 'text_files' (one document per file), 'jsonl' (one JSON object per line), 'tfds' (tfds.data_source) or
    # 'array_record' (one document per record: UTF-8 text or a JSON object, see record_format).
    source: str = "text_files"
    # Comma-separated globs for text_files / jsonl / array_record ('**' recurses). '{stdlib}' expands to the Python
    # standard library directory (its site-packages excluded), e.g. '{stdlib}/**/*.py'. A glob matching nothing
    # is an error.
    paths: str = ""
    # JSON field (jsonl, JSON array_record records) or feature (tfds) holding the document text.
    text_field: str = "text"
    # array_record records: 'text' (UTF-8), 'json' (object with text_field) or 'auto' (JSON when a record parses
    # as an object holding text_field, else text).
    record_format: str = "auto"
    # tfds dataset name (e.g. 'lm1b'), read with tfds.data_source; it must be prepared in tfds_data_dir already.
    tfds_name: str | None = None
    # tfds split used for training (any tfds split expression, e.g. 'train[:90%]').
    tfds_split: str = "train"
    # tfds split held out for evaluation; None: use eval_fraction of tfds_split (or no eval).
    tfds_eval_split: str | None = None
    # tfds data directory; None: tfds's default (~/tensorflow_datasets or $TFDS_DATA_DIR).
    tfds_data_dir: str | None = None
    # Comma-separated globs of held-out files (excluded from training even if `paths` matches them).
    # Exclusive with eval_fraction.
    eval_paths: str | None = None
    # Fraction of files (text_files) or records (jsonl, array_record, tfds) held out for evaluation, chosen
    # deterministically by crc32 of the relative path (or of 'relpath:line'); 0 = no held-out split.
    eval_fraction: float = 0.0
    # Malformed records (bad JSON, missing field, invalid UTF-8): 'raise' a ValueError("path:line: ...") or
    # 'skip' them, counted by skipped_records().
    on_error: str = "raise"
    # Shuffle training documents (each epoch differently, deterministically from train.seed).
    shuffle: bool = True
    # Shuffle packed rows within windows of this many rows (0 disables). Packing lays a long document over many
    # consecutive rows; without this a batch would hold slices of one or two files and its gradient would be
    # far noisier than its size suggests. Resume replays at most one window, so keep it moderate.
    shuffle_window_rows: int = 1024
    # Append the tokenizer's EOS to every document, so the model learns where documents end.
    add_eos: bool = True
    # Evaluation batches used when make_eval_batches gets max_batches=None; None = the whole held-out set.
    eval_max_batches: int | None = 16
    # Threads that read and tokenize documents ahead of the packer (grain ReadOptions.num_threads).
    read_threads: int = 2
    # Documents read ahead of the packer (grain ReadOptions.prefetch_buffer_size).
    prefetch_documents: int = 128

    def __post_init__(self):
        if self.source not in SOURCE_KINDS:
            raise ValueError(f"data.source must be one of {SOURCE_KINDS}, got {self.source!r}")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error must be 'raise' or 'skip', got {self.on_error!r}")
        if self.record_format not in ("auto", "text", "json"):
            raise ValueError(f"data.record_format must be 'auto', 'text' or 'json', got {self.record_format!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_fraction > 0 and (self.eval_paths or (self.source == "tfds" and self.tfds_eval_split)):
            raise ValueError("data.eval_fraction is exclusive with data.eval_paths / data.tfds_eval_split")
        if self.read_threads < 0 or self.prefetch_documents < 1:
            raise ValueError("data.read_threads must be >= 0 and data.prefetch_documents >= 1")


class _Tokenize:
    """Raw record -> int32 token array (+EOS); malformed records raise or (on_error='skip') become None."""

    def __init__(self, cfg: DataConfig, tokenizer: tokenizers_lib.Tokenizer):
        if cfg.add_eos and tokenizer.eos_id < 0:
            raise ValueError("data.add_eos=True but the tokenizer has no EOS token; set data.add_eos=False")
        self._tokenizer = tokenizer
        self._text_field = cfg.text_field
        self._skip = cfg.on_error == "skip"
        self._eos = [tokenizer.eos_id] if cfg.add_eos else []

    def __call__(self, record: dict) -> np.ndarray | None:
        try:
            text = sources.record_text(record, self._text_field)
        except ValueError as e:
            if not self._skip:
                raise
            sources.count_skipped(e)
            return None  # the packer skips Nones (and notices when everything is skipped)
        return np.asarray(self._tokenizer.encode(text) + self._eos, np.int32)


def _read_options(cfg: DataConfig) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_documents)


def _check_shape(batch_size: int, seq_len: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")


def make_train_dataset(cfg: DataConfig, tokenizer: tokenizers_lib.Tokenizer, *, batch_size: int, seq_len: int,
                       seed: int, process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """The infinite training IterDataset of packed batches (make_train_iterator iterates it)."""
    _check_shape(batch_size, seq_len)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
    src = sources.build_source(cfg, "train")
    if len(src) < process_count:
        raise ValueError(f"{src!r} has {len(src)} training records: fewer than the {process_count} processes")
    ds = grain.MapDataset.source(src)
    ds = ds[process_index::process_count]  # disjoint, interleaved slices: every process sees every file type
    if cfg.shuffle:
        ds = ds.shuffle(seed=int(seed) % 2**32)
    # Index i of the repeated dataset is epoch i // n; the shuffle above folds the epoch into its seed.
    ds = ds.repeat(None)
    ds = ds.map(_Tokenize(cfg, tokenizer))
    it_ds = ds.to_iter_dataset(_read_options(cfg), allow_nones=True)
    it_ds = packing.PackedIterDataset(it_ds, seq_len)
    if cfg.shuffle and cfg.shuffle_window_rows > 1:
        it_ds = grain.experimental.WindowShuffleIterDataset(
            it_ds, window_size=cfg.shuffle_window_rows, seed=(int(seed) + 1) % 2**32)
    return it_ds.batch(batch_size, drop_remainder=True)


def make_train_iterator(cfg: DataConfig, tokenizer: tokenizers_lib.Tokenizer, *, batch_size: int, seq_len: int,
                        seed: int, process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
    """Infinite, checkpointable iterator of this process's training batches (dict of [batch_size, seq_len])."""
    return iter(make_train_dataset(cfg, tokenizer, batch_size=batch_size, seq_len=seq_len, seed=seed,
                                   process_index=process_index, process_count=process_count))


def _zero_row(seq_len: int) -> dict[str, np.ndarray]:
    return {k: np.zeros([seq_len], np.float32 if k == "weights" else np.int32) for k in packing.FEATURES}


def make_eval_batches(cfg: DataConfig, tokenizer: tokenizers_lib.Tokenizer, *, batch_size: int, seq_len: int,
                      max_batches: int | None = None, process_index: int = 0,
                      process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """The held-out set as a finite, deterministic list of this process's batches ([] when there is none).

    Rows are the held-out documents in source order, packed; global batches of batch_size * process_count rows
    are cut from them, the last one padded with all-zero rows (weights 0), and each process keeps its own
    batch_size rows of every global batch. So every process gets the same number of batches (no collective
    hangs), their rows are disjoint, and together they cover the held-out set exactly once (or its first
    max_batches global batches; max_batches=None means cfg.eval_max_batches, which None means all).
    """
    _check_shape(batch_size, seq_len)
    if max_batches is None:
        max_batches = cfg.eval_max_batches
    src = sources.build_source(cfg, "eval")
    if src is None or len(src) == 0 or max_batches == 0:
        return []
    ds = grain.MapDataset.source(src).map(_Tokenize(cfg, tokenizer))
    ds = ds.to_iter_dataset(_read_options(cfg), allow_nones=True)
    rows_it = iter(packing.PackedIterDataset(ds, seq_len, max_empty_streak=None))  # finite: cannot spin
    global_b = batch_size * process_count
    limit = None if max_batches is None else max_batches * global_b
    rows = list(itertools.islice(rows_it, limit))
    if rows and len(rows) % global_b:
        rows += [_zero_row(seq_len)] * (global_b - len(rows) % global_b)
    batches = []
    for start in range(0, len(rows), global_b):
        mine = rows[start + process_index * batch_size:start + (process_index + 1) * batch_size]
        batches.append({k: np.stack([r[k] for r in mine]) for k in packing.FEATURES})
    return batches


def training_texts(cfg: DataConfig, max_bytes: int | None = None) -> Iterator[str]:
    """Training-split texts in a fixed pseudo-random order (so a byte cap samples the whole corpus rather than
    its first files), up to ~max_bytes of UTF-8; malformed records are silently left out. For tokenizer training.
    """
    src = sources.build_source(cfg, "train")
    ds = grain.MapDataset.source(src).shuffle(seed=0)
    total = 0
    for i in range(len(ds)):
        try:
            text = sources.record_text(ds[i], cfg.text_field)
        except ValueError:
            continue
        yield text
        total += len(text.encode("utf-8"))
        if max_bytes is not None and total >= max_bytes:
            return


def load_tokenizer_for(data_cfg: DataConfig, tok_cfg: tokenizers_lib.TokenizerConfig,
                       workdir: str) -> tokenizers_lib.Tokenizer:
    """The run's tokenizer: tok_cfg's file, or one trained on data_cfg's training split (cached in workdir)."""
    return tokenizers_lib.load_or_train_tokenizer(
        tok_cfg, workdir, lambda: training_texts(data_cfg, tok_cfg.train_max_bytes))
