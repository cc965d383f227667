"""`jaxswap.main` that SIGKILLs itself at a named point, for the kill tests.

  python tests/killed_main.py POINT --config=... --workdir=...

POINT is one of

  after:SECONDS        a timer from the start (imports, data, compiling);
  step:PHASE:STEP      once step STEP of PHASE ('phase1', 'phase2') ran;
  save:PHASE:SECONDS   SECONDS after a checkpoint of PHASE ('phase1',
                       'phase2', 'done') went to orbax, which writes it in
                       the background: 0 kills it mid-write;
  average              as phase 3 starts averaging the replicas;
  recompute:SECONDS    SECONDS into phase 3's BatchNorm recompute;
  summary              while summary.json is being written.

The hooks wrap host-side calls only, so the computation and its numbers are
the trainer's own. A kill can be no more abrupt than SIGKILL: no handler,
no flush, no atexit.
"""

import os
import pathlib
import signal
import sys
import threading

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# pylint: disable=g-import-not-at-top,wrong-import-position
from jaxswap import checkpoint
from jaxswap import main
from jaxswap import metrics
from jaxswap import step as step_lib


def _die():
  os.kill(os.getpid(), signal.SIGKILL)


def _die_in(seconds: float):
  if seconds <= 0:
    _die()
  threading.Timer(seconds, _die).start()


def _after_call(owner, name, condition, then):
  """Wraps owner.name so that `then()` runs after a call it matches."""
  original = getattr(owner, name)

  def wrapped(*args, **kwargs):
    result = original(*args, **kwargs)
    if condition(*args, **kwargs):
      then()
    return result
  setattr(owner, name, wrapped)


def _before_call(owner, name, condition, then):
  """Wraps owner.name so that `then()` runs before a call it matches."""
  original = getattr(owner, name)

  def wrapped(*args, **kwargs):
    if condition(*args, **kwargs):
      then()
    return original(*args, **kwargs)
  setattr(owner, name, wrapped)


def install(point: str) -> None:
  kind, *args = point.split(':')
  if kind == 'after':
    _die_in(float(args[0]))
  elif kind == 'step':
    phase, at = args[0], int(args[1])
    _after_call(metrics.Progress, 'update',
                lambda self, step, *_: self.phase == phase and step == at,
                _die)
  elif kind == 'save':
    phase, delay = args[0], float(args[1])
    _after_call(checkpoint.Checkpointer, 'save',
                lambda self, step, state, meta: meta['phase'] == phase,
                lambda: _die_in(delay))
  elif kind == 'average':
    _before_call(step_lib, 'average', lambda *_, **__: True, _die)
  elif kind == 'recompute':
    delay = float(args[0])
    _before_call(step_lib, 'recompute_batch_stats', lambda *_, **__: True,
                 lambda: _die_in(delay))
  elif kind == 'summary':
    _before_call(pathlib.Path, 'write_text',
                 lambda path, *_, **__: path.name == 'summary.json.tmp', _die)
  else:
    raise ValueError(f'unknown kill point {point!r}')


if __name__ == '__main__':
  install(sys.argv.pop(1))
  main.run()
