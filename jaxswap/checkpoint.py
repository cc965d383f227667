"""Orbax checkpoints of a run: the replica states and a JSON cursor.

A checkpoint holds two items: `state` (the pytree of the phase being
trained, sharded as on the mesh) and `meta` (where the run is: phase, step,
the host-side history a resumed run needs to take the same decisions, and
the summary so far). Orbax writes each checkpoint to a temporary folder and
renames it when complete, so a write cut short by a kill is never taken for
a checkpoint.
"""

import pathlib
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores (state, meta) pairs under `directory`."""

  def __init__(self, directory: pathlib.Path, keep: int):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    self._manager = ocp.CheckpointManager(directory.absolute(),
                                          options=options)

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                       force=True)

  def latest(self) -> tuple[int, dict[str, Any]] | None:
    """(step, meta) of the newest checkpoint, or None."""
    step = self._manager.latest_step()
    if step is None:
      return None
    restored = self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))
    return step, restored['meta']

  def restore(self, step: int, like: Any) -> Any:
    """The state of checkpoint `step`, shaped and sharded like `like`."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        like)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
    logging.info('Restored checkpoint %d.', step)
    return restored['state']

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
