"""Reading and writing Hugging Face weight files, one tensor (or one slice of a tensor) at a time.

Reading: `open_weights(folder)` returns a `WeightReader` over
  * sharded safetensors: `model.safetensors.index.json` + `model-0000N-of-0000M.safetensors`,
  * a single `model.safetensors` (or any `*.safetensors` files in the folder),
  * pickled PyTorch files (`pytorch_model*.bin`, `*.pt`, `*.pth`) only with allow_pickle=True: unpickling runs
    arbitrary code from the file, so it is refused by default with a message that names the flag.
Safetensors files are opened with `safe_open` and read lazily: `read(name, index)` touches only the bytes of the
requested slice, so a loader can lay a 100 GB checkpoint onto devices shard by shard with one shard in host memory.

Writing: `save_sharded(folder, names, nbytes, get)` writes `model-0000N-of-0000M.safetensors` files of at most
`max_shard_size` bytes each (a bigger single tensor gets a shard of its own) plus `model.safetensors.index.json`,
or a single `model.safetensors` when everything fits in one shard, as transformers' save_pretrained does.
Only one shard's tensors are materialised at a time.
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys
import time
from typing import Callable, Mapping, Sequence

import numpy as np

INDEX_NAME = 'model.safetensors.index.json'
SINGLE_NAME = 'model.safetensors'
PICKLE_PATTERNS = ('pytorch_model*.bin', '*.bin', '*.pt', '*.pth')
PICKLE_INDEX_NAME = 'pytorch_model.bin.index.json'

# safetensors dtype strings -> numpy dtype names (bfloat16 through ml_dtypes).
_ST_DTYPES = {'F64': 'float64', 'F32': 'float32', 'F16': 'float16', 'BF16': 'bfloat16', 'I64': 'int64',
              'I32': 'int32', 'I16': 'int16', 'I8': 'int8', 'U8': 'uint8', 'BOOL': 'bool'}


class PickleRefusedError(ValueError):
    """A folder holds only pickled PyTorch weights and allow_pickle was not given."""


def np_dtype(name) -> np.dtype:
    """numpy dtype for a name such as 'float32' or 'bfloat16' (bfloat16 via ml_dtypes)."""
    if str(name) in ('bfloat16', 'bf16'):
        import ml_dtypes  # pylint: disable=import-outside-toplevel
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def parse_size(size: int | str) -> int:
    """Bytes in `size`: an int, or a string like '5GB' (10^9), '5GiB' (2^30), '200MB', '40KB' as HF writes them."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r'\s*([0-9.]+)\s*([KMGT]?)(I?)B?\s*', str(size).upper())
    if not m:
        raise ValueError(f'cannot parse a size from {size!r}; use an int or e.g. "5GB", "500MB", "2GiB"')
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** ' KMGT'.index(m.group(2) or ' '))


class WeightReader:
    """Name -> tensor access over a folder's weight files. Subclasses implement the four primitives."""

    files: list[str]

    def keys(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, name: str) -> np.dtype:
        raise NotImplementedError

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """The tensor `name` (or its sub-block `index`, a tuple of slices) as a numpy array."""
        raise NotImplementedError

    def nbytes(self, name: str) -> int:
        return int(np.prod(self.shape(name), dtype=np.int64)) * self.dtype(name).itemsize

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SafetensorsReader(WeightReader):
    """Lazy reader over one or more safetensors files (safe_open handles are opened once and kept)."""

    def __init__(self, files: Sequence[str], weight_map: Mapping[str, str] | None = None):
        from safetensors import safe_open  # pylint: disable=import-outside-toplevel
        self.files = list(files)
        self._handles = {f: safe_open(f, framework='numpy') for f in self.files}
        self._where: dict[str, str] = {}
        for f, h in self._handles.items():
            for k in h.keys():
                if k in self._where:
                    raise ValueError(f'tensor {k!r} is stored twice: in {self._where[k]} and {f}')
                self._where[k] = f
        if weight_map is not None:
            wrong = {k: v for k, v in weight_map.items()
                     if os.path.basename(self._where.get(k, '')) != os.path.basename(v)}
            if wrong:
                k = next(iter(wrong))
                raise ValueError(f'{INDEX_NAME} maps {len(wrong)} tensor(s) to files that do not hold them, '
                                 f'e.g. {k!r} -> {wrong[k]} (found in {self._where.get(k, "no file")})')
        self._meta: dict[str, tuple[tuple[int, ...], np.dtype]] = {}

    def _info(self, name):
        if name not in self._meta:
            if name not in self._where:
                raise KeyError(f'no tensor named {name!r} in {", ".join(map(os.path.basename, self.files))}')
            s = self._handles[self._where[name]].get_slice(name)
            self._meta[name] = (tuple(int(d) for d in s.get_shape()), np_dtype(_ST_DTYPES[s.get_dtype()]))
        return self._meta[name]

    def keys(self):
        return list(self._where)

    def shape(self, name):
        return self._info(name)[0]

    def dtype(self, name):
        return self._info(name)[1]

    def read(self, name, index=None):
        self._info(name)
        h = self._handles[self._where[name]]
        if index is None or all(s == slice(None) for s in index):
            return np.asarray(h.get_tensor(name))
        return np.asarray(h.get_slice(name)[tuple(index)])

    def close(self):
        self._handles.clear()


class TorchPickleReader(WeightReader):
    """Pickled PyTorch state dicts (needs torch). Zip-format files are memory-mapped and stay open (the OS pages
    tensors in and out); legacy-format files are loaded whole, one at a time."""

    def __init__(self, files: Sequence[str]):
        try:
            import torch  # pylint: disable=import-outside-toplevel
        except ImportError as e:
            raise ImportError('reading pickled .bin/.pt checkpoints needs PyTorch: pip install torch') from e
        self._torch = torch
        self.files = list(files)
        self._where: dict[str, str] = {}
        self._mapped: dict[str, dict] = {}
        self._loaded: tuple[str, dict] | None = None
        for f in self.files:
            for k in self._load(f):
                self._where[k] = f

    def _torch_load(self, f, mmap):
        try:  # plain state dicts need no code execution; only fall back to full unpickling when they do
            return self._torch.load(f, map_location='cpu', mmap=mmap, weights_only=True)
        except self._torch.serialization.pickle.UnpicklingError:
            return self._torch.load(f, map_location='cpu', mmap=mmap, weights_only=False)

    def _load(self, f):
        if f in self._mapped:
            return self._mapped[f]
        if self._loaded is not None and self._loaded[0] == f:
            return self._loaded[1]
        try:
            sd, mapped = self._torch_load(f, True), True
        except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
            sd, mapped = self._torch_load(f, False), False
        if isinstance(sd, dict) and isinstance(sd.get('state_dict'), dict):
            sd = sd['state_dict']
        if mapped:
            self._mapped[f] = sd
        else:
            self._loaded = (f, sd)
        return sd

    def _tensor(self, name):
        if name not in self._where:
            raise KeyError(f'no tensor named {name!r} in {", ".join(map(os.path.basename, self.files))}')
        return self._load(self._where[name])[name]

    def keys(self):
        return list(self._where)

    def shape(self, name):
        return tuple(self._tensor(name).shape)

    def dtype(self, name):
        return np_dtype(str(self._tensor(name).dtype).replace('torch.', ''))

    def read(self, name, index=None):
        t = self._tensor(name).detach()
        if index is not None:
            t = t[tuple(index)]
        if t.dtype == self._torch.bfloat16:  # numpy has no bf16: reinterpret the bits
            return t.contiguous().view(self._torch.int16).numpy().view(np_dtype('bfloat16'))
        return t.contiguous().numpy()

    def close(self):
        self._loaded = None
        self._mapped.clear()


def pickle_files(folder: str) -> list[str]:
    found: list[str] = []
    for pattern in PICKLE_PATTERNS:
        found += [f for f in sorted(glob.glob(os.path.join(folder, pattern))) if f not in found]
    # Optimizer/scheduler/RNG pickles that trainers leave next to the weights are not weights.
    return [f for f in found if not re.search(r'(optimizer|scheduler|rng_state|training_args)', os.path.basename(f))]


def open_weights(folder: str, *, allow_pickle: bool = False) -> WeightReader:
    """A reader over `folder`'s weights: safetensors preferred; pickles only with allow_pickle=True."""
    index_path = os.path.join(folder, INDEX_NAME)
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)['weight_map']
        files = sorted({os.path.join(folder, v) for v in weight_map.values()})
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise FileNotFoundError(f'{index_path} lists shard(s) that are not in the folder: '
                                    f'{", ".join(map(os.path.basename, missing))}')
        return SafetensorsReader(files, weight_map)
    if os.path.exists(os.path.join(folder, SINGLE_NAME)):
        return SafetensorsReader([os.path.join(folder, SINGLE_NAME)])
    st = sorted(glob.glob(os.path.join(folder, '*.safetensors')))
    if st:
        return SafetensorsReader(st)
    pk = pickle_files(folder)
    if pk:
        if not allow_pickle:
            raise PickleRefusedError(
                f'{folder} holds only pickled PyTorch weights ({", ".join(map(os.path.basename, pk[:3]))}'
                f'{" ..." if len(pk) > 3 else ""}). Unpickling can run arbitrary code from the file, so it is off '
                f'by default: pass allow_pickle=True (CLI: --allow_pickle) if you trust the source, or convert '
                f'the folder to safetensors.')
        return TorchPickleReader(pk)
    raise FileNotFoundError(f'no weights in {folder}: expected {INDEX_NAME}, {SINGLE_NAME}, *.safetensors '
                            f'(or pickled *.bin/*.pt with allow_pickle)')


# ----------------------------------------------------------------------------------------------------------
# Writing


def plan_shards(names: Sequence[str], nbytes: Mapping[str, int], max_shard_size: int) -> list[list[str]]:
    """Greedy, order-preserving split into shards of <= max_shard_size bytes (an oversized tensor stands alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        if shards[-1] and size + nbytes[n] > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes[n]
    return shards


def save_sharded(folder: str, names: Sequence[str], nbytes: Mapping[str, int],
                 get: Callable[[str], np.ndarray], *, max_shard_size: int | str = '5GB',
                 metadata: Mapping[str, str] | None = None, progress: bool = True) -> list[str]:
    """Writes tensors `names` (fetched one shard at a time with `get`) as HF safetensors; returns the files.

    `nbytes[name]` must be the tensor's size in bytes as written (it decides the sharding before any tensor is
    fetched, so the shard count is known for the file names).
    """
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    os.makedirs(folder, exist_ok=True)
    shards = plan_shards(list(names), nbytes, parse_size(max_shard_size))
    meta = {'format': 'pt', **(metadata or {})}  # transformers expects format 'pt' on safetensors it loads
    report = Progress('writing', len(names), sum(nbytes[n] for n in names), enabled=progress)
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = SINGLE_NAME if len(shards) == 1 else f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
        tensors = {}
        for n in shard:
            a = np.ascontiguousarray(get(n))
            if a.nbytes != nbytes[n]:
                raise ValueError(f'{n}: {a.nbytes} bytes, but {nbytes[n]} were announced')
            tensors[n] = a
            weight_map[n] = fname
        path = os.path.join(folder, fname)
        save_file(tensors, path + '.tmp', metadata=meta)
        os.replace(path + '.tmp', path)  # a reader never sees a half-written shard
        for n in shard:
            report.update(nbytes[n])
        del tensors
        files.append(path)
    if len(shards) > 1:
        index = {'metadata': {'total_size': int(sum(nbytes[n] for n in names))}, 'weight_map': weight_map}
        with open(os.path.join(folder, INDEX_NAME), 'w') as f:
            json.dump(index, f, indent=2, sort_keys=True)
    report.done()
    return files


class Progress:
    """'loading: 12/27 tensors, 0.41/1.20 GB, 3.1s' to stderr: in place on a terminal, else every ~10% as lines."""

    def __init__(self, what: str, total_items: int, total_bytes: int, *, enabled: bool = True):
        self.what, self.total_items, self.total_bytes = what, total_items, max(total_bytes, 1)
        self.items = self.bytes = 0
        self.enabled = enabled and total_items > 0
        self._tty = sys.stderr.isatty()
        self._next_pct = 10
        self._t0 = time.perf_counter()

    def _line(self):
        unit, div = next((u, d) for u, d in (('GB', 1e9), ('MB', 1e6), ('KB', 1e3), ('B', 1))
                         if self.total_bytes >= d)
        return (f'{self.what}: {self.items}/{self.total_items} tensors, {self.bytes / div:.2f}/'
                f'{self.total_bytes / div:.2f} {unit}, {time.perf_counter() - self._t0:.1f}s')

    def update(self, nbytes: int, items: int = 1) -> None:
        self.items += items
        self.bytes += nbytes
        if not self.enabled:
            return
        if self._tty:
            print('\r' + self._line(), end='', file=sys.stderr, flush=True)
        elif 100 * self.bytes / self.total_bytes >= self._next_pct and self.items < self.total_items:
            print(self._line(), file=sys.stderr, flush=True)
            self._next_pct = (100 * self.bytes // self.total_bytes // 10 + 1) * 10

    def done(self) -> None:
        if self.enabled:
            print(('\r' if self._tty else '') + self._line(), file=sys.stderr, flush=True)
