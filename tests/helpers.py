"""Small shared builders for the trainer's tests."""

import gzip
import pathlib
import struct

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxswap import schedules
from jaxswap import step as step_lib
from jaxswap.data import pipeline


def synthetic_arrays(n_train=256, n_test=64, shape=(8, 8, 1), classes=4,
                     seed=0) -> pipeline.DeviceData:
  """Random uint8 images whose class shifts their mean, as host arrays."""
  rng = np.random.default_rng(seed)

  def split(n):
    labels = rng.integers(0, classes, n).astype(np.int32)
    base = rng.integers(0, 128, (n,) + shape)
    images = np.clip(base + 30 * labels[:, None, None, None], 0, 255)
    return images.astype(np.uint8), labels
  tx, ty = split(n_train)
  ex, ey = split(n_test)
  c = shape[-1]
  return pipeline.DeviceData(
      train_images=tx, train_labels=ty, test_images=ex, test_labels=ey,
      val_images=tx[:0], val_labels=ty[:0],
      mean=np.full((c,), 0.4, np.float32), std=np.full((c,), 0.3,
                                                       np.float32))


def sgd(peak=0.1, total=100):
  schedule = schedules.warmup_then_decay(peak, 2, total)
  return schedule, step_lib.make_optimizer(schedule, 0.9, True, 5e-4)


def replica_keys(seed, replicas, offset=0):
  base = jax.random.PRNGKey(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(
      jnp.arange(offset, offset + replicas))


def write_idx(path: pathlib.Path, array: np.ndarray) -> None:
  """A gzipped idx file of uint8 `array`."""
  header = struct.pack('>HBB', 0, 0x08, array.ndim)
  header += struct.pack('>' + 'I' * array.ndim, *array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def write_idx_dataset(folder: pathlib.Path, n_train=512, n_test=128,
                      seed=0) -> None:
  """An MNIST-shaped (28x28, 10 classes) learnable idx data set."""
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  for prefix, n in (('train', n_train), ('t10k', n_test)):
    labels = rng.integers(0, 10, n).astype(np.uint8)
    # Noise, plus a brightness and a bright square that grow with the class.
    images = rng.integers(0, 60, (n, 28, 28)) + 15 * labels[:, None, None]
    for i, y in enumerate(labels):
      images[i, 8:10 + 2 * y, 8:10 + 2 * y] = 250
    write_idx(folder / f'{prefix}-images-idx3-ubyte.gz', images)
    write_idx(folder / f'{prefix}-labels-idx1-ubyte.gz', labels)


def final_params(workdir: pathlib.Path):
  """The parameters of a work directory's newest checkpoint."""
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()
                 if p.name.isdigit())
  path = workdir / 'checkpoints' / str(steps[-1]) / 'state'
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path)
    meta = getattr(meta, 'item_metadata', meta)
    like = jax.tree.map(lambda m: jax.ShapeDtypeStruct(
        m.shape, m.dtype, sharding=one_device), meta)
    return ckptr.restore(path, like)
