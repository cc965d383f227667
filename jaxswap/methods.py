"""The SWAP paper's comparison as edits of one config: a method per name.

The trainer has one code path; a method is only a choice of its phases:

- `sgd_small`: phase 1 alone, small batch, for the whole budget.
- `sgd_large`: phase 1 alone, large batch, the learning rate scaled with it.
- `swa`: sequential SWA (Izmailov et al. 2018). Small-batch SGD for most of
  the budget, then one replica that keeps a flat rate and averages its
  weights twice an epoch; phase 3 recomputes the BN statistics.
- `swap`: large-batch phase 1 until the stopping accuracy (or its share of
  the budget), then W replicas with small batches, averaged in phase 3.

Every method sees the same data, model and epochs (phase 2 counted per
replica, as each replica would run on its own workers).
"""

import dataclasses

import ml_collections

METHODS = ('sgd_small', 'sgd_large', 'swa', 'swap')


@dataclasses.dataclass(frozen=True)
class Budget:
  """What the methods share, and the few settings that are each one's own.

  Attributes:
    train_size: training examples (sets SWA's averaging interval).
    epochs: the budget, in passes over the training set.
    small_batch: global batch of small-batch SGD, SWA and SWAP's phase 2
      (per replica).
    small_lr: peak learning rate at `small_batch`.
    large_batch: global batch of large-batch SGD and SWAP's phase 1.
    large_lr: peak learning rate at `large_batch`.
    tail_epochs: the last epochs of the budget that SWA averages over and
      that SWAP's replicas train for.
    swa_lr: SWA's flat rate over its tail.
    stop_accuracy: SWAP's phase-1 stopping training accuracy (None trains
      phase 1 to `epochs - tail_epochs`).
    replicas: SWAP's W.
  """
  train_size: int
  epochs: float
  small_batch: int
  small_lr: float
  large_batch: int
  large_lr: float
  tail_epochs: float
  swa_lr: float
  stop_accuracy: float | None
  replicas: int


def apply(config: ml_collections.ConfigDict, method: str,
          budget: Budget) -> ml_collections.ConfigDict:
  """Sets `config`'s phases for `method` on `budget`; returns it."""
  if method not in METHODS:
    raise ValueError(f'unknown method {method!r}; choose one of '
                     f'{", ".join(METHODS)}')
  p1, p2 = config.phase1, config.phase2
  small = method in ('sgd_small', 'swa')
  p1.batch_size = budget.small_batch if small else budget.large_batch
  p1.peak_lr = budget.small_lr if small else budget.large_lr
  p1.max_epochs = budget.epochs
  p2.replicas = 0
  if method in ('sgd_small', 'sgd_large'):
    return config

  p1.max_epochs = budget.epochs - budget.tail_epochs
  p2.batch_size = budget.small_batch
  p2.epochs = budget.tail_epochs
  if method == 'swa':
    # Phase 1 decays to the flat rate the tail keeps.
    p1.final_lr = budget.swa_lr
    p2.replicas = 1
    p2.peak_lr = p2.final_lr = budget.swa_lr
    p2.swa_every_steps = budget.train_size // (2 * budget.small_batch)
    p2.swa_start_epochs = 0.0
  else:
    p1.stop_accuracy = budget.stop_accuracy
    p2.replicas = budget.replicas
    p2.peak_lr = budget.small_lr
  return config
