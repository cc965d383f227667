"""The numerics of a run as pure functions of pytrees.

Every function here acts on a stack of W replicas (a leading replica axis):
phase 1 is W = 1, phase 2 is W refinement replicas, phase 3 averages them.
The per-replica computation is written once and mapped over the replicas
by `over_replicas`: under `jax.jit` over a ('replica', 'data') mesh the
replica axis is manual (`shard_map`), each device mapping its own
replicas, and each replica's batch is sharded over the data axis by the
compiler, so BatchNorm statistics over such a batch are global per replica
without explicit collectives.
"""

import functools
import os
from typing import Any, Callable

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxswap.data import pipeline

PyTree = Any


@flax.struct.dataclass
class ReplicaState:
  """Training state of one replica (or, stacked, of W replicas)."""
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  step: jax.Array           # int32, steps taken in this phase
  key: jax.Array            # uint32[2]; data order and augmentation
  # Sequential SWA's running sum of weights and its count; None when off.
  swa_sum: PyTree = None
  swa_count: jax.Array | None = None


@flax.struct.dataclass
class StepConfig:
  """The static settings of a training step."""
  batch_size: int = flax.struct.field(pytree_node=False)
  crop_padding: int = flax.struct.field(pytree_node=False)
  flip: bool = flax.struct.field(pytree_node=False)
  label_smoothing: float = flax.struct.field(pytree_node=False)
  dtype: Any = flax.struct.field(pytree_node=False, default=jnp.float32)
  unroll: bool = flax.struct.field(pytree_node=False, default=False)
  # 'cross_entropy', or a capsule routing's own loss: 'margin' (dynamic
  # routing) or 'spread' (EM routing, margin ramped over `total_steps`).
  loss: str = flax.struct.field(pytree_node=False, default='cross_entropy')
  total_steps: int = flax.struct.field(pytree_node=False, default=1)
  # Sequential SWA: from step `swa_start` on, add the weights to a running
  # sum every `swa_every` steps (0: off).
  swa_every: int = flax.struct.field(pytree_node=False, default=0)
  swa_start: int = flax.struct.field(pytree_node=False, default=0)


def over_replicas(fn: Callable, *args, unroll: bool = False, mesh=None,
                  shared: Any = None):
  """Applies `fn` to each replica's slice of `args` (leading axis W).

  `vmap` (the default) makes one batched computation, which is what
  accelerators want. XLA's CPU backend runs the grouped convolutions that
  vmap makes of per-replica weights about 3x slower than separate ones, so
  on the CPU `unroll=True` traces W copies of `fn` into the same program.
  Both give the same numbers.

  On a mesh whose 'replica' axis has more than one device, the replica
  axis is made manual with `shard_map`: each device maps only its own
  replicas, and the 'data' axis inside is left to the compiler. (Under a
  plain `vmap(spmd_axis_name=...)` XLA's partitioner does not split the
  grouped convolutions along the replicas; it gathers every replica onto
  every device, so each device would compute all of them.)

  Args:
    fn: maps one replica's slices of `args` (and `shared`, if given, as a
      last argument) to a pytree.
    *args: pytrees of (W, ...) arrays.
    unroll: trace W copies instead of vmapping.
    mesh: the ('replica', 'data') mesh the computation is jitted over.
    shared: a pytree every replica reads whole (the data set), or None.

  Returns:
    The stacked (W, ...) results.
  """
  extra = () if shared is None else (shared,)
  if mesh is not None and mesh.shape['replica'] > 1:
    def local(*parts):  # This device's replicas, and `shared` whole.
      return over_replicas(fn, *parts[:len(args)], unroll=unroll,
                           shared=parts[len(args)] if extra else None)
    specs = (jax.tree.map(lambda _: P('replica'), args)
             + jax.tree.map(lambda _: P(), extra))
    return jax.shard_map(local, mesh=mesh, in_specs=specs,
                         out_specs=P('replica'),
                         axis_names=frozenset({'replica'}),
                         check_vma=False)(*args, *extra)
  if not unroll:
    return jax.vmap(lambda *a: fn(*a, *extra))(*args)
  w = jax.tree.leaves(args[0])[0].shape[0]
  outs = [fn(*jax.tree.map(lambda a, i=i: a[i], args), *extra)
          for i in range(w)]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


def make_optimizer(schedule: Callable, momentum: float, nesterov: bool,
                   weight_decay: float) -> optax.GradientTransformation:
  """SGD with momentum, and weight decay on kernels only (not BN or bias)."""
  def kernels(params):
    return jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=kernels),
      optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov))


def init_replicas(model: nn.Module, tx: optax.GradientTransformation,
                  keys: jax.Array, sample: jax.Array) -> ReplicaState:
  """Fresh, independently initialized replicas, one per key: (W, ...)."""
  def one(key):
    init_key, data_key = jax.random.split(key)
    variables = model.init(init_key, sample, train=False)
    params = variables['params']
    return ReplicaState(params=params,
                        batch_stats=variables.get('batch_stats', {}),
                        opt_state=tx.init(params),
                        step=jnp.zeros((), jnp.int32), key=data_key)
  return jax.vmap(one)(keys)


def start_phase(state: ReplicaState, tx: optax.GradientTransformation,
                keys: jax.Array, swa: bool = False) -> ReplicaState:
  """Copies a one-replica state into len(keys) replicas for a new phase.

  Each starts from the same weights and BN statistics, with fresh optimizer
  state, step 0 and its own data key (and an empty SWA sum if `swa`).
  """
  w = keys.shape[0]

  def tile(x):
    return jnp.broadcast_to(x, (w,) + x.shape[1:])
  params = jax.tree.map(tile, state.params)
  new = ReplicaState(params=params,
                     batch_stats=jax.tree.map(tile, state.batch_stats),
                     opt_state=jax.vmap(tx.init)(params),
                     step=jnp.zeros((w,), jnp.int32), key=keys)
  return with_swa(new) if swa else new


def loss_fn_for(cfg: StepConfig, step: jax.Array) -> Callable:
  """(outputs, labels) -> mean loss, as `cfg.loss` names it."""
  if cfg.loss == 'cross_entropy':
    return lambda logits, labels: cross_entropy(
        logits, labels, logits.shape[-1], cfg.label_smoothing)
  from jaxcaps import baselines
  if cfg.loss == 'margin':
    return baselines.margin_loss
  if cfg.loss == 'spread':
    margin = baselines.spread_margin(step, cfg.total_steps)
    return lambda out, labels: baselines.spread_loss(out, labels, margin)
  raise ValueError(f'unknown loss {cfg.loss!r}')


def with_swa(state: ReplicaState) -> ReplicaState:
  """Adds an empty SWA running sum to (W, ...) replica states."""
  return state.replace(
      swa_sum=jax.tree.map(jnp.zeros_like, state.params),
      swa_count=jnp.zeros_like(state.step))


def swa_params(state: ReplicaState) -> PyTree:
  """Each replica's SWA average (its final weights if it has none)."""
  def mean(total, last):
    count = state.swa_count.reshape((-1,) + (1,) * (last.ndim - 1))
    return jnp.where(count > 0, total / jnp.maximum(count, 1), last)
  return jax.tree.map(mean, state.swa_sum, state.params)


def cross_entropy(logits, labels, num_classes, label_smoothing=0.0):
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes),
                                label_smoothing)
  return optax.softmax_cross_entropy(logits, targets).mean()


def _constrain(x, mesh, spec):
  """Shards `x` as `spec` over `mesh` (over the context mesh, in shard_map)."""
  if mesh is None:
    return x
  if jax.sharding.get_abstract_mesh().manual_axes:
    return jax.lax.with_sharding_constraint(x, spec)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _sgd_step(state: ReplicaState, images: jax.Array, labels: jax.Array,
              mean: jax.Array, std: jax.Array, *, model, tx, schedule, cfg,
              mesh):
  """One replica's SGD step on its (augmented, uint8) batch."""
  images = _constrain(images, mesh, P('data'))
  x = pipeline.normalize(images, mean, std, cfg.dtype)

  objective = loss_fn_for(cfg, state.step)

  def loss_fn(params):
    logits, updates = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, x,
        train=True, mutable=['batch_stats'])
    loss = objective(logits, labels)
    return loss, (logits, updates.get('batch_stats', {}))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {
      'loss': loss,
      'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels),
      'lr': schedule(state.step),
      'grad_norm': optax.global_norm(grads),
      'param_norm': optax.global_norm(params),
      'update_norm': optax.global_norm(updates),
  }
  new = state.replace(params=params, batch_stats=batch_stats,
                      opt_state=opt_state, step=state.step + 1)
  if cfg.swa_every:
    since = new.step - cfg.swa_start
    take = (since >= 0) & (since % cfg.swa_every == 0)
    new = new.replace(
        swa_sum=jax.tree.map(lambda t, p: t + jnp.where(take, p, 0),
                             state.swa_sum, params),
        swa_count=state.swa_count + take.astype(jnp.int32))
  return new, metrics


def train_step(state: ReplicaState, data: pipeline.DeviceData,
               perm: jax.Array, *, model: nn.Module,
               tx: optax.GradientTransformation, schedule: Callable,
               cfg: StepConfig, mesh=None):
  """One SGD step of every replica.

  Args:
    state: (W, ...) replica states.
    data: the device-resident data set.
    perm: (W, N) each replica's data order for the current epoch.
    model, tx, schedule, cfg: bound statically with functools.partial.
    mesh: when given, each replica's batch is constrained to the 'data'
      mesh axis (the replica axis is manual, see `over_replicas`).

  Returns:
    (new state, metrics dict of (W,) arrays).
  """
  def one(state, perm, data):
    key = jax.random.fold_in(state.key, state.step)
    images, labels = pipeline.train_batch(
        data, perm, state.step, cfg.batch_size, key, cfg.crop_padding,
        cfg.flip)
    return _sgd_step(state, images, labels, data.mean, data.std,
                     model=model, tx=tx, schedule=schedule, cfg=cfg,
                     mesh=mesh)

  return over_replicas(one, state, perm, unroll=cfg.unroll, mesh=mesh,
                       shared=data)


def train_step_streamed(state: ReplicaState, images: jax.Array,
                        labels: jax.Array, mean: jax.Array, std: jax.Array,
                        *, model: nn.Module,
                        tx: optax.GradientTransformation,
                        schedule: Callable, cfg: StepConfig, mesh=None):
  """`train_step` on a batch the host read and augmented.

  Args:
    state: (W, ...) replica states.
    images: (W, B, H, W, C) uint8, each replica's batch.
    labels: (W, B) int32.
    mean, std: normalization constants.
    model, tx, schedule, cfg, mesh: as for `train_step`.

  Returns:
    (new state, metrics dict of (W,) arrays).
  """
  def one(state, images, labels, norm):
    return _sgd_step(state, images, labels, *norm, model=model, tx=tx,
                     schedule=schedule, cfg=cfg, mesh=mesh)

  return over_replicas(one, state, images, labels, unroll=cfg.unroll,
                       mesh=mesh, shared=(mean, std))


def evaluate(params: PyTree, batch_stats: PyTree, images: jax.Array,
             labels: jax.Array, mean: jax.Array, std: jax.Array, *,
             model: nn.Module, batch_size: int, dtype=jnp.float32,
             mesh=None, unroll: bool = False):
  """Correct predictions and summed loss of each replica on a split.

  Args:
    params, batch_stats: (W, ...) replica variables.
    images: (N, H, W, C) uint8; labels (N,) int32.
    mean, std: normalization constants.
    model, batch_size, dtype, mesh, unroll: bound statically.

  Returns:
    (correct (W,) int32, loss_sum (W,) float32), over the N examples.
  """
  n = images.shape[0]
  chunks = -(-n // batch_size)
  pad = chunks * batch_size - n
  images = jnp.pad(images, ((0, pad),) + ((0, 0),) * 3)
  labels = jnp.pad(labels, (0, pad), constant_values=-1)
  images = images.reshape((chunks, batch_size) + images.shape[1:])
  labels = labels.reshape(chunks, batch_size)

  def one(params, batch_stats, split):
    images, labels, mean, std = split

    def body(totals, chunk):
      x, y = chunk
      x = _constrain(x, mesh, P('data'))
      logits = model.apply({'params': params, 'batch_stats': batch_stats},
                           pipeline.normalize(x, mean, std, dtype),
                           train=False)
      valid = y >= 0
      logp = jax.nn.log_softmax(logits)
      nll = -jnp.take_along_axis(logp, jnp.maximum(y, 0)[:, None], 1)[:, 0]
      correct = jnp.sum((jnp.argmax(logits, -1) == y) & valid)
      loss = jnp.sum(jnp.where(valid, nll, 0.0))
      return (totals[0] + correct, totals[1] + loss), None
    init = (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32))
    totals, _ = jax.lax.scan(body, init, (images, labels))
    return totals

  return over_replicas(one, params, batch_stats, unroll=unroll, mesh=mesh,
                       shared=(images, labels, mean, std))


def average(tree: PyTree, weights: jax.Array | None = None) -> PyTree:
  """Weighted average over the leading replica axis, kept as size 1.

  Args:
    tree: pytree of (W, ...) arrays.
    weights: (W,) non-negative weights; None is the uniform average.

  Returns:
    Pytree of (1, ...) arrays.
  """
  def mean(x):
    if weights is None:
      return jnp.mean(x, axis=0, keepdims=True)
    w = weights.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
    return jnp.sum(w * x, axis=0, keepdims=True) / jnp.sum(w)
  return jax.tree.map(mean, tree)


def recompute_batch_stats(params: PyTree, batch_stats: PyTree,
                          keys: jax.Array, data: pipeline.DeviceData, *,
                          model: nn.Module, num_batches: int,
                          cfg: StepConfig, mesh=None) -> PyTree:
  """BatchNorm statistics as the plain average of batch statistics.

  Runs `num_batches` training batches through the model in training mode
  with BN momentum 0, so that each pass yields exactly that batch's mean
  and variance, and averages them (SWA's `bn_update`). No gradient is
  taken and nothing but the returned statistics changes.

  Args:
    params, batch_stats: (W, ...) replica variables; the statistics only
      give the tree structure.
    keys: (W, 2) data keys of the pass.
    data: the device-resident data set.
    model, num_batches, cfg, mesh: bound statically.

  Returns:
    (W, ...) recomputed batch_stats.
  """
  if not jax.tree.leaves(batch_stats):
    return batch_stats
  model0 = model.clone(bn_momentum=0.0)
  n = data.train_images.shape[0]

  def one(params, batch_stats, key, data):
    perm = jax.random.permutation(key, n).astype(jnp.int32)

    def body(total, i):
      images, _ = pipeline.train_batch(
          data, perm, i, cfg.batch_size, jax.random.fold_in(key, i),
          cfg.crop_padding, cfg.flip)
      stats = _batch_stats_of(model0, params, batch_stats, images,
                              data.mean, data.std, cfg, mesh)
      return jax.tree.map(jnp.add, total, stats), None

    zeros = jax.tree.map(jnp.zeros_like, batch_stats)
    total, _ = jax.lax.scan(body, zeros, jnp.arange(num_batches))
    return jax.tree.map(lambda t: t / num_batches, total)

  return over_replicas(one, params, batch_stats, keys, unroll=cfg.unroll,
                       mesh=mesh, shared=data)


def batch_statistics(params: PyTree, batch_stats: PyTree, images: jax.Array,
                     mean: jax.Array, std: jax.Array, *, model: nn.Module,
                     cfg: StepConfig, mesh=None) -> PyTree:
  """The BN statistics of one (W, B, ...) uint8 batch, per replica.

  The streamed form of `recompute_batch_stats`'s loop body: the caller
  averages the results over its batches.
  """
  model0 = model.clone(bn_momentum=0.0)

  def one(params, batch_stats, images, norm):
    return _batch_stats_of(model0, params, batch_stats, images, *norm, cfg,
                           mesh)

  return over_replicas(one, params, batch_stats, images, unroll=cfg.unroll,
                       mesh=mesh, shared=(mean, std))


def _batch_stats_of(model0, params, batch_stats, images, mean, std, cfg,
                    mesh):
  """One replica's BN statistics of one uint8 batch (`model0`: momentum 0)."""
  images = _constrain(images, mesh, P('data'))
  x = pipeline.normalize(images, mean, std, cfg.dtype)
  _, updates = model0.apply(
      {'params': params, 'batch_stats': batch_stats}, x, train=True,
      mutable=['batch_stats'])
  return updates['batch_stats']


# XLA:CPU hands convolutions and reductions to YNNPACK, whose convolution
# weight gradient runs 2.5-3.7x slower than XLA's Eigen kernels, while its
# reductions (BatchNorm statistics) beat XLA's own loops. Keeping it for
# reductions only makes the CPU step 1.6-2.1x faster with the same numbers
# up to float32 re-association (docs/benchmarks.md). The option is marked
# experimental, so a jaxlib that rejects it gets no options.
CPU_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type':
                'LIBRARY_FUSION_TYPE_REDUCE'}


@functools.cache
def compiler_options(backend: str | None = None) -> dict[str, str]:
  """XLA options for the jitted steps on `backend` (the default one).

  Set JAXSWAP_XLA_DEFAULTS=1 in the environment to compile with XLA's
  defaults instead.
  """
  backend = backend or jax.default_backend()
  if backend != 'cpu' or os.environ.get('JAXSWAP_XLA_DEFAULTS'):
    return {}
  try:
    jax.jit(lambda x: x.sum(), compiler_options=CPU_OPTIONS).lower(
        jax.ShapeDtypeStruct((2,), jnp.float32)).compile()
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('XLA rejects %s (%s); compiling with its defaults',
                    CPU_OPTIONS, str(e).splitlines()[0])
    return {}
  return dict(CPU_OPTIONS)


def jit(fn: Callable, **kwargs) -> Callable:
  """`jax.jit` with `compiler_options()` for the default backend."""
  return jax.jit(fn, compiler_options=compiler_options(), **kwargs)
