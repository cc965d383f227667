"""Metric writers and progress display; side effects of the train loop."""

import json
import pathlib
import sys
import time
from typing import Any, Mapping

from absl import logging
from clu import metric_writers
from clu.metric_writers import interface
import numpy as np


class JsonlWriter(interface.MetricWriter):
  """Scalars as one JSON object per line: {"step": s, "name": value, ...}."""

  def __init__(self, path: pathlib.Path):
    self._file = open(path, 'a', encoding='utf-8')

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {'step': int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    self._file.write(json.dumps(row) + '\n')

  def write_summaries(self, step, values, metadata=None):
    self.write_scalars(step, {k: v for k, v in values.items()
                              if np.ndim(v) == 0})

  def write_hparams(self, hparams):
    self._file.write(json.dumps({'hparams': hparams}, default=str) + '\n')

  def write_texts(self, step, texts):
    self._file.write(json.dumps({'step': int(step), **texts}) + '\n')

  # Only scalars and texts belong in a JSON-lines log.
  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def flush(self):
    self._file.flush()

  def close(self):
    self._file.close()


def make_writer(workdir: pathlib.Path, is_main: bool
                ) -> interface.MetricWriter:
  """TensorBoard events and metrics.jsonl in the work directory.

  Only the main process writes; the others get a writer that drops all.
  """
  if not is_main:
    return metric_writers.MultiWriter([])
  return metric_writers.MultiWriter([
      metric_writers.SummaryWriter(str(workdir / 'tensorboard')),
      JsonlWriter(workdir / 'metrics.jsonl'),
  ])


class Progress:
  """A progress bar on a terminal, else a log line every `log_every` steps.

  Shows the phase, loss, training accuracy, images/s and the ETA.
  """

  def __init__(self, phase: str, total: int, start: int,
               images_per_step: int, log_every: int, mode: str = 'auto',
               enabled: bool = True):
    self.phase, self.total, self.start = phase, total, start
    self.images_per_step, self.log_every = images_per_step, log_every
    self.enabled = enabled
    use_bar = mode == 'bar' or (mode == 'auto' and sys.stderr.isatty())
    self._bar = None
    if use_bar and enabled:
      import tqdm
      self._bar = tqdm.tqdm(total=total, initial=start, desc=phase,
                            unit='step', dynamic_ncols=True, leave=True)
    self._t0 = None
    self._s0 = start

  def update(self, step: int, loss: float, accuracy: float):
    """Called after `step` steps of the phase are done."""
    if not self.enabled:
      return
    now = time.perf_counter()
    if self._t0 is None:  # The first step compiles; time from after it.
      self._t0, self._s0 = now, step
    rate = (step - self._s0) / max(now - self._t0, 1e-9)
    ips = rate * self.images_per_step
    eta = (self.total - step) / rate if rate > 0 else float('nan')
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix(loss=f'{loss:.3f}', acc=f'{accuracy:.3f}',
                            img_s=f'{ips:.0f}')
    elif step % self.log_every == 0 or step == self.total:
      logging.info('%s step %d/%d  loss %.4f  acc %.4f  %.0f img/s  ETA %s',
                   self.phase, step, self.total, loss, accuracy, ips,
                   _duration(eta))

  def close(self):
    if self._bar is not None:
      self._bar.close()


def _duration(seconds: float) -> str:
  if not np.isfinite(seconds):
    return '?'
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'
