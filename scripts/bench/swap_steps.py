"""The SWAP train step of ResNet-9, jitted as `jaxswap.train` jits it.

`PhaseStep` builds W replicas on a ('replica', 'data') mesh, places a
synthetic uint8 data set on it, and compiles either the trainer's own step
(`jaxswap.step.train_step`: gather, crop, flip and normalize on the device,
then forward, loss, backward and the SGD update) or the same step fed a
batch that is already on the device (`step.train_step_streamed`, the
streamed input path's step), so that the two differ by the input pipeline
alone.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxswap import config as config_lib
from jaxswap import schedules
from jaxswap import step as step_lib
from jaxswap.data import pipeline
from jaxswap.models.resnet9 import ResNet9

# XLA:CPU hands convolutions, reductions and some dots to YNNPACK fusions
# by default. NO_YNN turns them all off (convolutions then run on Eigen);
# YNN_REDUCE keeps YNNPACK for the reductions only (see benchmarks.md).
NO_YNN = {'xla_cpu_experimental_ynn_fusion_type': ''}
YNN_REDUCE = step_lib.CPU_OPTIONS


def synthetic_arrays(n: int, shape: tuple[int, int, int], classes: int = 10,
                     seed: int = 0) -> pipeline.DeviceData:
  """Random uint8 images and labels, shaped like a real data set."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n,) + shape, dtype=np.uint8)
  labels = rng.integers(0, classes, n).astype(np.int32)
  c = shape[-1]
  return pipeline.DeviceData(
      train_images=images, train_labels=labels, test_images=images[:0],
      test_labels=labels[:0], val_images=images[:0], val_labels=labels[:0],
      mean=np.full((c,), 0.45, np.float32),
      std=np.full((c,), 0.25, np.float32))


def sgd(total_steps: int = 1000):
  """The trainer's optimizer: Nesterov momentum 0.9, decay 5e-4 on kernels."""
  schedule = schedules.warmup_then_decay(0.1, 10, total_steps)
  return schedule, step_lib.make_optimizer(schedule, 0.9, True, 5e-4)


class PhaseStep:
  """W replicas of a model and one compiled train step over them.

  Args:
    model: a Flax module following the trainer's protocol.
    replicas: W.
    batch_size: examples per replica per step.
    shape: (H, W, C) of the images.
    unroll: `over_replicas` mode; None picks what the trainer picks on
      the CPU (unroll unless the replicas are one per device).
    ready: feed a batch already on the device instead of the pipeline.
    compiler_options: XLA options of this one compilation; None is the
      trainer's (`jaxswap.step.compiler_options()`), {} XLA's defaults.
    num_devices: devices of the mesh (the first ones of jax.devices()).
    n_train: size of the synthetic data set.
  """

  def __init__(self, model, replicas: int, batch_size: int,
               shape: tuple[int, int, int], *, unroll: bool | None = None,
               ready: bool = False, compiler_options: dict | None = None,
               num_devices: int = 1, n_train: int = 4096,
               crop_padding: int = 2, label_smoothing: float = 0.0):
    r, d = config_lib.mesh_shape(replicas, num_devices)
    devices = np.asarray(jax.devices()[:num_devices]).reshape(r, d)
    self.mesh = jax.sharding.Mesh(devices, ('replica', 'data'))
    if unroll is None:
      unroll = replicas > r or replicas == 1
    self.images_per_step = replicas * batch_size
    self.cfg = step_lib.StepConfig(
        batch_size=batch_size, crop_padding=crop_padding, flip=True,
        label_smoothing=label_smoothing, unroll=unroll)
    schedule, tx = sgd()
    rep = NamedSharding(self.mesh, P('replica'))
    whole = NamedSharding(self.mesh, P())

    arrays = synthetic_arrays(max(n_train, batch_size), shape)
    self.data = pipeline.put(arrays, whole)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(
        jnp.arange(replicas))
    keys = jax.random.key_data(keys)
    init = jax.jit(functools.partial(step_lib.init_replicas, model, tx),
                   out_shardings=rep)
    self.state = init(keys, jnp.zeros((1,) + shape))
    self.perm = jax.jit(functools.partial(
        pipeline.permutations, n=arrays.train_images.shape[0]),
                        out_shardings=rep)(self.state.key, 0)

    bound = dict(model=model, tx=tx, schedule=schedule, cfg=self.cfg,
                 mesh=self.mesh)
    if ready:
      fn = functools.partial(step_lib.train_step_streamed, **bound)
      self.inputs = (*jax.device_put(
          (arrays.train_images[:replicas * batch_size].reshape(
              (replicas, batch_size) + shape),
           arrays.train_labels[:replicas * batch_size].reshape(
               replicas, batch_size)), rep), self.data.mean, self.data.std)
      in_shardings = (rep, rep, rep, whole, whole)
    else:
      fn = functools.partial(step_lib.train_step, **bound)
      self.inputs = (self.data, self.perm)
      in_shardings = (rep, whole, rep)
    jitted = jax.jit(fn, in_shardings=in_shardings,
                     out_shardings=(rep, whole), donate_argnums=0)
    self.compiled = jitted.lower(self.state, *self.inputs).compile(
        compiler_options=(step_lib.compiler_options()
                          if compiler_options is None else compiler_options))
    self.metrics = None

  def __call__(self) -> None:
    """One step, to completion."""
    self.state, self.metrics = self.compiled(self.state, *self.inputs)
    jax.block_until_ready(self.metrics)

  def memory(self) -> dict[str, float]:
    import common  # pylint: disable=g-import-not-at-top
    return common.xla_memory_mib(self.compiled)


def resnet9(width: float, classes: int = 10, dtype: Any = jnp.float32):
  return ResNet9(num_classes=classes, width=width, dtype=dtype)
