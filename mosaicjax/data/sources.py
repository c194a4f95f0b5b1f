"""Random-access record sources (grain `RandomAccessDataSource`: len + __getitem__) and the held-out split.

A source returns *raw* records: dicts {'data', 'path', 'line', 'format'} that remember where they came from, so
that a malformed record fails later (in the tokenize step, possibly in a prefetch thread) with
"path:line: what is wrong". `record_text` turns a raw record into text or raises that ValueError.

'line' is the 1-based line for JSONL, the line of the first bad byte for text files (else 1), the 1-based record
number for ArrayRecord files and the 0-based example index for tfds.

Held-out split: deterministic and machine independent. A text file is held out when crc32 of its path relative to
its glob's root (the stdlib dir for '{stdlib}') falls below eval_fraction * 2**32; a JSONL line / ArrayRecord
record when crc32 of "relpath:line" does; a tfds example by a 32-bit integer hash of its index (vectorised,
because tfds splits can hold billions of examples).
"""
from __future__ import annotations

import bisect
import glob
import json
import logging
import os
import sysconfig
import threading
import zlib
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

STDLIB_TOKEN = "{stdlib}"
_MAX_SKIP_WARNINGS = 20

# ---- skipped-record accounting (on_error='skip') ---------------------------------------------------------------
_skip_lock = threading.Lock()
_skipped = 0


def skipped_records() -> int:
    """How many malformed records this process has dropped since start (or the last reset)."""
    return _skipped


def reset_skipped_records() -> None:
    global _skipped
    with _skip_lock:
        _skipped = 0


def count_skipped(err: Exception) -> None:
    """Records one dropped record; logs the first few so a broken dataset does not go unnoticed."""
    global _skipped
    with _skip_lock:
        _skipped += 1
        n = _skipped
    if n <= _MAX_SKIP_WARNINGS:
        log.warning("skipping malformed record (%d so far): %s", n, err)


# ---- paths ------------------------------------------------------------------------------------------------------
def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _glob_root(pattern: str) -> str:
    """The directory part of `pattern` before its first wildcard: paths are made relative to it."""
    parts = pattern.split(os.sep)
    fixed = []
    for p in parts[:-1]:
        if any(c in p for c in "*?["):
            break
        fixed.append(p)
    return os.sep.join(fixed) or (os.sep if pattern.startswith(os.sep) else ".")


def expand_paths(spec: str | Sequence[str]) -> list[tuple[str, str]]:
    """(path, relative path) of every file matched by comma-separated globs; sorted, without duplicates.

    '{stdlib}' expands to the Python standard library directory; third-party packages installed inside it
    (site-packages, dist-packages) are excluded, because '{stdlib}/**/*.py' means the standard library.
    A glob that matches no file is an error naming it.
    """
    patterns = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p and p.strip()]
    if not patterns:
        raise ValueError("data.paths is empty: give one or more comma-separated globs")
    out: dict[str, str] = {}
    for pattern in patterns:
        is_stdlib = STDLIB_TOKEN in pattern
        expanded = os.path.expanduser(pattern.replace(STDLIB_TOKEN, stdlib_dir()))
        if os.path.isdir(expanded):
            raise ValueError(f"data path {pattern!r} is a directory; give a glob such as {pattern}/**/*.txt")
        root = _glob_root(expanded)
        matches = [m for m in glob.glob(expanded, recursive=True) if os.path.isfile(m)]
        if is_stdlib:
            matches = [m for m in matches
                       if not {"site-packages", "dist-packages"} & set(os.path.relpath(m, root).split(os.sep))]
        if not matches:
            raise FileNotFoundError(f"glob {pattern!r} (expanded to {expanded!r}) matches no files")
        for m in matches:
            out.setdefault(os.path.abspath(m), os.path.relpath(m, root).replace(os.sep, "/"))
    return sorted(out.items())


def heldout_mask_from_crc(crcs: np.ndarray, eval_fraction: float) -> np.ndarray:
    """bool [n]: which records are held out, given their uint32 crc32 keys."""
    return np.asarray(crcs, np.uint64) < np.uint64(int(eval_fraction * 2**32))


def file_crcs(rel_paths: Sequence[str]) -> np.ndarray:
    return np.array([zlib.crc32(r.encode("utf-8")) for r in rel_paths], np.uint64)


def index_hash(n: int) -> np.ndarray:
    """uint32-valued [n] well-mixed hash of 0..n-1 (murmur3's 64-bit finaliser, top 32 bits)."""
    x = np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(33)
        x *= np.uint64(0xFF51AFD7ED558CCD)
        x ^= x >> np.uint64(33)
        x *= np.uint64(0xC4CEB9FE1A85EC53)
        x ^= x >> np.uint64(33)
    return x >> np.uint64(32)


# ---- record -> text ---------------------------------------------------------------------------------------------
def _decode_utf8(data: bytes, path: str, line: int, multiline: bool) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if multiline:  # report the line the bad byte is on
            line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: invalid UTF-8 ({e.reason} at byte {e.start})") from None


def _field_text(obj: Any, text_field: str, where: str) -> str:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object with field {text_field!r}, got {type(obj).__name__}")
    if text_field not in obj:
        keys = ", ".join(sorted(map(str, obj))[:10])
        raise ValueError(f"{where}: missing field {text_field!r} (fields: {keys or 'none'})")
    value = obj[text_field]
    if isinstance(value, np.ndarray) and value.ndim == 0:  # tfds Text features decode to 0-d object arrays
        value = value.item()
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: field {text_field!r} is invalid UTF-8 (byte {e.start})") from None
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {text_field!r} is {type(value).__name__}, expected a string")
    return value


def record_text(record: dict, text_field: str = "text") -> str:
    """The text of a raw record; raises ValueError('path:line: what is wrong') for malformed records."""
    data, path, line, fmt = record["data"], record["path"], record["line"], record["format"]
    where = f"{path}:{line}"
    if fmt == "example":  # tfds: an already-decoded feature dict
        return _field_text(data, text_field, where)
    if fmt == "text":
        return _decode_utf8(data, path, line, multiline=True)
    text = _decode_utf8(data, path, line, multiline=False)
    if fmt == "auto":  # ArrayRecord: JSON when it parses as an object holding the field, else plain text
        if text.lstrip().startswith("{"):
            try:
                obj = json.loads(text)
            except ValueError:
                return text
            if isinstance(obj, dict) and text_field in obj:
                return _field_text(obj, text_field, where)
        return text
    # fmt == 'json'
    if not text.strip():
        return ""  # a blank line is not a document, nor an error
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: bad JSON: {e.msg} (column {e.colno})") from None
    return _field_text(obj, text_field, where)


# ---- sources ----------------------------------------------------------------------------------------------------
class TextFileSource:
    """One document per file; the record holds the file's bytes."""

    def __init__(self, files: Sequence[str]):
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        path = self.files[index]
        with open(path, "rb") as f:
            return {"data": f.read(), "path": path, "line": 1, "format": "text"}

    def __repr__(self) -> str:
        return f"TextFileSource({len(self.files)} files)"


class JsonlSource:
    """One record per non-empty line of JSONL files; line offsets are indexed up front for random access."""

    _CHUNK = 1 << 26  # bytes read at a time while indexing (bounded memory on huge files)

    def __init__(self, files: Sequence[str], rel_paths: Sequence[str] | None = None):
        self.files = list(files)
        self.rel_paths = list(rel_paths) if rel_paths is not None else [os.path.basename(f) for f in self.files]
        file_idx, starts, lengths, lines = [], [], [], []
        for i, path in enumerate(self.files):
            s, n = self._index_file(path)
            keep = n > 0  # empty lines are not records
            file_idx.append(np.full([int(keep.sum())], i, np.int32))
            starts.append(s[keep])
            lengths.append(n[keep])
            lines.append(np.flatnonzero(keep).astype(np.int64) + 1)
        self._file_idx = np.concatenate(file_idx) if file_idx else np.zeros([0], np.int32)
        self._starts = np.concatenate(starts) if starts else np.zeros([0], np.int64)
        self._lengths = np.concatenate(lengths) if lengths else np.zeros([0], np.int64)
        self._lines = np.concatenate(lines) if lines else np.zeros([0], np.int64)
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def _index_file(cls, path: str) -> tuple[np.ndarray, np.ndarray]:
        """(start offset, length without newline) of every line of `path`."""
        newlines = []
        size = 0
        with open(path, "rb") as f:
            while chunk := f.read(cls._CHUNK):
                newlines.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == ord("\n")) + size)
                size += len(chunk)
        nl = np.concatenate(newlines).astype(np.int64) if newlines else np.zeros([0], np.int64)
        starts = np.concatenate([[0], nl + 1]).astype(np.int64)
        ends = np.concatenate([nl, [size]]).astype(np.int64)
        if starts[-1] >= size:  # trailing newline: no last line
            starts, ends = starts[:-1], ends[:-1]
        return starts, ends - starts

    def record_crcs(self) -> np.ndarray:
        """uint32 crc32 of 'relpath:line' per record (the held-out split key)."""
        base = [zlib.crc32(r.encode("utf-8")) for r in self.rel_paths]
        return np.array([zlib.crc32(b":%d" % ln, base[fi]) for fi, ln in zip(self._file_idx, self._lines)],
                        np.uint64)

    def __len__(self) -> int:
        return len(self._starts)

    def _fd(self, file_index: int) -> int:
        fd = self._fds.get(file_index)
        if fd is None:
            with self._lock:
                fd = self._fds.get(file_index)
                if fd is None:
                    fd = self._fds[file_index] = os.open(self.files[file_index], os.O_RDONLY)
        return fd

    def __getitem__(self, index: int) -> dict:
        fi = int(self._file_idx[index])
        # pread: thread-safe positioned read, so prefetch threads can share one descriptor.
        data = os.pread(self._fd(fi), int(self._lengths[index]), int(self._starts[index]))
        if data.endswith(b"\r"):
            data = data[:-1]
        return {"data": data, "path": self.files[fi], "line": int(self._lines[index]), "format": "json"}

    def __getstate__(self):  # file descriptors do not survive pickling (grain worker processes)
        state = dict(self.__dict__)
        state["_fds"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"JsonlSource({len(self.files)} files, {len(self)} records)"


class ArrayRecordSource:
    """Records of ArrayRecord files (via grain's ArrayRecordDataSource): UTF-8 text or JSON objects.

    fmt: 'text', 'json' (an object holding the text field) or 'auto' (JSON if it parses as such an object).
    """

    def __init__(self, files: Sequence[str], rel_paths: Sequence[str] | None = None, fmt: str = "auto"):
        import grain

        self.files = list(files)
        self.rel_paths = list(rel_paths) if rel_paths is not None else [os.path.basename(f) for f in self.files]
        self.fmt = fmt
        # One reader per file so a global index maps back to (file, record number) for error messages.
        self._sources = [grain.sources.ArrayRecordDataSource(f) for f in self.files]
        self._ends = list(np.cumsum([len(s) for s in self._sources]))

    def __len__(self) -> int:
        return int(self._ends[-1]) if self._ends else 0

    def _locate(self, index: int) -> tuple[int, int]:
        fi = bisect.bisect_right(self._ends, index)
        return fi, index - (int(self._ends[fi - 1]) if fi else 0)

    def record_crcs(self) -> np.ndarray:
        out = np.zeros([len(self)], np.uint64)
        start = 0
        for rel, end in zip(self.rel_paths, self._ends):
            base = zlib.crc32(rel.encode("utf-8"))
            out[start:end] = [zlib.crc32(b":%d" % (n + 1), base) for n in range(int(end) - start)]
            start = int(end)
        return out

    def __getitem__(self, index: int) -> dict:
        fi, pos = self._locate(int(index))
        return {"data": self._sources[fi][pos], "path": self.files[fi], "line": pos + 1, "format": self.fmt}

    def __repr__(self) -> str:
        return f"ArrayRecordSource({len(self.files)} files, {len(self)} records)"


class TfdsSource:
    """A tfds split read through `tfds.data_source` (ArrayRecord-backed random access; no TensorFlow needed).

    The dataset must already be prepared in `data_dir` (nothing is downloaded at training time).
    """

    def __init__(self, name: str, split: str, data_dir: str | None = None):
        import tensorflow_datasets as tfds

        self.name, self.split = name, split
        self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
        self._where = f"tfds:{name}/{split}"

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        return {"data": self._source[int(index)], "path": self._where, "line": int(index), "format": "example"}

    def __repr__(self) -> str:
        return f"TfdsSource({self._where}, {len(self)} records)"


class SubsetSource:
    """The records of `parent` at `indices` (a held-out or training subset)."""

    def __init__(self, parent, indices: np.ndarray):
        self.parent = parent
        self.indices = np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.parent[int(self.indices[index])]

    def __repr__(self) -> str:
        return f"SubsetSource({self.parent!r}, {len(self)} records)"


# ---- config -> source -------------------------------------------------------------------------------------------
def _split_records(source, crcs: np.ndarray, split: str, eval_fraction: float):
    held = heldout_mask_from_crc(crcs, eval_fraction)
    return SubsetSource(source, np.flatnonzero(held if split == "eval" else ~held))


def build_source(cfg, split: str):
    """The raw-record source of `split` ('train' or 'eval') described by a DataConfig; None when there is no
    held-out data (eval with neither eval_paths / tfds_eval_split nor eval_fraction)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    frac = float(cfg.eval_fraction)
    if cfg.source == "tfds":
        if not cfg.tfds_name:
            raise ValueError("data.source='tfds' needs data.tfds_name")
        if split == "eval" and cfg.tfds_eval_split:
            return TfdsSource(cfg.tfds_name, cfg.tfds_eval_split, cfg.tfds_data_dir)
        if split == "eval" and frac <= 0:
            return None
        src = TfdsSource(cfg.tfds_name, cfg.tfds_split, cfg.tfds_data_dir)
        if frac > 0 and not cfg.tfds_eval_split:
            return _split_records(src, index_hash(len(src)), split, frac)
        return src

    if split == "eval" and cfg.eval_paths:
        files = expand_paths(cfg.eval_paths)
    elif split == "eval" and frac <= 0:
        return None
    else:
        files = expand_paths(cfg.paths)
        if cfg.eval_paths:  # never train on explicitly held-out files
            held = {p for p, _ in expand_paths(cfg.eval_paths)}
            files = [(p, r) for p, r in files if p not in held]
            if not files:
                raise ValueError(f"every file of data.paths={cfg.paths!r} is also in data.eval_paths")
    paths, rels = [p for p, _ in files], [r for _, r in files]
    split_by_fraction = frac > 0 and not cfg.eval_paths

    if cfg.source == "text_files":
        if split_by_fraction:
            held = heldout_mask_from_crc(file_crcs(rels), frac)
            keep = held if split == "eval" else ~held
            paths = [p for p, k in zip(paths, keep) if k]
        return TextFileSource(paths)
    if cfg.source == "jsonl":
        src = JsonlSource(paths, rels)
    elif cfg.source == "array_record":
        src = ArrayRecordSource(paths, rels, fmt=cfg.record_format)
    else:
        raise ValueError(f"unknown data.source {cfg.source!r}")
    return _split_records(src, src.record_crcs(), split, frac) if split_by_fraction else src
