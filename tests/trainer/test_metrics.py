"""metrics.jsonl, resume truncation, TensorBoard events, optional MLflow, and the progress line."""
import glob
import json
import math
import os
import struct
import sys
import types

import gin
import jax.numpy as jnp
import numpy as np
import pytest

from mosaicjax.trainer import metrics as metrics_lib
from mosaicjax.trainer.metrics import MetricsConfig, MetricsWriter, ProgressLogger

CONTRACT_FIELDS = ('step', 'loss', 'learning_rate', 'grad_norm', 'tokens_per_sec', 'mfu', 'step_time_sec',
                   'batch_size', 'seq_len')
NO_TB = MetricsConfig(tensorboard=False)


def _strict_lines(path):
    def reject(token):
        raise AssertionError(f'non-JSON constant {token} in metrics.jsonl')

    with open(path) as f:
        return [json.loads(line, parse_constant=reject) for line in f]


def _record(step, loss=3.0):
    return {'step': step, 'loss': loss, 'learning_rate': 1e-3, 'grad_norm': 0.5, 'tokens_per_sec': 1234.5,
            'mfu': 0.041, 'step_time_sec': 0.21, 'batch_size': 8, 'seq_len': 128}


def test_jsonl_has_contract_fields_and_python_types(tmp_path):
    with MetricsWriter(str(tmp_path), NO_TB) as w:
        rec = _record(10)
        rec.update(loss=np.float32(2.5), grad_norm=jnp.asarray(0.25), batch_size=np.int64(8), learning_rate=jnp.ones(()))
        w.write(10, rec)
        w.write(20, {'loss': 2.0, 'eval_loss': 2.1, 'note': 'eval'})
    lines = _strict_lines(tmp_path / 'metrics.jsonl')
    assert len(lines) == 2
    assert set(CONTRACT_FIELDS) <= set(lines[0])
    assert lines[0]['step'] == 10 and lines[0]['loss'] == 2.5 and lines[0]['grad_norm'] == 0.25
    assert lines[0]['batch_size'] == 8 and isinstance(lines[0]['batch_size'], int)
    assert lines[0]['learning_rate'] == 1.0
    assert isinstance(lines[0]['time'], float)
    assert lines[1] == {**lines[1], 'step': 20, 'eval_loss': 2.1, 'note': 'eval'}


def test_each_line_is_flushed_before_close(tmp_path):
    w = MetricsWriter(str(tmp_path), NO_TB)
    w.write(1, {'loss': 1.0})
    assert _strict_lines(tmp_path / 'metrics.jsonl')[0]['loss'] == 1.0
    w.close()
    w.close()  # idempotent


def test_non_finite_values_are_null(tmp_path):
    with MetricsWriter(str(tmp_path), NO_TB) as w:
        w.write(1, {'loss': float('nan'), 'grad_norm': np.inf, 'mfu': -np.float32('inf'), 'ok': 1.0})
    (line,) = _strict_lines(tmp_path / 'metrics.jsonl')
    assert line['loss'] is None and line['grad_norm'] is None and line['mfu'] is None and line['ok'] == 1.0


def test_rejects_bad_values_and_disagreeing_step(tmp_path):
    with MetricsWriter(str(tmp_path), NO_TB) as w:
        with pytest.raises(ValueError, match='scalars'):
            w.write(1, {'loss': np.ones(3)})
        with pytest.raises(ValueError, match='disagrees'):
            w.write(2, {'step': 3, 'loss': 1.0})
        with pytest.raises(TypeError):
            w.write(2, {'loss': [1.0]})


def test_non_primary_writes_nothing(tmp_path):
    workdir = tmp_path / 'run'
    w = MetricsWriter(str(workdir), MetricsConfig(mlflow_experiment='x'), is_primary=False)  # no mlflow needed
    w.write(1, {'loss': 1.0})
    assert w.truncate_after(0) == 0
    w.close()
    assert not workdir.exists()


def test_truncate_after_drops_lines_past_the_checkpoint(tmp_path):
    with MetricsWriter(str(tmp_path), NO_TB) as w:
        for step in (10, 20, 30, 40, 50):
            w.write(step, _record(step))
    with open(tmp_path / 'metrics.jsonl', 'a') as f:
        f.write('{"step": 60, "loss": 1.')  # a crash mid-write
    # The run crashed after checkpoint 30 and resumes from it.
    w = MetricsWriter(str(tmp_path), NO_TB)
    assert w.truncate_after(30) == 3
    assert [r['step'] for r in _strict_lines(tmp_path / 'metrics.jsonl')] == [10, 20, 30]
    for step in (40, 50):
        w.write(step, _record(step, loss=1.0))
    w.close()
    lines = _strict_lines(tmp_path / 'metrics.jsonl')
    assert [r['step'] for r in lines] == [10, 20, 30, 40, 50]
    assert [r['loss'] for r in lines] == [3.0, 3.0, 3.0, 1.0, 1.0]
    # Nothing to drop: the file is left alone; a fresh run drops everything; no file is fine.
    mtime = os.stat(tmp_path / 'metrics.jsonl').st_mtime_ns
    assert MetricsWriter(str(tmp_path), NO_TB).truncate_after(50) == 0
    assert os.stat(tmp_path / 'metrics.jsonl').st_mtime_ns == mtime
    assert MetricsWriter(str(tmp_path), NO_TB).truncate_after(0) == 5
    assert _strict_lines(tmp_path / 'metrics.jsonl') == []
    assert MetricsWriter(str(tmp_path / 'new'), NO_TB).truncate_after(7) == 0


def test_append_never_glues_onto_a_partial_line(tmp_path):
    (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    with MetricsWriter(str(tmp_path), NO_TB) as w:  # a caller that skipped truncate_after
        w.write(3, {'loss': 3.0})
    assert [r['step'] for r in metrics_lib.read_jsonl(str(tmp_path / 'metrics.jsonl'))] == [1, 3]


def _read_events(logdir):
    """Every Event in the TFRecord event files under `logdir`, oldest file first."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))):
        with open(path, 'rb') as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack('<Q', data[pos:pos + 8])
            pos += 12  # length + its masked CRC
            event = event_pb2.Event()
            event.ParseFromString(data[pos:pos + length])
            events.append(event)
            pos += length + 4  # payload + its masked CRC
    return events


def _scalars(events):
    return [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value if v.HasField('simple_value')]


def test_tensorboard_scalars_and_resume_purge(tmp_path):
    logdir = tmp_path / 'tensorboard'
    with MetricsWriter(str(tmp_path), MetricsConfig(), run_config_text='train.num_steps = 5\n') as w:
        w.truncate_after(0)
        w.write(1, {'step': 1, 'loss': 2.5, 'mfu': np.float32(0.25), 'note': 'text is not a scalar'})
        w.write(2, {'loss': float('nan')})
        w.write(3, {'loss': 1.5})
    files = glob.glob(str(logdir / 'events.out.tfevents.*'))
    assert len(files) == 1 and os.path.getsize(files[0]) > 0
    events = _read_events(str(logdir))
    scalars = _scalars(events)
    assert (1, 'loss', 2.5) in scalars and (1, 'mfu', 0.25) in scalars and (3, 'loss', 1.5) in scalars
    assert any(step == 2 and tag == 'loss' and math.isnan(v) for step, tag, v in scalars)
    assert {tag for _, tag, _ in scalars} == {'loss', 'mfu'}
    assert any(v.tag.startswith('config') for e in events for v in e.summary.value)

    # Resume from step 2: the new event file starts with a purge marker hiding the crashed run's step 3.
    with MetricsWriter(str(tmp_path), MetricsConfig()) as w:
        w.truncate_after(2)
        w.write(3, {'loss': 1.25})
    events = _read_events(str(logdir))
    starts = [e.step for e in events if e.HasField('session_log') and e.session_log.status == 1]
    assert starts == [1, 3]
    assert _scalars(events)[-1] == (3, 'loss', 1.25)


def test_tensorboard_off(tmp_path):
    with MetricsWriter(str(tmp_path), NO_TB) as w:
        w.write(1, {'loss': 1.0})
    assert not (tmp_path / 'tensorboard').exists()


def test_gin_binds_metrics_config():
    gin.clear_config()
    try:
        gin.parse_config("metrics.tensorboard = False\nmetrics.mlflow_experiment = 'exp'")
        cfg = MetricsConfig()
        assert cfg.tensorboard is False and cfg.mlflow_experiment == 'exp' and cfg.mlflow_enabled
        assert cfg.jsonl_name == 'metrics.jsonl'
    finally:
        gin.clear_config()
    assert not MetricsConfig().mlflow_enabled


def test_mlflow_missing_is_a_clear_error_only_when_configured(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'mlflow', None)  # as if not installed, whatever this machine has
    MetricsWriter(str(tmp_path / 'a'), NO_TB).close()  # not configured: fine
    for cfg in (MetricsConfig(tensorboard=False, mlflow_tracking_uri='http://localhost:5000'),
                MetricsConfig(tensorboard=False, mlflow_experiment='exp')):
        with pytest.raises(ImportError, match='pip install mlflow'):
            MetricsWriter(str(tmp_path / 'b'), cfg)


class _FakeClient:
    calls = []
    runs = {}

    def __init__(self, tracking_uri=None):
        self.calls.append(('init', tracking_uri))

    def get_experiment_by_name(self, name):
        return None

    def create_experiment(self, name):
        self.calls.append(('create_experiment', name))
        return '7'

    def create_run(self, experiment_id, run_name=None, tags=None):
        run_id = f'run{len(self.runs)}'
        self.runs[run_id] = experiment_id
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id=run_id))

    def get_run(self, run_id):
        if run_id not in self.runs:
            raise KeyError(run_id)

    def update_run(self, run_id, status=None):
        self.calls.append(('update_run', run_id, status))

    def log_text(self, run_id, text, artifact_file):
        self.calls.append(('log_text', run_id, artifact_file, text))

    def log_batch(self, run_id, metrics=(), params=()):
        self.calls.append(('log_batch', run_id, list(metrics), list(params)))

    def set_terminated(self, run_id):
        self.calls.append(('set_terminated', run_id))


def _install_fake_mlflow(monkeypatch):
    _FakeClient.calls, _FakeClient.runs = [], {}
    mlflow = types.ModuleType('mlflow')
    tracking = types.ModuleType('mlflow.tracking')
    tracking.MlflowClient = _FakeClient
    entities = types.ModuleType('mlflow.entities')
    entities.Metric = lambda key, value, timestamp, step: (key, value, step)
    entities.Param = lambda key, value: (key, value)
    mlflow.tracking, mlflow.entities = tracking, entities
    for name, module in (('mlflow', mlflow), ('mlflow.tracking', tracking), ('mlflow.entities', entities)):
        monkeypatch.setitem(sys.modules, name, module)


def test_mlflow_logging_and_resume(tmp_path, monkeypatch):
    _install_fake_mlflow(monkeypatch)
    cfg = MetricsConfig(tensorboard=False, mlflow_tracking_uri='file:///x', mlflow_experiment='exp')
    text = "train.num_steps = 600\nmesh.shape = {\n    'data': -1,\n}\n"
    with MetricsWriter(str(tmp_path), cfg, run_config_text=text) as w:
        w.write(10, {'step': 10, 'loss': 3.0, 'mfu': float('nan'), 'note': 'x'})
    calls = _FakeClient.calls
    assert ('init', 'file:///x') in calls and ('create_experiment', 'exp') in calls
    assert ('log_text', 'run0', 'config.gin', text) in calls
    batches = [c for c in calls if c[0] == 'log_batch']
    assert batches[0][3] == [('train.num_steps', '600')]  # single-line bindings as params
    assert batches[1][2] == [('loss', 3.0, 10)]  # NaN and strings stay out of MLflow
    assert calls[-1] == ('set_terminated', 'run0')
    assert (tmp_path / 'mlflow_run_id').read_text().strip() == 'run0'
    # A resumed run logs to the same MLflow run.
    with MetricsWriter(str(tmp_path), cfg) as w:
        w.write(20, {'loss': 2.0})
    assert ('update_run', 'run0', 'RUNNING') in _FakeClient.calls
    assert _FakeClient.calls[-2] == ('log_batch', 'run0', [('loss', 2.0, 20)], [])
    assert len(_FakeClient.runs) == 1


def test_progress_line_and_eta():
    now = [100.0]
    p = ProgressLogger(600, 0, clock=lambda: now[0])
    rec = {'loss': 3.41234, 'tokens_per_sec': 12345.0, 'mfu': 0.0412, 'step_time_sec': 0.21}
    # First call: compile is in the time so far; the ETA uses the record's step time (480 * 0.21 s = 1m41s).
    assert p.line(120, rec) == 'step 120/600 | loss 3.412 | 12.3k tok/s | mfu 4.1% | 0.21 s/step | eta 1m41s'
    now[0] += 50.0  # 100 steps at 0.5 s
    assert p.line(220, rec).endswith('| eta 3m10s')  # 380 * 0.5
    now[0] += 100.0  # 100 steps at 1.0 s: the moving average is 150 s / 200 steps
    assert p.line(320, rec).endswith('| eta 3m30s')  # 280 * 0.75
    assert p.seconds_per_step() == pytest.approx(0.75)
    assert p.line(600, {}) == 'step 600/600 | eta 0s'


def test_progress_window_forgets_old_intervals():
    now = [0.0]
    p = ProgressLogger(1000, 0, window=2, clock=lambda: now[0])
    for step, dt in ((10, 0.0), (20, 100.0), (30, 1.0), (40, 1.0)):
        now[0] += dt
        p.line(step, {})
    assert p.seconds_per_step() == pytest.approx(0.1)


def test_progress_formats_and_log(capsys):
    p = ProgressLogger(10, 5, clock=lambda: 0.0)
    line = p.log(6, {'loss': float('nan'), 'eval_loss': 2.0, 'tokens_per_sec': 2.5e6, 'mfu': None,
                     'step_time_sec': 0.0123})
    assert line == 'step 6/10 | loss nan | eval_loss 2.000 | 2.5M tok/s | 0.0123 s/step | eta 0s'
    assert capsys.readouterr().err == line + '\n'
    assert ProgressLogger(10).line(1, {}) == 'step 1/10 | eta ?'


@pytest.mark.parametrize('seconds, text', [(0, '0s'), (59.4, '59s'), (101, '1m41s'), (3600, '1h00m'),
                                           (7500, '2h05m'), (97200, '1d03h'), (float('inf'), '?')])
def test_format_duration(seconds, text):
    assert metrics_lib.format_duration(seconds) == text
