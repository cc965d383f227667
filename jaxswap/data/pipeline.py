"""The input pipeline, on the device.

The whole data set lives on every device as uint8 (Fashion-MNIST is 47 MB,
CIFAR-10 150 MB), so a step gathers its own batch by index, crops, flips and
normalizes it inside the jitted computation: no host work per step, and a
run's data order is a pure function of (key, epoch, step), which is what
makes a resumed run equal an uninterrupted one.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class DeviceData(NamedTuple):
  """Splits as device arrays; images uint8 NHWC, labels int32."""
  train_images: jax.Array
  train_labels: jax.Array
  test_images: jax.Array
  test_labels: jax.Array
  val_images: jax.Array
  val_labels: jax.Array
  mean: jax.Array            # (C,), [0, 1] pixel units
  std: jax.Array             # (C,)


def split_validation(images: np.ndarray, labels: np.ndarray, size: int,
                     seed: int):
  """Holds `size` random training examples out, fixed by the seed."""
  if size <= 0:
    return images, labels, images[:0], labels[:0]
  if size >= len(images):
    raise ValueError(f'config.data.validation_size={size} leaves no '
                     f'training data out of {len(images)}; use fewer')
  order = np.random.default_rng(seed).permutation(len(images))
  val, train = np.sort(order[:size]), np.sort(order[size:])
  return images[train], labels[train], images[val], labels[val]


def put(arrays: DeviceData, sharding: jax.sharding.Sharding) -> DeviceData:
  """Places every array with `sharding` (replicated, for in-memory data).

  In a multi-process run every process has read the whole data set and
  gives the devices it holds their part of the global array.
  """
  if jax.process_count() == 1:
    return DeviceData(*(jax.device_put(np.asarray(a), sharding)
                        for a in arrays))
  return DeviceData(*(jax.make_array_from_process_local_data(
      sharding, np.asarray(a), np.shape(a)) for a in arrays))


def permutations(keys: jax.Array, epoch: jax.Array, n: int) -> jax.Array:
  """One permutation of range(n) per replica key: (W, n) int32."""
  def one(key):
    return jax.random.permutation(jax.random.fold_in(key, epoch), n)
  return jax.vmap(one)(keys).astype(jnp.int32)


def augment(key: jax.Array, images: jax.Array, padding: int, flip: bool
            ) -> jax.Array:
  """Random crop after zero padding, and random horizontal flip.

  Args:
    key: PRNG key for this batch.
    images: (B, H, W, C) uint8.
    padding: pixels of zero padding on each side; 0 disables the crop.
    flip: whether to flip half the images left-right.

  Returns:
    (B, H, W, C) uint8.
  """
  b, h, w, c = images.shape
  crop_key, flip_key = jax.random.split(key)
  if padding:
    padded = jnp.pad(images, ((0, 0), (padding,) * 2, (padding,) * 2,
                              (0, 0)))
    offsets = jax.random.randint(crop_key, (b, 2), 0, 2 * padding + 1)

    def crop(image, offset):
      return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0),
                                   (h, w, c))
    images = jax.vmap(crop)(padded, offsets)
  if flip:
    do_flip = jax.random.bernoulli(flip_key, 0.5, (b, 1, 1, 1))
    images = jnp.where(do_flip, images[:, :, ::-1, :], images)
  return images


def normalize(images: jax.Array, mean: jax.Array, std: jax.Array,
              dtype=jnp.float32) -> jax.Array:
  """uint8 pixels to (x / 255 - mean) / std."""
  x = images.astype(jnp.float32) * (1.0 / 255.0)
  return ((x - mean) / std).astype(dtype)


def train_batch(data: DeviceData, perm: jax.Array, step: jax.Array,
                batch_size: int, key: jax.Array, padding: int, flip: bool):
  """The augmented batch of one replica at `step` of its epoch order.

  Args:
    data: the device-resident data set.
    perm: (N,) this replica's order for the current epoch.
    step: the replica's global step; the epoch position is step mod
      (N // batch_size), so the last partial batch of an epoch is dropped.
    batch_size: examples per replica per step.
    key: PRNG key of the augmentation.
    padding, flip: see `augment`.

  Returns:
    (images float32 normalized, labels int32).
  """
  steps_per_epoch = perm.shape[0] // batch_size
  start = (step % steps_per_epoch) * batch_size
  idx = jax.lax.dynamic_slice(perm, (start,), (batch_size,))
  images = augment(key, data.train_images[idx], padding, flip)
  return images, data.train_labels[idx]
