"""Orbax checkpoints of a run: the replica states and a JSON cursor.

A checkpoint holds two items: `state` (the pytree of the phase being
trained, sharded as on the mesh) and `meta` (where the run is: phase, step,
the host-side history a resumed run needs to take the same decisions, and
the summary so far). Orbax writes each checkpoint to a temporary folder and
renames it when complete, so a write cut short by a kill is never taken for
a checkpoint.
"""

import contextlib
import errno
import logging as py_logging
import os
import pathlib
import re
from typing import Any, Callable

from absl import logging
import orbax.checkpoint as ocp


class CheckpointWriteError(OSError):
  """Orbax (or TensorStore under it) failed to write a checkpoint file."""


def _write_errno(e: Exception) -> int | None:
  """The errno of a TensorStore failure to write a file, else None.

  TensorStore reports a failed write as a ValueError whose text carries the
  OS error code, and orbax raises it from a background thread at the next
  save or wait.
  """
  text = str(e)
  code = re.search(r"os_error_code='?(\d+)", text)
  if code:
    return int(code.group(1))
  if 'No space left' in text:
    return errno.ENOSPC
  if 'Error writing' in text or 'Failed writing' in text:
    return errno.EIO
  return None


@contextlib.contextmanager
def _writing():
  """Turns TensorStore's failures to write into CheckpointWriteError."""
  try:
    yield
  except OSError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    code = _write_errno(e)
    if code is None:
      raise
    # The same save's other files fail after this one, in futures nobody
    # awaits; asyncio logs each with orbax's traceback when they are
    # collected, which happens while the error is still unwinding, so it
    # is silenced here rather than where the run reports the error.
    py_logging.getLogger('asyncio').setLevel(py_logging.CRITICAL)
    raise CheckpointWriteError(code, os.strerror(code)) from e


class Checkpointer:
  """Saves and restores (state, meta) pairs under `directory`."""

  def __init__(self, directory: pathlib.Path, keep: int):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self._manager = ocp.CheckpointManager(directory.absolute(),
                                          options=options)

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Starts writing checkpoint `step`; orbax finishes it in the background.

    Raises:
      CheckpointWriteError: this or the previous write failed.
    """
    with _writing():
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          meta=ocp.args.JsonSave(meta)), force=True)

  def steps(self) -> list[int]:
    """Finished checkpoints, newest first."""
    return sorted(self._manager.all_steps(), reverse=True)

  def meta(self, step: int) -> dict[str, Any]:
    restored = self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))
    return restored['meta']

  def restore_newest(self, template_for: Callable[[dict[str, Any]], Any]):
    """The newest checkpoint that reads back whole, as (step, meta, state).

    A checkpoint that fails to read (a corrupted or half-deleted file) is
    reported and skipped for the next older one.

    Args:
      template_for: maps a checkpoint's meta to the abstract state to
        restore into, or None to restore only the meta.

    Returns:
      (step, meta, state or None), or None if no checkpoint reads back.
    """
    for step in self.steps():
      try:
        meta = self.meta(step)
        like = template_for(meta)
        state = None if like is None else self.restore(step, like)
        return step, meta, state
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Checkpoint %d does not read back (%s: %s); '
                        'deleting it and falling back to an older one.',
                        step, type(e).__name__, str(e).split('\n')[0][:200])
        # Its step would come round again and collide with the new save.
        self._manager.delete(step)
    return None

  def restore(self, step: int, like: Any) -> Any:
    """The state of checkpoint `step` as the abstract pytree `like`."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(like)))
    logging.info('Restored checkpoint %d.', step)
    return restored['state']

  def wait(self) -> None:
    with _writing():
      self._manager.wait_until_finished()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()
