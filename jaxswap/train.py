"""SWAP: Stochastic Weight Averaging in Parallel (Gupta et al., ICLR 2020).

`train_and_evaluate` runs the three phases of the method as steps you can
read top to bottom:

  1. one model, trained with a large global batch data-parallel over every
     device, until a training accuracy or an epoch cap;
  2. W replicas of it, refined independently with small batches, as one
     vmapped computation whose replica axis is sharded over the mesh;
  3. the uniform average of the replicas, with BatchNorm statistics
     recomputed on training data, and the test accuracy of it and of every
     replica.

A checkpoint is written every `train.checkpoint_every` steps and at the end
of every phase; rerunning the same command resumes from the newest one, and
since the data order and augmentation are pure functions of (seed, replica,
step), the resumed run ends where an uninterrupted one would.
"""

import collections
import dataclasses
import errno
import functools
import json
import os
import pathlib
import shutil
import signal
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxswap import checkpoint
from jaxswap import config as config_lib
from jaxswap import metrics as metrics_lib
from jaxswap import models
from jaxswap import schedules
from jaxswap import step as step_lib
from jaxswap.data import pipeline
from jaxswap.data import sources
from jaxswap.data import stream as stream_lib

# Fold-in constants that keep the random streams of the phases apart.
_INIT, _PHASE1, _PHASE2, _PHASE3 = 0, 1, 2, 3


class NonFiniteError(RuntimeError):
  """A loss or parameter went NaN or infinite."""


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint was saved."""


class WorkdirError(OSError):
  """The work directory cannot be written (permissions, a full disk)."""


@dataclasses.dataclass(frozen=True)
class StreamedData:
  """A data set the hosts stream (`jaxswap.data.stream`), not held in memory.

  The trainer's stand-in for `pipeline.DeviceData`: the stream, and the
  normalization constants.
  """
  stream: stream_lib.TfdsStream
  mean: np.ndarray
  std: np.ndarray


def num_train(arrays) -> int:
  """Training examples of in-memory or streamed data."""
  if isinstance(arrays, StreamedData):
    return arrays.stream.num_train
  return arrays.train_images.shape[0]


def image_shape(arrays) -> tuple[int, ...]:
  if isinstance(arrays, StreamedData):
    return arrays.stream.image_shape
  return tuple(arrays.train_images.shape[1:])


@dataclasses.dataclass
class Phase:
  """What one training phase does, resolved to steps."""
  name: str
  replicas: int
  batch_size: int             # per replica
  steps_per_epoch: int
  total_steps: int
  schedule: Any
  tx: Any
  mesh: jax.sharding.Mesh
  stop_accuracy: float | None = None
  stop_window: int = 1
  swa_every: int = 0
  swa_start: int = 0

  @property
  def images_per_step(self) -> int:
    return self.replicas * self.batch_size


def make_mesh(replicas: int) -> jax.sharding.Mesh:
  """A ('replica', 'data') mesh over every device for W replicas."""
  shape = config_lib.mesh_shape(replicas, jax.device_count())
  return jax.make_mesh(shape, ('replica', 'data'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def make_phase(config, name: str, n_train: int) -> Phase:
  pc = config[name]
  replicas = 1 if name == 'phase1' else pc.replicas
  if pc.batch_size > n_train:
    raise config_lib.ConfigError(
        f'config.{name}.batch_size={pc.batch_size} exceeds the {n_train} '
        'training examples; use a smaller batch')
  spe = n_train // pc.batch_size
  epochs = pc.max_epochs if name == 'phase1' else pc.epochs
  total = max(1, int(round(epochs * spe)))
  warmup = int(round(pc.warmup_epochs * spe))
  milestones = tuple(int(round(e * spe))
                     for e in pc.get('lr_milestones', ()))
  schedule = schedules.warmup_then_decay(
      pc.peak_lr, warmup, total, pc.final_lr, milestones,
      pc.get('lr_cut', 0.1))
  oc = config.optimizer
  tx = step_lib.make_optimizer(schedule, oc.momentum, oc.nesterov,
                               oc.weight_decay)
  return Phase(name=name, replicas=replicas, batch_size=pc.batch_size,
               steps_per_epoch=spe, total_steps=total, schedule=schedule,
               tx=tx, mesh=make_mesh(replicas),
               stop_accuracy=pc.get('stop_accuracy'),
               stop_window=pc.get('stop_window_steps', 1),
               swa_every=pc.get('swa_every_steps', 0),
               swa_start=int(round(pc.get('swa_start_epochs', 0.0) * spe)))


def state_template(model, phase: Phase, sample: jax.Array):
  """The abstract (W, ...) replica state of `phase`, sharded on its mesh."""
  keys = _replica_keys(0, _INIT, phase.replicas)
  shapes = jax.eval_shape(functools.partial(
      step_lib.init_replicas, model, phase.tx), keys, sample)
  if phase.swa_every:
    shapes = jax.eval_shape(step_lib.with_swa, shapes)
  rep = NamedSharding(phase.mesh, P('replica'))
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
      shapes)


def _replica_keys(seed: int, phase_id: int, replicas: int) -> jax.Array:
  base = jax.random.fold_in(jax.random.PRNGKey(seed), phase_id)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(
      jnp.arange(replicas))


def _prepare_workdir(workdir: pathlib.Path, config, overwrite: bool):
  """Refuses to mix runs; writes the resolved config.

  In a multi-process run, process 0 checks and writes and the others wait
  for it, so that they never see its half-made work directory.
  """
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    if jax.process_index() == 0:
      _check_and_write_workdir(workdir, config, overwrite)
    multihost_utils.sync_global_devices('jaxswap workdir ready')
    return
  _check_and_write_workdir(workdir, config, overwrite)


def _check_and_write_workdir(workdir: pathlib.Path, config, overwrite: bool):
  path = workdir / 'config.json'
  if overwrite and workdir.exists():
    logging.warning('--overwrite: deleting the run in %s', workdir)
    shutil.rmtree(workdir)
  if path.exists():
    saved = json.loads(path.read_text())
    diff = config_lib.differences(saved, config)
    if diff:
      shown = ', '.join(f'{k}: {saved.get(k)!r} -> '
                        f'{config_lib.flatten(config).get(k)!r}'
                        for k in diff[:3])
      raise config_lib.ConfigError(
          f'--workdir={workdir} holds a run with another config ({shown}'
          f'{", ..." if len(diff) > 3 else ""}); use a new --workdir, or '
          'pass --overwrite to delete that run')
  elif workdir.exists() and any(workdir.iterdir()):
    raise config_lib.ConfigError(
        f'--workdir={workdir} is not empty and holds no run of ours; use '
        'an empty or new --workdir, or pass --overwrite to delete it')
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
      tmp = workdir / 'config.json.tmp'
      tmp.write_text(config_lib.to_json(config))
      os.replace(tmp, path)
  except OSError as e:
    raise WorkdirError(f'--workdir={workdir} cannot be written '
                       f'({e.strerror or e}); choose a writable folder with '
                       'free space') from e


class _Run:
  """What the phases share: data, model, checkpoints, writers, signals."""

  def __init__(self, config, workdir: pathlib.Path, dataset, arrays, model):
    self.config, self.workdir = config, workdir
    self.dataset, self.arrays = dataset, arrays
    self.n_train = num_train(arrays)
    self.streamed = isinstance(arrays, StreamedData)
    self.model = model
    self.is_main = jax.process_index() == 0
    self.writer = metrics_lib.make_writer(workdir, self.is_main)
    self.ckpt = checkpoint.Checkpointer(workdir / 'checkpoints',
                                        config.train.keep_checkpoints)
    self.dtype = jnp.dtype(config.model.dtype)
    self.preempted = False
    self._data, self._eval_fns = {}, {}

  def on_sigterm(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM: saving a checkpoint, then stopping.')
    self.preempted = True

  def data_on(self, mesh) -> pipeline.DeviceData:
    """The data set, replicated on `mesh` (placed once per mesh).

    Streamed data gives only the normalization constants, as (mean, std).
    """
    cache = self._data
    if mesh not in cache:
      cache.clear()  # One mesh's copy at a time.
      if self.streamed:
        cache[mesh] = tuple(jax.device_put(a, NamedSharding(mesh, P()))
                            for a in (self.arrays.mean, self.arrays.std))
      else:
        cache[mesh] = pipeline.put(self.arrays, NamedSharding(mesh, P()))
    return cache[mesh]

  def unroll(self, mesh, replicas: int) -> bool:
    """Whether to unroll the replicas on a device (see over_replicas)."""
    mode = self.config.train.replica_map
    if mode != 'auto':
      return mode == 'unroll'
    per_device = replicas > mesh.shape['replica'] or replicas == 1
    return jax.default_backend() == 'cpu' and per_device

  def step_config(self, batch_size: int, mesh, replicas: int,
                  phase: Phase | None = None) -> step_lib.StepConfig:
    d, m = self.config.data, self.config.model
    loss = 'cross_entropy'
    if m.name == 'capsnet':
      loss = {'dynamic': 'margin', 'em': 'spread'}.get(m.capsule.routing,
                                                       loss)
    return step_lib.StepConfig(
        batch_size=batch_size, crop_padding=d.crop_padding, flip=d.flip,
        label_smoothing=self.config.optimizer.label_smoothing,
        dtype=self.dtype, unroll=self.unroll(mesh, replicas), loss=loss,
        total_steps=phase.total_steps if phase else 1,
        swa_every=phase.swa_every if phase else 0,
        swa_start=phase.swa_start if phase else 0)

  def evaluate(self, mesh, params, batch_stats, split: str
               ) -> np.ndarray | None:
    """Accuracy of each replica on 'test' or 'val' (None if empty)."""
    if self.streamed:
      return self._evaluate_streamed(mesh, params, batch_stats, split)
    images = getattr(self.arrays, f'{split}_images')
    if images.shape[0] == 0:
      return None
    data = self.data_on(mesh)
    replicas = jax.tree.leaves(params)[0].shape[0]
    cache = self._eval_fns
    if (mesh, replicas) not in cache:
      cache[mesh, replicas] = step_lib.jit(functools.partial(
          step_lib.evaluate, model=self.model,
          batch_size=self.config.eval.batch_size, dtype=self.dtype,
          mesh=mesh, unroll=self.unroll(mesh, replicas)),
          out_shardings=NamedSharding(mesh, P()))
    fn = cache[mesh, replicas]
    correct, _ = fn(params, batch_stats, getattr(data, f'{split}_images'),
                    getattr(data, f'{split}_labels'), data.mean, data.std)
    return np.asarray(jax.device_get(correct)) / images.shape[0]

  def _evaluate_streamed(self, mesh, params, batch_stats, split: str):
    if split != 'test':
      return None  # A streamed run's held-out split is its eval_split.
    replicas = jax.tree.leaves(params)[0].shape[0]
    size = self.config.eval.batch_size
    cache = self._eval_fns
    if (mesh, replicas, 'streamed') not in cache:
      one_batch = functools.partial(
          step_lib.evaluate, model=self.model, batch_size=size,
          dtype=self.dtype, mesh=mesh, unroll=self.unroll(mesh, replicas))
      cache[mesh, replicas, 'streamed'] = step_lib.jit(
          lambda p, b, x, y, mean, std: one_batch(p, b, x[0], y[0], mean,
                                                  std),
          out_shardings=NamedSharding(mesh, P()))
    fn = cache[mesh, replicas, 'streamed']
    mean, std = self.data_on(mesh)
    correct = 0
    for images, labels in self.arrays.stream.eval_batches(
        'test', NamedSharding(mesh, P(None, 'data')), size):
      correct += np.asarray(jax.device_get(
          fn(params, batch_stats, images, labels, mean, std)[0]))
    return correct / self.arrays.stream.num_test

  def save(self, ckpt_step: int, state, meta: dict[str, Any]) -> None:
    try:
      self.ckpt.save(ckpt_step, state, meta)
    except OSError as e:
      raise WorkdirError(
          f'cannot write checkpoints in {self.workdir} '
          f'({e.strerror or e}); free some space or fix its permissions, '
          'then rerun the same command to resume from the last one') from e


def _train_phase(run: _Run, phase: Phase, state, meta: dict[str, Any],
                 step_offset: int):
  """Trains `state` through `phase` from meta['phase_step'] on.

  Returns:
    (state, info, meta): info is the phase's entry of the summary, meta the
    cursor of its last checkpoint.
  """
  mesh = phase.mesh
  rep = NamedSharding(mesh, P('replica'))
  start = meta.get('phase_step', 0)
  step_fn, inputs = _step_and_inputs(run, phase, start)
  # Metrics carry the run's wall time so far, over all phases.
  offset = (meta.get('summary', {}).get('phase1', {}).get('seconds', 0.0)
            if phase.name != 'phase1' else 0.0)

  def clock(elapsed):
    return offset + elapsed + time.perf_counter() - t0

  window = collections.deque(meta.get('window', []),
                             maxlen=phase.stop_window)
  elapsed = meta.get('elapsed', 0.0)
  bad = set(meta.get('bad_replicas', []))
  best_val = list(meta.get('best_val', [-1.0, 0]))
  tc = run.config.train
  skip_bad = run.config.phase3.skip_nonfinite and phase.replicas > 1
  eval_every = int(round(run.config.eval.every_epochs
                         * phase.steps_per_epoch))
  progress = metrics_lib.Progress(
      phase.name, phase.total_steps, start, phase.images_per_step,
      tc.log_every, tc.progress, enabled=run.is_main)
  stopped_by = 'epoch cap'
  t0 = time.perf_counter()
  t_first, s_first = None, None

  def cursor(done, complete):
    return {'phase': phase.name, 'phase_step': done, 'complete': complete,
            'window': list(window), 'stopped_by': stopped_by,
            'elapsed': elapsed + time.perf_counter() - t0,
            'bad_replicas': sorted(bad), 'best_val': best_val,
            'summary': meta.get('summary', {})}

  done = start
  for s in range(start, phase.total_steps):
    state, m = step_fn(state, *inputs(state, s))
    m = jax.device_get(m)
    done = s + 1
    if t_first is None:
      t_first, s_first = time.perf_counter(), done

    finite = np.isfinite(m['loss']) & np.isfinite(m['param_norm'])
    for r in np.flatnonzero(~finite):
      if r in bad:
        continue
      if not skip_bad:
        raise NonFiniteError(
            f'{phase.name} replica {r}: loss {m["loss"][r]} at step {done}'
            f'; the last good checkpoint is kept in {run.workdir}. Lower '
            'the learning rate, or set config.phase3.skip_nonfinite=True '
            'to drop such replicas from the average')
      logging.warning('%s replica %d went non-finite at step %d; it is '
                      'left out of the average.', phase.name, r, done)
      bad.add(int(r))
    good = [r for r in range(phase.replicas) if r not in bad]
    if not good:
      raise NonFiniteError(f'{phase.name}: every replica went non-finite '
                           f'by step {done}; lower the learning rate')
    loss = float(np.mean(m['loss'][good]))
    accuracy = float(np.mean(m['accuracy'][good]))
    window.append(accuracy)
    progress.update(done, loss, accuracy)

    if done % tc.log_every == 0 or done == phase.total_steps:
      scalars = {f'{phase.name}/{k}': float(np.mean(v[good]))
                 for k, v in m.items()}
      scalars['wall_time'] = clock(elapsed)
      if phase.replicas > 1:
        for k in ('loss', 'accuracy', 'lr'):
          for r in range(phase.replicas):
            scalars[f'{phase.name}/replica{r}/{k}'] = float(m[k][r])
      run.writer.write_scalars(step_offset + done, scalars)
    if eval_every and done % eval_every == 0:
      acc = run.evaluate(mesh, state.params, state.batch_stats, 'test')
      scalars = {f'{phase.name}/test_accuracy': float(np.mean(acc[good])),
                 'wall_time': clock(elapsed)}
      if phase.replicas > 1:
        scalars.update({f'{phase.name}/replica{r}/test_accuracy': acc[r]
                        for r in range(phase.replicas)})
      val = run.evaluate(mesh, state.params, state.batch_stats, 'val')
      if val is not None:
        # Model selection reads the validation split, never the test set.
        scalars[f'{phase.name}/val_accuracy'] = float(np.mean(val[good]))
        if scalars[f'{phase.name}/val_accuracy'] > best_val[0]:
          best_val[:] = [scalars[f'{phase.name}/val_accuracy'], done]
      run.writer.write_scalars(step_offset + done, scalars)

    stop = (phase.stop_accuracy is not None
            and len(window) == phase.stop_window
            and np.mean(window) >= phase.stop_accuracy)
    if stop:
      stopped_by = (f'training accuracy {np.mean(window):.4f} >= '
                    f'{phase.stop_accuracy} over {phase.stop_window} steps')
      break
    if run.preempted:
      run.save(step_offset + done, state, cursor(done, False))
      run.ckpt.wait()
      progress.close()
      raise Preempted(f'{phase.name} step {done}')
    if done % tc.checkpoint_every == 0 and done < phase.total_steps:
      run.save(step_offset + done, state, cursor(done, False))
  progress.close()

  jax.block_until_ready(state)
  t_end = time.perf_counter()
  seconds = elapsed + t_end - t0
  steady = (done - s_first) if s_first is not None else 0
  ips = (steady * phase.images_per_step / (t_end - t_first)
         if steady and t_end > t_first else None)
  info = {'steps': done, 'epochs': done / phase.steps_per_epoch,
          'stopped_by': stopped_by, 'seconds': seconds,
          'images_per_second': ips, 'replicas': phase.replicas,
          'batch_size': phase.batch_size,
          'train_accuracy_window': float(np.mean(window)) if window else None,
          'bad_replicas': sorted(bad),
          'best_val_accuracy': best_val[0] if best_val[0] >= 0 else None,
          'best_val_step': best_val[1] if best_val[0] >= 0 else None}
  meta_out = cursor(done, True)
  return state, info, meta_out


def _step_and_inputs(run: _Run, phase: Phase, start: int):
  """The jitted step of `phase`, and `inputs(state, step)` of its data.

  In memory, the step gathers its batch from the device-resident data by a
  per-epoch permutation; streamed, the hosts read the batch and the step
  takes it whole.
  """
  mesh = phase.mesh
  rep = NamedSharding(mesh, P('replica'))
  whole = NamedSharding(mesh, P())
  cfg = run.step_config(phase.batch_size, mesh, phase.replicas, phase)
  common = dict(model=run.model, tx=phase.tx, schedule=phase.schedule,
                cfg=cfg, mesh=mesh)
  # Metrics are tiny; replicated, every process can read them.
  out = (rep, whole)
  if run.streamed:
    batch = NamedSharding(mesh, P('replica', 'data'))
    step_fn = step_lib.jit(
        functools.partial(step_lib.train_step_streamed, **common),
        in_shardings=(rep, batch, batch, whole, whole), out_shardings=out,
        donate_argnums=0)
    phase_id = _PHASE1 if phase.name == 'phase1' else _PHASE2
    batches = run.arrays.stream.train_batches(
        phase_id, batch, phase.replicas, phase.batch_size,
        phase.steps_per_epoch, start)
    norm = run.data_on(mesh)
    return step_fn, lambda state, s: (*next(batches), *norm)

  step_fn = step_lib.jit(
      functools.partial(step_lib.train_step, **common),
      in_shardings=(rep, whole, rep), out_shardings=out, donate_argnums=0)
  perm_fn = step_lib.jit(
      functools.partial(pipeline.permutations, n=run.n_train),
      out_shardings=rep)
  data = run.data_on(mesh)
  perms = {}

  def inputs(state, s):
    epoch = s // phase.steps_per_epoch
    if epoch not in perms:
      perms.clear()
      perms[epoch] = perm_fn(state.key, epoch)
    return data, perms[epoch]
  return step_fn, inputs


def _log_phase_start(phase: Phase, start: int):
  what = (f'{phase.replicas} replicas x batch {phase.batch_size}'
          if phase.replicas > 1 else f'global batch {phase.batch_size}')
  stop = (f', or until training accuracy >= {phase.stop_accuracy}'
          if phase.stop_accuracy is not None else '')
  logging.info('%s: %s on a %s mesh, %d steps (%.2f epochs)%s%s.',
               phase.name, what, dict(phase.mesh.shape), phase.total_steps,
               phase.total_steps / phase.steps_per_epoch, stop,
               f', resuming at step {start}' if start else '')


def load_data(config) -> tuple[Any, pipeline.DeviceData | StreamedData]:
  """The data set's description, and its splits (in memory or streamed)."""
  if config.data.source == 'tfds_stream':
    stream = stream_lib.from_config(config.data, config.seed)
    data = StreamedData(stream, np.asarray(config.data.mean, np.float32),
                        np.asarray(config.data.std, np.float32))
    logging.info('Data %s (streamed): %d train, %d test images, resized '
                 'to %s, %d classes.', stream.name, stream.num_train,
                 stream.num_test, stream.image_shape, stream.num_classes)
    return stream, data
  ds = sources.load(config.data)
  train_x, train_y, val_x, val_y = pipeline.split_validation(
      ds.train_images, ds.train_labels, config.data.validation_size,
      config.seed)
  if config.data.mean is not None and config.data.std is not None:
    mean = np.asarray(config.data.mean, np.float32)
    std = np.asarray(config.data.std, np.float32)
  else:
    mean, std = sources.normalization(train_x)
  channels = ds.image_shape[-1]
  if mean.shape != (channels,) or std.shape != (channels,):
    raise config_lib.ConfigError(
        f'config.data.mean/std have {mean.size}/{std.size} values for '
        f'{channels}-channel images; give one per channel')
  arrays = pipeline.DeviceData(
      train_images=train_x, train_labels=train_y.astype(np.int32),
      test_images=ds.test_images, test_labels=ds.test_labels.astype(np.int32),
      val_images=val_x, val_labels=val_y.astype(np.int32),
      mean=mean, std=std)
  logging.info('Data %s: %d train, %d validation, %d test images of %s, '
               '%d classes.', ds.name, len(train_x), len(val_x),
               len(ds.test_images), ds.image_shape, ds.num_classes)
  return ds, arrays


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       overwrite: bool = False) -> dict[str, Any]:
  """Runs (or resumes) SWAP as `config` says; returns the summary."""
  # ---- Config, work directory and data: every check before compiling.
  config_lib.validate(config, jax.device_count())
  workdir = pathlib.Path(workdir)
  dataset, arrays = load_data(config)
  phase1 = make_phase(config, 'phase1', num_train(arrays))
  phase2 = (make_phase(config, 'phase2', num_train(arrays))
            if config.phase2.replicas else None)
  try:
    model = models.build(config, dataset.num_classes)
  except ValueError as e:
    raise config_lib.ConfigError(f'config.model: {e}') from e
  _prepare_workdir(workdir, config, overwrite)
  run = _Run(config, workdir, dataset, arrays, model)
  previous = (signal.signal(signal.SIGTERM, run.on_sigterm)
              if _in_main_thread() else None)
  failed = True
  try:
    summary = _run_phases(run, phase1, phase2)
    failed = False
  except OSError as e:
    raise _as_workdir_error(e, workdir)
  finally:
    try:
      run.ckpt.close()
      run.writer.close()
    except OSError as e:
      if not failed:
        raise _as_workdir_error(e, workdir)
      logging.warning('Closing the work directory failed too: %s', e)
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)
  return summary


# What failing writes to a work directory raise: no space, over quota, a
# file-size limit, a read-only file system, no permission, not a folder.
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG,
                           errno.EROFS, errno.EACCES, errno.EPERM,
                           errno.ENOTDIR, errno.EIO})


def _as_workdir_error(e: OSError, workdir: pathlib.Path) -> OSError:
  """`e` as a WorkdirError with the fix, if it is a failed write."""
  if isinstance(e, WorkdirError) or e.errno not in _WRITE_ERRNOS:
    return e
  error = WorkdirError(
      f'cannot write to --workdir={workdir} ({e.strerror or e}); free some '
      'space or fix its permissions, then rerun the same command to resume '
      'from the last checkpoint')
  error.__cause__ = e
  return error


def dry_run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Builds and compiles every phase without training; returns the plan.

  Parameters come from `jax.eval_shape`; per-device memory from XLA's
  analysis of each compiled step.
  """
  config_lib.validate(config, jax.device_count())
  dataset, arrays = load_data(config)
  n = num_train(arrays)
  phases = [make_phase(config, 'phase1', n)]
  if config.phase2.replicas:
    phases.append(make_phase(config, 'phase2', n))
  model = models.build(config, dataset.num_classes)
  run = _Run.__new__(_Run)
  run.config, run.arrays, run.model = config, arrays, model
  run.dtype = jnp.dtype(config.model.dtype)
  sample = jnp.zeros((1,) + image_shape(arrays), run.dtype)
  plan = {'devices': jax.device_count(), 'train_examples': n}
  for phase in phases:
    rep = NamedSharding(phase.mesh, P('replica'))
    keys = _replica_keys(config.seed, _INIT, phase.replicas)
    shapes = jax.eval_shape(functools.partial(
        step_lib.init_replicas, model, phase.tx), keys, sample)
    state = jax.tree.map(
        lambda x, rep=rep: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                sharding=rep), shapes)
    whole = NamedSharding(phase.mesh, P())
    if isinstance(arrays, StreamedData):
      batch = NamedSharding(phase.mesh, P('replica', 'data'))
      shape = (phase.replicas, phase.batch_size)
      inputs = (jax.ShapeDtypeStruct(shape + image_shape(arrays), jnp.uint8,
                                     sharding=batch),
                jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch),
                *(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=whole)
                  for a in (arrays.mean, arrays.std)))
      train_step = step_lib.train_step_streamed
    else:
      data = jax.tree.map(
          lambda a, w=whole: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                  sharding=w),
          pipeline.DeviceData(*map(np.asarray, arrays)))
      perm = jax.ShapeDtypeStruct((phase.replicas, n), jnp.int32,
                                  sharding=rep)
      inputs = (data, perm)
      train_step = step_lib.train_step
    step_fn = step_lib.jit(functools.partial(
        train_step, model=model, tx=phase.tx, schedule=phase.schedule,
        cfg=run.step_config(phase.batch_size, phase.mesh, phase.replicas,
                            phase),
        mesh=phase.mesh), donate_argnums=0)
    memory = step_fn.lower(state, *inputs).compile().memory_analysis()
    per_device = None
    if memory is not None:
      per_device = int(memory.argument_size_in_bytes
                       + memory.output_size_in_bytes
                       + memory.temp_size_in_bytes
                       - memory.alias_size_in_bytes)
    params = sum(x.size for x in jax.tree.leaves(shapes.params))
    plan[phase.name] = {
        'mesh': dict(phase.mesh.shape), 'replicas': phase.replicas,
        'batch_size': phase.batch_size, 'steps': phase.total_steps,
        'epochs': phase.total_steps / phase.steps_per_epoch,
        'parameters_per_replica': int(params // phase.replicas),
        'bytes_per_device': per_device}
  return plan


def _in_main_thread() -> bool:
  import threading
  return threading.current_thread() is threading.main_thread()


def _run_phases(run: _Run, phase1: Phase, phase2: Phase | None):
  config = run.config
  sample = jnp.zeros((1,) + arrays_shape(run), run.dtype)

  def template(phase: Phase):
    return state_template(run.model, phase, sample)

  def template_for(meta):
    return {'phase1': lambda: template(phase1),
            'phase2': lambda: template(phase2)}.get(
                meta['phase'], lambda: None)()

  latest = run.ckpt.restore_newest(template_for)
  ckpt_step, meta, restored = latest or (0, {'phase': 'phase1'}, None)
  summary = meta.get('summary', {})
  if latest:
    logging.info('Resuming from checkpoint %d (%s, step %d%s).', ckpt_step,
                 meta['phase'], meta.get('phase_step', 0),
                 ', complete' if meta.get('complete') else '')

  # ---- Phase 1: one model, large batch, data parallel.
  if meta['phase'] == 'phase1':
    if latest:
      state = restored
    else:
      init = step_lib.jit(
          functools.partial(step_lib.init_replicas, run.model, phase1.tx),
          out_shardings=NamedSharding(phase1.mesh, P('replica')))
      state = init(_replica_keys(config.seed, _INIT, 1), sample)
      state = state.replace(key=jax.device_put(
          _replica_keys(config.seed, _PHASE1, 1),
          NamedSharding(phase1.mesh, P('replica'))))
      n_params = sum(x.size for x in jax.tree.leaves(state.params))
      summary['parameters'] = int(n_params)
      logging.info('Model %s: %s parameters.', config.model.name,
                   f'{n_params:,}')
      if config.model.name == 'capsnet':
        from jaxcaps import model as capsnet
        logging.info('Parameters per layer:\n%s',
                     capsnet.parameter_summary(state.params)[1])
    if not meta.get('complete'):
      _log_phase_start(phase1, meta.get('phase_step', 0))
      state, info, meta = _train_phase(run, phase1, state, meta, 0)
      acc = run.evaluate(phase1.mesh, state.params, state.batch_stats,
                         'test')
      info['test_accuracy'] = float(acc[0])
      summary['phase1'] = info
      meta['summary'] = summary
      run.save(info['steps'], state, meta)
      logging.info('phase1 done: %d steps (%.2f epochs) in %.1f s, stopped '
                   'by %s; test accuracy %.4f.', info['steps'],
                   info['epochs'], info['seconds'], info['stopped_by'],
                   info['test_accuracy'])
    ckpt_step = summary['phase1']['steps']
    if phase2 is None:
      return _finish(run, summary, phase1.mesh, state.params,
                     state.batch_stats, ckpt_step + 1)
    state = _start_phase2(run, phase2, state)
    meta = {'phase': 'phase2', 'phase_step': 0, 'summary': summary}
  elif meta['phase'] == 'phase2':
    state = restored
  else:
    logging.info('This run is complete; its summary is in %s.',
                 run.workdir / 'summary.json')
    return summary

  # ---- Phase 2: W replicas, small batches, no communication.
  offset = summary['phase1']['steps']
  if not meta.get('complete'):
    _log_phase_start(phase2, meta.get('phase_step', 0))
    state, info, meta = _train_phase(run, phase2, state, meta, offset)
    acc = run.evaluate(phase2.mesh, state.params, state.batch_stats, 'test')
    info['replica_test_accuracy'] = [float(a) for a in acc]
    summary['phase2'] = info
    meta['summary'] = summary
    run.save(offset + info['steps'], state, meta)
    logging.info('phase2 done: %d replicas x %d steps in %.1f s; replica '
                 'test accuracy %s.', phase2.replicas, info['steps'],
                 info['seconds'], ' '.join(f'{a:.4f}' for a in acc))

  # ---- Phase 3: average, recompute BN statistics, evaluate.
  return _average(run, phase1, phase2, state, summary,
                  offset + summary['phase2']['steps'] + 1)


def arrays_shape(run: _Run) -> tuple[int, ...]:
  return image_shape(run.arrays)


def _start_phase2(run: _Run, phase2: Phase, state):
  """Phase-1 weights and BN statistics, copied into W replicas."""
  one = jax.device_get(jax.tree.map(lambda x: x[:1],
                                    (state.params, state.batch_stats)))
  keys = _replica_keys(run.config.seed, _PHASE2, phase2.replicas)
  first = step_lib.ReplicaState(params=one[0], batch_stats=one[1],
                                opt_state=None, step=None, key=None)
  rep = NamedSharding(phase2.mesh, P('replica'))
  start = step_lib.jit(
      functools.partial(step_lib.start_phase, tx=phase2.tx,
                        swa=phase2.swa_every > 0),
      out_shardings=rep)
  return start(first, keys=keys)


def _average(run: _Run, phase1: Phase, phase2: Phase, state, summary,
             ckpt_step: int):
  config = run.config
  t0 = time.perf_counter()
  bad = summary['phase2'].get('bad_replicas', [])
  weights = np.ones(phase2.replicas, np.float32)
  weights[bad] = 0.0
  logging.info('phase3: averaging %d replicas%s, then recomputing BN '
               'statistics over %d batches of %d.', int(weights.sum()),
               f' (left out: {bad})' if bad else '',
               config.phase3.bn_batches, config.phase3.bn_batch_size)
  if phase2.swa_every:
    snapshots = sum(1 for t in range(1, phase2.total_steps + 1)
                    if t >= phase2.swa_start
                    and (t - phase2.swa_start) % phase2.swa_every == 0)
    logging.info('phase3: each replica contributes its SWA average of %d '
                 'snapshots.', snapshots)
    summary['phase2']['swa_snapshots'] = snapshots
    state = state.replace(params=step_lib.jit(step_lib.swa_params)(state))
  avg = step_lib.jit(step_lib.average,
                     out_shardings=NamedSharding(phase2.mesh, P()))(
                         (state.params, state.batch_stats),
                         jnp.asarray(weights))
  mesh = phase1.mesh
  rep = NamedSharding(mesh, P('replica'))
  params, batch_stats = jax.device_put(jax.device_get(avg), rep)
  cfg = run.step_config(config.phase3.bn_batch_size, mesh, 1)
  if run.streamed:
    batch_stats = _recompute_streamed(run, mesh, cfg, params, batch_stats)
  else:
    recompute = step_lib.jit(functools.partial(
        step_lib.recompute_batch_stats, model=run.model,
        num_batches=config.phase3.bn_batches, cfg=cfg, mesh=mesh),
        out_shardings=rep)
    keys = jax.device_put(_replica_keys(config.seed, _PHASE3, 1), rep)
    batch_stats = recompute(params, batch_stats, keys, run.data_on(mesh))
  jax.block_until_ready(batch_stats)
  summary['phase3'] = {'seconds': time.perf_counter() - t0,
                       'bn_batches': config.phase3.bn_batches,
                       'averaged_replicas': int(weights.sum())}
  return _finish(run, summary, mesh, params, batch_stats, ckpt_step)


def _recompute_streamed(run: _Run, mesh, cfg, params, batch_stats):
  """`recompute_batch_stats` over streamed batches: their plain average."""
  if not jax.tree.leaves(batch_stats):
    return batch_stats
  n = run.config.phase3.bn_batches
  spe = run.n_train // cfg.batch_size
  rep = NamedSharding(mesh, P('replica'))
  batch = NamedSharding(mesh, P('replica', 'data'))
  fn = step_lib.jit(functools.partial(
      step_lib.batch_statistics, model=run.model, cfg=cfg, mesh=mesh),
      out_shardings=rep)
  batches = run.arrays.stream.train_batches(_PHASE3, batch, 1, cfg.batch_size,
                                            spe, 0)
  total = None
  for _ in range(n):
    images, _ = next(batches)
    stats = fn(params, batch_stats, images, *run.data_on(mesh))
    total = stats if total is None else jax.tree.map(jnp.add, total, stats)
  return jax.tree.map(lambda t: t / n, total)


def _finish(run: _Run, summary, mesh, params, batch_stats, ckpt_step):
  """Evaluates the final model, saves it and writes summary.json."""
  test = run.evaluate(mesh, params, batch_stats, 'test')
  val = run.evaluate(mesh, params, batch_stats, 'val')
  summary['final'] = {'test_accuracy': float(test[0]),
                      'val_accuracy': None if val is None else float(val[0])}
  summary['total_seconds'] = sum(
      summary[p]['seconds'] for p in ('phase1', 'phase2', 'phase3')
      if p in summary)
  meta = {'phase': 'done', 'complete': True, 'summary': summary}
  run.save(ckpt_step, {'params': params, 'batch_stats': batch_stats}, meta)
  run.writer.write_scalars(ckpt_step, {
      'final/test_accuracy': test[0], 'wall_time': summary['total_seconds']})
  if run.is_main:
    path = run.workdir / 'summary.json'
    tmp = path.with_suffix('.json.tmp')
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, path)
  logging.info('Done: final test accuracy %.4f in %.1f s; summary in %s.',
               test[0], summary['total_seconds'],
               run.workdir / 'summary.json')
  return summary


def format_summary(summary: dict[str, Any]) -> str:
  """The summary as a short human-readable table."""
  lines = []
  p1 = summary.get('phase1')
  if p1:
    lines.append(f"phase1  {p1['steps']:6d} steps  {p1['epochs']:6.2f} ep  "
                 f"{p1['seconds']:7.1f} s  "
                 f"{p1['images_per_second'] or 0:8.0f} img/s  "
                 f"test {p1['test_accuracy']:.4f}  ({p1['stopped_by']})")
  p2 = summary.get('phase2')
  if p2:
    accs = ' '.join(f'{a:.4f}' for a in p2['replica_test_accuracy'])
    lines.append(f"phase2  {p2['steps']:6d} steps  {p2['epochs']:6.2f} ep  "
                 f"{p2['seconds']:7.1f} s  "
                 f"{p2['images_per_second'] or 0:8.0f} img/s  "
                 f"replicas {accs}")
  p3 = summary.get('phase3')
  if p3:
    lines.append(f"phase3  average of {p3['averaged_replicas']}, BN over "
                 f"{p3['bn_batches']} batches  {p3['seconds']:7.1f} s")
  final = summary.get('final', {})
  if final:
    lines.append(f"final   test accuracy {final['test_accuracy']:.4f}"
                 f"  total {summary['total_seconds']:.1f} s")
  return '\n'.join(lines)

