"""Training metrics: metrics.jsonl (the public record), TensorBoard, optional MLflow, and the progress line.

metrics.jsonl holds one JSON object per logged step: `{"step": S, <metric>: value, ..., "time": unix_seconds}`.
It is strict JSON (RFC 8259): non-finite floats (NaN, +-inf, e.g. a diverged loss) are written as `null`, which
every JSON reader accepts, where Python's default `NaN` token is rejected by most of them. numpy and JAX scalars
are written as Python ints/floats/bools. Fields the trainer logs are documented in DESIGN.md (`step, loss,
learning_rate, grad_norm, tokens_per_sec, mfu, step_time_sec, batch_size, seq_len`); `mfu` is a fraction in [0, 1].

A resumed run continues the same files: `MetricsWriter.truncate_after(S)` (the trainer calls it at start with the
step it resumes from, 0 for a fresh run) drops lines logged after the checkpoint S, including a torn last line left
by a crash, so metrics.jsonl stays one monotone series, and tells TensorBoard to hide events past S (purge_step).
MLflow keeps its own history and cannot delete points; a resumed run logs to the same MLflow run (its id is kept in
DIR/mlflow_run_id) and may show the crashed segment's points twice.

Only the primary process (process index 0) writes anything; other processes get a writer whose methods do nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import numbers
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable, Iterator, Mapping, TextIO

from absl import logging
import gin

MLFLOW_RUN_ID_FILE = 'mlflow_run_id'
TENSORBOARD_DIR = 'tensorboard'


@gin.configurable('metrics')
@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    # Write TensorBoard scalars (tensorboardX) under DIR/tensorboard. metrics.jsonl is written regardless.
    tensorboard: bool = True
    # MLflow tracking server or store (e.g. 'http://mlflow:5000', 'file:///mnt/mlruns', 'databricks'). MLflow is
    # used only when this or `mlflow_experiment` is set (then `pip install mlflow` is required); None with an
    # experiment set uses MLflow's default (MLFLOW_TRACKING_URI, else ./mlruns).
    mlflow_tracking_uri: str | None = None
    # MLflow experiment name, created when missing. None with a tracking URI set: MLflow's 'Default' experiment.
    mlflow_experiment: str | None = None
    # File name, inside the workdir, of the JSON-lines metrics record.
    jsonl_name: str = 'metrics.jsonl'

    @property
    def mlflow_enabled(self) -> bool:
        return self.mlflow_tracking_uri is not None or self.mlflow_experiment is not None


# ------------------------------------------------------------------------------------------------ value handling


def to_python(value: Any) -> Any:
    """A JSON-ready Python scalar for a metric value: numpy/JAX scalars unwrapped, non-finite floats -> None.

    Strings pass through (the JSONL record may carry labels); anything with more than one element is an error.
    """
    if value is None or isinstance(value, str):
        return value
    if hasattr(value, 'shape') and hasattr(value, 'item'):  # numpy / JAX arrays and numpy scalars.
        if getattr(value, 'size', 1) != 1:
            raise ValueError(f'metric values must be scalars, got an array of shape {tuple(value.shape)}')
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    raise TypeError(f'metric values must be numbers or strings, got {type(value).__name__}: {value!r}')


def _numeric(value: Any) -> float | None:
    """The float a scalar logger (TensorBoard, MLflow) should record for `value`, or None to skip it."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, 'item') and getattr(value, 'size', 1) == 1:
        return _numeric(value.item())
    return None


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, skipping a torn (unparseable) line a crash may have left."""
    return [record for record, _ in _iter_records(path)]


def _ends_with_newline(path: str) -> bool:
    """True for a missing or empty file or one whose last byte is a newline."""
    try:
        with open(path, 'rb') as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return True
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b'\n'
    except FileNotFoundError:
        return True


def _iter_records(path: str) -> Iterator[tuple[dict[str, Any], str]]:
    if not os.path.exists(path):
        return
    with open(path, encoding='utf-8') as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue  # A partial line from a crash mid-write.
            if isinstance(record, dict):
                yield record, line if line.endswith('\n') else line + '\n'


# -------------------------------------------------------------------------------------------------------- writer


class MetricsWriter:
    """Appends metrics to DIR/metrics.jsonl and mirrors them to TensorBoard and (when configured) MLflow.

    Args:
      workdir: the run directory.
      config: MetricsConfig; default `MetricsConfig()` (i.e. the gin bindings of `metrics`).
      is_primary: only the primary process writes; on the others every method is a no-op.
      run_config_text: the operative gin config; added to TensorBoard as text and to MLflow as the artifact
        config.gin (plus its single-line bindings as MLflow params).
    """

    def __init__(self, workdir: str, config: MetricsConfig | None = None, *, is_primary: bool = True,
                 run_config_text: str | None = None):
        self.workdir = workdir
        self.config = config if config is not None else MetricsConfig()
        self.is_primary = is_primary
        self.run_config_text = run_config_text
        self.jsonl_path = os.path.join(workdir, self.config.jsonl_name)
        self._jsonl: TextIO | None = None
        self._tb: Any = None
        self._tb_disabled = not self.config.tensorboard
        self._purge_step: int | None = None
        self._mlflow_client: Any = None
        self._mlflow_run_id: str | None = None
        self._closed = False
        if not is_primary:
            return
        os.makedirs(workdir, exist_ok=True)
        if self.config.mlflow_enabled:
            self._start_mlflow()  # Fail fast (missing package, unreachable server) before any training work.

    # -- JSONL ----------------------------------------------------------------------------------------------

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Logs `metrics` at `step`: one JSON line (flushed), TensorBoard scalars, MLflow metrics.

        A `step` key inside `metrics` is allowed (the trainer's record carries one) but must agree with `step`.
        """
        if not self.is_primary:
            return
        if self._closed:
            raise RuntimeError('MetricsWriter.write after close()')
        step = int(step)
        if 'step' in metrics and to_python(metrics['step']) != step:
            raise ValueError(f"metrics['step']={metrics['step']!r} disagrees with step={step}")
        record: dict[str, Any] = {'step': step}
        for key, value in metrics.items():
            if key != 'step':
                record[str(key)] = to_python(value)
        record.setdefault('time', round(time.time(), 3))
        if self._jsonl is None:
            torn = not _ends_with_newline(self.jsonl_path)
            self._jsonl = open(self.jsonl_path, 'a', encoding='utf-8')
            if torn:  # Never glue a new record onto a crash's partial line; readers skip the partial one.
                self._jsonl.write('\n')
        self._jsonl.write(json.dumps(record, allow_nan=False) + '\n')
        self._jsonl.flush()  # A crash loses at most the line being written; truncate_after drops a torn one.

        scalars = {k: v for k, v in ((k, _numeric(v)) for k, v in metrics.items() if k not in ('step', 'time'))
                   if v is not None}
        self._write_tensorboard(step, scalars)
        self._write_mlflow(step, scalars)

    def truncate_after(self, step: int) -> int:
        """Drops metrics.jsonl lines with step > `step` (and a torn last line); returns how many were dropped.

        Call at start with the step the run resumes from (0 for a fresh run). TensorBoard events past `step` are
        hidden too: the TensorBoard writer (re)opens with purge_step = step + 1.
        """
        if not self.is_primary:
            return 0
        step = int(step)
        self._purge_step = step + 1
        if self._tb is not None:  # Reopen so the purge marker is written before the next scalar.
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if not os.path.exists(self.jsonl_path):
            return 0
        with open(self.jsonl_path, encoding='utf-8') as f:
            total = sum(1 for line in f if line.strip())
        kept = [line for record, line in _iter_records(self.jsonl_path)
                if isinstance(record.get('step'), int) and record['step'] <= step]
        dropped = total - len(kept)
        if dropped or not _ends_with_newline(self.jsonl_path):
            # Write-then-rename: a crash during the rewrite leaves the old file, never a half-written one.
            fd, tmp = tempfile.mkstemp(prefix='.metrics.', dir=os.path.dirname(self.jsonl_path) or '.')
            with os.fdopen(fd, 'w', encoding='utf-8') as f:
                f.writelines(kept)
            os.replace(tmp, self.jsonl_path)
            logging.info('metrics: dropped %d line(s) past step %d from %s', dropped, step, self.jsonl_path)
        return dropped

    # -- TensorBoard -----------------------------------------------------------------------------------------

    def _write_tensorboard(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._tb_disabled:
            return
        if self._tb is None:
            try:
                import tensorboardX  # Deferred: it imports torch when present (~2 s).
            except Exception as e:  # pylint: disable=broad-except  (a broken torch raises OSError, not ImportError)
                logging.warning('metrics: TensorBoard disabled, tensorboardX failed to import: %s', e)
                print(f'metrics: TensorBoard disabled, tensorboardX failed to import: {e}', file=sys.stderr,
                      flush=True)
                self._tb_disabled = True
                return
            # Event files are named by the second they were opened in; the nanosecond suffix keeps a writer
            # reopened within that second (a quick resume) from overwriting the previous file, in order.
            self._tb = tensorboardX.SummaryWriter(
                logdir=os.path.join(self.workdir, TENSORBOARD_DIR), purge_step=self._purge_step, flush_secs=30,
                filename_suffix=f'.{time.time_ns()}')
            if self.run_config_text and self._purge_step in (None, 1):  # Once per run, not on every resume.
                self._tb.add_text('config', _markdown_code(self.run_config_text), global_step=0)
        for key, value in scalars.items():
            self._tb.add_scalar(key, value, global_step=step)
        self._tb.flush()

    # -- MLflow ----------------------------------------------------------------------------------------------

    def _start_mlflow(self) -> None:
        try:
            from mlflow.tracking import MlflowClient  # Optional dependency: imported only when configured.
        except ImportError as e:
            raise ImportError(
                'MLflow logging is configured (metrics.mlflow_tracking_uri='
                f'{self.config.mlflow_tracking_uri!r}, metrics.mlflow_experiment={self.config.mlflow_experiment!r}) '
                'but mlflow is not installed: run `pip install mlflow`, or leave both bindings unset.') from e
        client = MlflowClient(tracking_uri=self.config.mlflow_tracking_uri)
        name = self.config.mlflow_experiment or 'Default'
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(name)
        id_path = os.path.join(self.workdir, MLFLOW_RUN_ID_FILE)
        run_id = None
        if os.path.exists(id_path):  # A resumed run continues its MLflow run.
            with open(id_path) as f:
                run_id = f.read().strip() or None
            if run_id is not None:
                try:
                    client.get_run(run_id)
                except Exception as e:  # pylint: disable=broad-except  (another server, or a deleted run)
                    logging.warning('metrics: MLflow run %s from %s not found (%s); starting a new run',
                                    run_id, id_path, e)
                    run_id = None
        if run_id is None:
            run = client.create_run(experiment_id, run_name=os.path.basename(os.path.abspath(self.workdir)),
                                    tags={'mosaicjax.workdir': os.path.abspath(self.workdir)})
            run_id = run.info.run_id
            with open(id_path, 'w') as f:
                f.write(run_id + '\n')
        else:
            client.update_run(run_id, status='RUNNING')
        self._mlflow_client, self._mlflow_run_id = client, run_id
        if self.run_config_text:
            self._mlflow_call(client.log_text, run_id, self.run_config_text, 'config.gin')
            from mlflow.entities import Param

            params = [Param(k, v) for k, v in gin_bindings(self.run_config_text).items()]
            for i in range(0, len(params), 100):  # MLflow's per-batch limit.
                self._mlflow_call(client.log_batch, run_id, params=params[i:i + 100])

    def _write_mlflow(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._mlflow_client is None:
            return
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        metrics = [Metric(_mlflow_key(k), v, now_ms, step) for k, v in scalars.items() if math.isfinite(v)]
        for i in range(0, len(metrics), 1000):  # MLflow's per-batch limit.
            self._mlflow_call(self._mlflow_client.log_batch, self._mlflow_run_id, metrics=metrics[i:i + 1000])

    def _mlflow_call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        # A tracking-server hiccup must not kill a long run: metrics.jsonl remains the complete record.
        try:
            fn(*args, **kwargs)
        except Exception as e:  # pylint: disable=broad-except
            logging.warning('metrics: MLflow %s failed: %s', getattr(fn, '__name__', fn), e)

    # -- lifecycle -------------------------------------------------------------------------------------------

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flushes and closes every sink (idempotent); marks the MLflow run finished."""
        if self._closed:
            return
        self._closed = True
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._mlflow_client is not None:
            self._mlflow_call(self._mlflow_client.set_terminated, self._mlflow_run_id)
            self._mlflow_client = None

    def __enter__(self) -> 'MetricsWriter':
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _markdown_code(text: str) -> str:
    return '\n'.join('    ' + line for line in text.splitlines())  # TensorBoard renders text as markdown.


def _mlflow_key(key: str) -> str:
    return re.sub(r'[^\w\-. /]', '_', key)  # MLflow accepts alphanumerics, _ - . space and /.


_BINDING = re.compile(r'^([A-Za-z_][\w./]*)\s*=\s*(.+?)\s*$')


def gin_bindings(config_text: str, max_len: int = 500) -> dict[str, str]:
    """The single-line `name.param = value` bindings of a gin config (multi-line values are in the artifact)."""
    out = {}
    for line in config_text.splitlines():
        m = _BINDING.match(line)
        if m and not m.group(2).endswith(('{', '[', '(', '\\')):
            out[m.group(1)] = m.group(2)[:max_len]
    return out


# ----------------------------------------------------------------------------------------------- progress line


def _human(value: float) -> str:
    """12345 -> '12.3k' (throughputs)."""
    for scale, suffix in ((1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
        if abs(value) >= scale:
            return f'{value / scale:.1f}{suffix}'
    return f'{value:.0f}'


def format_duration(seconds: float) -> str:
    """101 -> '1m41s', 7500 -> '2h05m', 97200 -> '1d03h'."""
    if not math.isfinite(seconds):
        return '?'
    s = max(0, int(round(seconds)))
    if s < 60:
        return f'{s}s'
    if s < 3600:
        return f'{s // 60}m{s % 60:02d}s'
    if s < 86400:
        return f'{s // 3600}h{s % 3600 // 60:02d}m'
    return f'{s // 86400}d{s % 86400 // 3600:02d}h'


def _format_value(value: Any) -> str:
    if hasattr(value, 'item') and getattr(value, 'size', 1) == 1:
        value = value.item()  # numpy / JAX scalars
    if isinstance(value, float):
        return f'{value:.3f}' if value == 0 or 1e-3 <= abs(value) < 1e5 else f'{value:.3e}'
    return str(value)


class ProgressLogger:
    """Formats one progress line per logged step:

        step 120/600 | loss 3.412 | 12.3k tok/s | mfu 4.1% | 0.21 s/step | eta 1m41s

    s/step is the record's `step_time_sec`. The ETA is (total_steps - step) times a moving average of the wall-clock
    time per step between successive `line` calls over the last `window` intervals; the interval up to the first
    call is left out, since it holds compilation and the first step. Until a second call exists the ETA uses the
    record's `step_time_sec`. Fields missing from the record are left out of the line.

    Args:
      total_steps: the run's last step (`train.num_steps`).
      start_step: the step the run (re)started from.
      keys: record fields printed after the step counter, as `name value`.
      window: intervals in the moving average.
      clock: seconds, monotonic; injectable for tests.
    """

    def __init__(self, total_steps: int, start_step: int = 0, *,
                 keys: tuple[str, ...] = ('loss', 'eval_loss', 'eval_bits_per_byte'),
                 window: int = 20, clock: Callable[[], float] = time.monotonic):
        self.total_steps = int(total_steps)
        self.start_step = int(start_step)
        self.keys = tuple(keys)
        self.clock = clock
        self._last: tuple[float, int] | None = None  # (time, step) of the previous call.
        self._intervals: collections.deque[tuple[float, int]] = collections.deque(maxlen=window)

    def _observe(self, step: int) -> None:
        now = self.clock()
        if self._last is not None and step > self._last[1]:
            self._intervals.append((now - self._last[0], step - self._last[1]))
        self._last = (now, step)

    def seconds_per_step(self) -> float | None:
        """The moving-average wall-clock seconds per step, or None before two calls."""
        steps = sum(n for _, n in self._intervals)
        return sum(dt for dt, _ in self._intervals) / steps if steps else None

    def eta_seconds(self, step: int, fallback_step_time: float | None = None) -> float | None:
        per_step = self.seconds_per_step()
        if per_step is None:
            per_step = fallback_step_time
        if per_step is None or not math.isfinite(per_step):
            return None
        return max(0, self.total_steps - step) * per_step

    def line(self, step: int, metrics: Mapping[str, Any]) -> str:
        """The progress line for `step` (also advances the ETA's moving average: call once per logged step)."""
        step = int(step)
        self._observe(step)
        parts = [f'step {step}/{self.total_steps}']
        for key in self.keys:
            if key in metrics and metrics[key] is not None:
                parts.append(f'{key} {_format_value(metrics[key])}')
        tok = _numeric(metrics.get('tokens_per_sec'))
        if tok is not None:
            parts.append(f'{_human(tok)} tok/s')
        mfu = _numeric(metrics.get('mfu'))
        if mfu is not None and math.isfinite(mfu):
            parts.append(f'mfu {100 * mfu:.1f}%')
        step_time = _numeric(metrics.get('step_time_sec'))
        if step_time is not None:
            parts.append(f'{step_time:.2f} s/step' if step_time >= 0.1 else f'{step_time:.3g} s/step')
        eta = self.eta_seconds(step, step_time)
        parts.append(f'eta {format_duration(eta) if eta is not None else "?"}')
        return ' | '.join(parts)

    def log(self, step: int, metrics: Mapping[str, Any], file: TextIO | None = None) -> str:
        """Prints `line(step, metrics)` to stderr (flushed, so a parent process sees it at once); returns it."""
        text = self.line(step, metrics)
        print(text, file=file if file is not None else sys.stderr, flush=True)
        return text
