"""The trainer end to end on a small idx data set: phases, resume, guards."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import ml_collections
import numpy as np
import pytest

from jaxswap import config as config_lib
from jaxswap import train

import helpers

ROOT = pathlib.Path(__file__).resolve().parents[1]


def small_config(data_dir: pathlib.Path):
  c = config_lib.base_config()
  c.data.source = 'idx'
  c.data.name = 'mnist'
  c.data.path = str(data_dir)
  c.data.crop_padding = 2
  c.data.flip = False
  c.model.name = 'tiny_cnn'
  c.model.width = 1.0
  c.phase1.batch_size = 64
  c.phase1.peak_lr = 0.2
  c.phase1.max_epochs = 10.0
  c.phase1.warmup_epochs = 0.5
  c.phase1.stop_accuracy = 0.9
  c.phase1.stop_window_steps = 4
  c.phase2.replicas = 4
  c.phase2.batch_size = 16
  c.phase2.epochs = 0.5
  c.phase2.peak_lr = 0.05
  c.phase3.bn_batches = 4
  c.phase3.bn_batch_size = 64
  c.eval.batch_size = 64
  c.train.checkpoint_every = 5
  c.train.log_every = 5
  c.train.progress = 'log'
  return c


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp('idx')
  helpers.write_idx_dataset(folder)
  return folder


def test_swap_runs_all_phases_and_writes_the_work_directory(data_dir,
                                                            tmp_path):
  summary = train.train_and_evaluate(small_config(data_dir), tmp_path / 'w')
  w = tmp_path / 'w'
  assert json.loads((w / 'summary.json').read_text()) == summary
  assert (w / 'config.json').exists()
  assert any((w / 'tensorboard').iterdir())
  rows = [json.loads(l) for l in (w / 'metrics.jsonl').read_text().split(
      '\n') if l]
  assert any('phase2/replica3/loss' in r for r in rows)
  p1, p2 = summary['phase1'], summary['phase2']
  # The learnable data set lets phase 1 stop on accuracy, before its cap.
  assert p1['stopped_by'].startswith('training accuracy'), p1
  assert p1['steps'] < 10 * (512 // 64)
  assert p2['steps'] == 512 // 16 // 2
  assert len(p2['replica_test_accuracy']) == 4
  # Ten classes: chance is 0.1.
  assert summary['final']['test_accuracy'] > 0.5
  assert summary['phase3']['averaged_replicas'] == 4
  # Rerunning a finished run does nothing and returns the same summary.
  again = train.train_and_evaluate(small_config(data_dir), tmp_path / 'w')
  assert again == summary

  # A corrupted newest checkpoint is skipped for the one before it, from
  # which phase 3 is redone to the same final model.
  want = helpers.final_params(w)
  newest = max(int(p.name) for p in (w / 'checkpoints').iterdir()
               if p.name.isdigit())
  for f in (w / 'checkpoints' / str(newest)).rglob('*'):
    if f.is_file():
      f.write_bytes(b'\0garbage')
  redone = train.train_and_evaluate(small_config(data_dir), w)
  assert redone['final'] == summary['final']
  chex.assert_trees_all_equal(helpers.final_params(w), want)


def _kill_config(data_dir):
  config = small_config(data_dir)
  config.phase1.stop_accuracy = None
  config.phase1.max_epochs = 0.25       # 2 steps
  config.phase2.epochs = 1.0            # 32 steps per replica
  return config


@pytest.fixture(scope='module')
def straight_params(data_dir, tmp_path_factory):
  """Final parameters of the kill tests' run, uninterrupted."""
  workdir = tmp_path_factory.mktemp('straight')
  train.train_and_evaluate(_kill_config(data_dir), workdir)
  return helpers.final_params(workdir)


def _kill_config_file(data_dir, tmp_path) -> pathlib.Path:
  cfg_file = tmp_path / 'cfg.py'
  cfg_file.write_text(
      'import sys, pathlib\n'
      f'sys.path.insert(0, {str(ROOT / "tests")!r})\n'
      'import test_train\n'
      'def get_config():\n'
      '  return test_train._kill_config(pathlib.Path('
      f'{str(data_dir)!r}))\n')
  return cfg_file


def _start_and_signal(data_dir, tmp_path, workdir, sig):
  """Runs the kill config as a process; signals it in phase 2."""
  cfg_file = _kill_config_file(data_dir, tmp_path)
  cmd = [sys.executable, '-m', 'jaxswap.main', f'--config={cfg_file}',
         f'--workdir={workdir}']
  log = open(tmp_path / f'{workdir.name}.log', 'w+', encoding='utf-8')
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=log)
  deadline = time.time() + 240
  try:
    while time.time() < deadline and proc.poll() is None:
      ckpts = workdir / 'checkpoints'
      done = [int(p.name) for p in ckpts.iterdir()
              if p.name.isdigit()] if ckpts.exists() else []
      if any(2 < s < 2 + 32 for s in done):  # A phase-2 checkpoint.
        break
      time.sleep(0.05)
    assert proc.poll() is None, 'the run ended before it could be stopped'
    proc.send_signal(sig)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
    log.seek(0)
    stderr = log.read()
    log.close()
  return proc.returncode, stderr


def test_resume_after_sigkill_in_phase2_ends_with_same_parameters(
    data_dir, tmp_path, straight_params):
  workdir = tmp_path / 'killed'
  rc, _ = _start_and_signal(data_dir, tmp_path, workdir, signal.SIGKILL)
  assert rc == -signal.SIGKILL
  assert not (workdir / 'summary.json').exists()
  summary = train.train_and_evaluate(_kill_config(data_dir), workdir)
  assert summary['phase2']['steps'] == 32
  chex.assert_trees_all_equal(helpers.final_params(workdir),
                              straight_params)


# Where the chain below kills its run, in order; each is reached by the run
# resumed after the one before. The kill config has 2 phase-1 steps, 32
# phase-2 steps and a checkpoint every 5.
KILL_POINTS = (
    'after:1',               # loading data, compiling: nothing saved yet
    'step:phase1:1',         # phase 1, before its checkpoint
    'save:phase1:0',         # while phase 1's checkpoint is written
    'step:phase2:3',         # phase 2, before its first checkpoint
    'step:phase2:6',         # a step after a checkpoint, likely mid-write
    'save:phase2:0.02',      # 20 ms into a phase-2 checkpoint
    'step:phase2:18',        # resumes from step 15: loses 3 steps
    'average',               # phase 3, averaging
    'recompute:0',           # phase 3, BatchNorm recompute
    'recompute:0.3',         # ... later into it
    'save:done:0',           # while the final model is written
    'summary',               # while summary.json is written
)


def test_killed_at_every_point_and_resumed_ends_as_uninterrupted(
    data_dir, tmp_path, straight_params):
  """SIGKILL at each of KILL_POINTS in turn, then a clean run to the end."""
  workdir = tmp_path / 'chain'
  cfg_file = _kill_config_file(data_dir, tmp_path)
  for i, point in enumerate(KILL_POINTS):
    proc = subprocess.run(
        [sys.executable, str(ROOT / 'tests' / 'killed_main.py'), point,
         f'--config={cfg_file}', f'--workdir={workdir}'],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == -signal.SIGKILL, (
        f'kill point {point}: exit {proc.returncode}, not killed\n'
        f'{proc.stderr[-3000:]}')
    if point.startswith('save:') and point.endswith(':0'):
      # Killed mid-write: orbax's temporary folder is left behind.
      assert list((workdir / 'checkpoints').glob('*.orbax-checkpoint-tmp*'))
    if i and KILL_POINTS[i - 1] == 'step:phase2:18':
      # Resumed from the newest complete checkpoint (phase-2 step 15, or 10
      # if the kill caught 15 still being written): nothing more is lost.
      assert resumable in (10, 15), resumable
      assert f'resuming at step {resumable}' in proc.stderr, (
          proc.stderr[-3000:])
    done = [int(p.name) for p in (workdir / 'checkpoints').iterdir()
            if p.name.isdigit()]
    resumable = max(done, default=0) - 2  # Phase 2 starts at global step 2.
  assert not (workdir / 'summary.json').exists()
  summary = train.train_and_evaluate(_kill_config(data_dir), workdir)
  assert summary['phase2']['steps'] == 32
  assert json.loads((workdir / 'summary.json').read_text()) == summary
  chex.assert_trees_all_equal(helpers.final_params(workdir),
                              straight_params)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data_dir, tmp_path,
                                                      straight_params):
  workdir = tmp_path / 'preempted'
  rc, stderr = _start_and_signal(data_dir, tmp_path, workdir,
                                 signal.SIGTERM)
  assert rc == 0, stderr[-2000:]
  assert 'Stopped by SIGTERM' in stderr
  steps = [int(p.name) for p in (workdir / 'checkpoints').iterdir()
           if p.name.isdigit()]
  assert max(steps) > 2   # Saved in phase 2, where it was stopped.
  train.train_and_evaluate(_kill_config(data_dir), workdir)
  chex.assert_trees_all_equal(helpers.final_params(workdir),
                              straight_params)


@pytest.mark.parametrize('limit_kib', [1, 16])
def test_a_full_disk_is_one_clear_line(data_dir, tmp_path, limit_kib):
  """Writes fail as on a full disk: config.json (1 KiB), a checkpoint (16).

  A file-size limit (RLIMIT_FSIZE) makes every write past it fail with
  EFBIG, in Python and in orbax's TensorStore threads alike, as ENOSPC
  would.
  """
  workdir = tmp_path / 'run'
  cfg_file = _kill_config_file(data_dir, tmp_path)
  # ulimit -f counts KiB; with SIGXFSZ ignored a write past it fails.
  proc = subprocess.run(
      ['bash', '-c', f'ulimit -f {limit_kib}; trap "" XFSZ; exec "$@"', '-',
       sys.executable, '-m', 'jaxswap.main', f'--config={cfg_file}',
       f'--workdir={workdir}'], cwd=ROOT, capture_output=True, text=True,
      timeout=240, check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  # No traceback through our code or orbax's. (TensorStore may still print
  # asyncio's 'Event loop is closed' for writes that finish after orbax
  # gave up; it prints them itself, past Python's hooks.)
  frames = [l for l in proc.stderr.splitlines() if l.startswith('  File ')]
  assert not [f for f in frames if 'jaxswap' in f or 'orbax' in f], (
      proc.stderr[-3000:])
  # Our line is one write; TensorStore's noise may end just before it.
  errors = [l[l.index('error: '):] for l in proc.stderr.splitlines()
            if 'error: ' in l]
  assert len(errors) == 1, proc.stderr[-3000:]
  last = errors[0]
  assert str(workdir) in last, last
  assert 'File too large' in last and 'free space' in last.replace(
      'free some space', 'free space'), last


def test_a_workdir_that_cannot_be_made_is_one_clear_error(data_dir,
                                                          tmp_path):
  (tmp_path / 'file').write_text('not a folder')
  with pytest.raises(train.WorkdirError, match='cannot be written .*Not a '
                     'directory.*choose a writable folder'):
    train.train_and_evaluate(small_config(data_dir),
                             tmp_path / 'file' / 'run')


def test_workdir_with_another_config_is_refused(data_dir, tmp_path):
  config = small_config(data_dir)
  config.phase1.max_epochs = 0.25
  config.phase1.stop_accuracy = None
  config.phase2.replicas = 0
  train.train_and_evaluate(config, tmp_path / 'w')
  config.phase1.peak_lr = 0.3
  with pytest.raises(config_lib.ConfigError,
                     match=r'phase1.peak_lr: 0.2 -> 0.3.*--overwrite'):
    train.train_and_evaluate(config, tmp_path / 'w')
  summary = train.train_and_evaluate(config, tmp_path / 'w', overwrite=True)
  assert 'phase2' not in summary and summary['final']['test_accuracy'] > 0


@pytest.mark.parametrize('edit, message', [
    (lambda c: setattr(c.phase1, 'batch_size', 60),
     r'phase1.batch_size=60 is not divisible by the 8 devices'),
    (lambda c: setattr(c.phase2, 'replicas', 3),
     r'phase2.replicas=3 does not fit 8 devices'),
    (lambda c: setattr(c.phase2, 'replicas', 12),
     r'phase2.replicas=12 does not fit 8 devices'),
    (lambda c: setattr(c.phase1, 'stop_accuracy', 93.0),
     r'stop_accuracy=93.0 .* must be in \[0, 1\]'),
    (lambda c: setattr(c.model, 'name', 'resnet10'),
     r"model.name='resnet10' is unknown; choose one of"),
    (lambda c: setattr(c.data, 'source', 'csv'),
     r"data.source='csv' is unknown"),
    (lambda c: setattr(c.phase2, 'batch_size', -4),
     r'phase2.batch_size=-4 must be > 0'),
    (lambda c: setattr(c.phase1, 'batch_size', 4096),
     r'phase1.batch_size=4096 exceeds the 512 training examples'),
    (lambda c: setattr(c.phase1, 'batch_size', 0),
     r'phase1.batch_size=0 must be > 0'),
    (lambda c: setattr(c.phase2, 'epochs', 0.0),
     r'phase2.epochs=0.0 must be > 0'),
    (lambda c: setattr(c.phase1, 'peak_lr', float('nan')),
     r'phase1.peak_lr=nan must be finite'),
    (lambda c: setattr(c, 'phase1', ml_collections.ConfigDict(
        {**c.phase1.to_dict(), 'max_epochs': 'eight'})),
     r"phase1.max_epochs='eight' has type str, expected float"),
    (lambda c: setattr(c.model, 'name', 'ResNet9'),
     r"model.name='ResNet9' is unknown"),
])
def test_bad_config_stops_before_compiling(data_dir, tmp_path, edit,
                                           message):
  config = small_config(data_dir)
  edit(config)
  with pytest.raises(config_lib.ConfigError, match=message):
    train.train_and_evaluate(config, tmp_path / 'w')
  assert not (tmp_path / 'w').exists()


def test_misspelt_key_is_named_with_a_suggestion():
  config = config_lib.base_config()
  config.phase2.unlock()
  config.phase2.replcas = 4
  with pytest.raises(config_lib.ConfigError,
                     match=r"unknown config key 'phase2.replcas'; did you "
                           r"mean 'phase2.replicas'"):
    config_lib.validate(config, 8)


@pytest.mark.parametrize('override, named', [
    ('--config.phase2.replcas=4', 'replcas'),
    ('--config.phase2.replicas=four', 'four'),
    ('--config.phase1.stop_accuracy=high', 'high'),
])
def test_command_line_bad_override_fails_fast_in_one_line(tmp_path, override,
                                                           named):
  cmd = [sys.executable, '-m', 'jaxswap.main',
         '--config=configs/swap_fashion_mnist.py', f'--workdir={tmp_path}',
         override]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       timeout=120, check=False)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), out.stderr
  assert named in lines[0]


def test_capsule_network_trains_through_the_same_entry(data_dir, tmp_path):
  config = small_config(data_dir)
  config.model.name = 'capsnet'
  config.model.capsule.backbone = 'simple'
  config.model.capsule.backbone_width = 16
  config.model.capsule.primary_caps = 4
  config.model.capsule.layers = (
      {'type': 'conv', 'num_caps': 4, 'kernel': 3, 'stride': 2},
      {'type': 'fc', 'num_caps': 10})
  config.phase1.stop_accuracy = None
  config.phase1.max_epochs = 1.0
  config.phase2.replicas = 2
  config.phase2.epochs = 0.25
  config.data.validation_size = 64
  config.eval.every_epochs = 0.5
  summary = train.train_and_evaluate(config, tmp_path / 'w')
  assert summary['parameters'] > 0
  # The validation split is evaluated along the way, for model selection.
  assert 0 <= summary['phase1']['best_val_accuracy'] <= 1
  assert summary['phase1']['best_val_step'] == 4  # round(7 / 2)
  assert summary['phase1']['steps'] == (512 - 64) // 64
  assert len(summary['phase2']['replica_test_accuracy']) == 2
  assert 0 <= summary['final']['val_accuracy'] <= 1


def test_capsule_config_error_is_a_config_error(data_dir, tmp_path):
  config = small_config(data_dir)
  config.model.name = 'capsnet'
  config.model.capsule.layers = ({'type': 'fc', 'num_caps': 7},)
  with pytest.raises(config_lib.ConfigError, match='7 capsules but the '
                     'dataset has 10 classes'):
    train.train_and_evaluate(config, tmp_path / 'w')


def _short_config(data_dir):
  config = _kill_config(data_dir)
  config.phase2.epochs = 0.125          # 4 steps per replica
  return config


def test_two_processes_train_the_same_model_as_one(data_dir, tmp_path):
  """2 processes x 4 CPU devices against 1 process x 8 devices.

  Few steps: the processes sum gradients in another order (over gloo), and
  SGD amplifies rounding differences step by step.
  """
  one = tmp_path / 'one'
  train.train_and_evaluate(_short_config(data_dir), one)
  cfg_file = tmp_path / 'cfg.py'
  cfg_file.write_text(
      'import sys, pathlib\n'
      f'sys.path.insert(0, {str(ROOT / "tests")!r})\n'
      'import test_train\n'
      'def get_config():\n'
      '  return test_train._short_config(pathlib.Path('
      f'{str(data_dir)!r}))\n')
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  workdir = tmp_path / 'two'
  env = dict(os.environ,
             XLA_FLAGS='--xla_force_host_platform_device_count=4')
  procs, logs = [], []
  for i in range(2):
    logs.append(open(tmp_path / f'p{i}.log', 'w+', encoding='utf-8'))
    procs.append(subprocess.Popen(
        [sys.executable, '-m', 'jaxswap.main', f'--config={cfg_file}',
         f'--workdir={workdir}', '--num_processes=2', f'--process_id={i}',
         f'--coordinator_address=127.0.0.1:{port}'],
        cwd=ROOT, env=env, stdout=logs[i], stderr=subprocess.STDOUT))
  try:
    for p in procs:
      p.wait(timeout=300)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, log) in enumerate(zip(procs, logs)):
    log.seek(0)
    assert p.returncode == 0, f'process {i}:\n' + log.read()[-3000:]
  text = (tmp_path / 'p0.log').read_text()
  assert 'Process 0 of 2, 4 of 8 devices local' in text
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['phase2']['steps'] == 4
  chex.assert_trees_all_close(helpers.final_params(workdir),
                              helpers.final_params(one), atol=1e-3, rtol=2e-3)


def test_sequential_swa_is_phase2_with_one_averaging_replica(data_dir,
                                                             tmp_path):
  config = _kill_config(data_dir)
  config.phase2.replicas = 1
  config.phase2.batch_size = 64
  config.phase2.epochs = 2.0            # 16 steps
  config.phase2.swa_every_steps = 4
  config.phase2.swa_start_epochs = 1.0  # from step 8: 8, 12, 16
  summary = train.train_and_evaluate(config, tmp_path / 'w')
  assert summary['phase2']['swa_snapshots'] == 3
  assert summary['phase3']['averaged_replicas'] == 1
  assert 0 < summary['final']['test_accuracy'] <= 1
