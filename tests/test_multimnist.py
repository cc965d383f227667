"""Tests of the MultiMNIST generator, metric and loss on real MNIST digits."""

import gzip
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcaps import multimnist

MNIST_DIR = os.environ.get('MNIST_DIR', os.path.join(
    os.path.dirname(__file__), '..', '..', 'shared', 'data', 'mnist'))


def read_idx(path):
  """Reads a gzipped idx file: magic (2 zero bytes, type, ndim), dims."""
  with gzip.open(path, 'rb') as f:
    data = f.read()
  zero, dtype_code, ndim = struct.unpack('>HBB', data[:4])
  assert zero == 0 and dtype_code == 0x08, 'expected unsigned bytes'
  shape = struct.unpack(f'>{ndim}I', data[4:4 + 4 * ndim])
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


@pytest.fixture(scope='module')
def mnist():
  images = os.path.join(MNIST_DIR, 't10k-images-idx3-ubyte.gz')
  labels = os.path.join(MNIST_DIR, 't10k-labels-idx1-ubyte.gz')
  if not os.path.exists(images):
    pytest.skip(f'MNIST idx files not found in {MNIST_DIR}; set MNIST_DIR.')
  return read_idx(images), read_idx(labels)


def test_idx_reader_sanity(mnist):
  images, labels = mnist
  assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
  # The published class counts of the MNIST test set.
  np.testing.assert_array_equal(
      np.bincount(labels), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974,
                            1009])
  assert 30 < images.mean() < 37  # about 0.13 of full scale


def test_shapes_types_and_distinct_classes(mnist):
  images, labels = mnist
  x, y = multimnist.make_multimnist(images, labels, 2000, seed=0)
  assert x.shape == (2000, 36, 36, 1) and x.dtype == np.uint8
  assert y.shape == (2000, 2) and y.dtype == np.int32
  assert np.all(y[:, 0] != y[:, 1])
  # Every ordered pair of different classes occurs (90 pairs, ~22 each).
  pairs = set(map(tuple, y.tolist()))
  assert len(pairs) == 90


def test_canvas_is_the_clipped_sum_of_two_shifted_digits(mnist):
  images, labels = mnist
  x, y, info = multimnist.make_multimnist(images[..., None], labels, 300,
                                          seed=1, return_info=True)
  indices, shifts = info['indices'], info['shifts']
  assert shifts.shape == (300, 2, 2)
  assert shifts.min() >= -4 and shifts.max() <= 4
  # All 9 shift values are used along each axis.
  assert set(np.unique(shifts)) == set(range(-4, 5))
  np.testing.assert_array_equal(y, labels[indices])
  clipped = 0
  for n in range(300):
    canvas = np.zeros((36, 36), np.int64)
    for digit in range(2):
      dy, dx = shifts[n, digit]
      canvas[4 + dy:32 + dy, 4 + dx:32 + dx] += images[indices[n, digit]]
    clipped += int((canvas > 255).sum())
    np.testing.assert_array_equal(x[n, :, :, 0], np.minimum(canvas, 255))
  assert clipped > 0, 'no overlapping strokes: the clip was never tested'


def test_same_seed_same_data(mnist):
  images, labels = mnist
  a = multimnist.make_multimnist(images, labels, 500, seed=7)
  b = multimnist.make_multimnist(images, labels, 500, seed=7)
  c = multimnist.make_multimnist(images, labels, 500, seed=8)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])


def test_other_shift_and_rejects_one_class(mnist):
  images, labels = mnist
  x, _ = multimnist.make_multimnist(images[:100], labels[:100], 10, seed=0,
                                    max_shift=2)
  assert x.shape == (10, 32, 32, 1)
  ones = labels == 1
  with pytest.raises(ValueError, match='two classes'):
    multimnist.make_multimnist(images[ones], labels[ones], 10, seed=0)


def test_both_digits_correct():
  logits = jnp.array([
      [0.1, 5.0, 0.2, 4.0],   # top-2 {1, 3}
      [3.0, 0.0, 2.0, 1.0],   # top-2 {0, 2}
      [3.0, 0.0, 2.0, 1.0],   # top-2 {0, 2}
      [0.0, 1.0, 2.0, 3.0],   # top-2 {2, 3}
  ])
  labels = jnp.array([[3, 1], [0, 2], [0, 3], [1, 3]])
  got = multimnist.both_digits_correct(logits, labels)
  np.testing.assert_array_equal(got, [True, True, False, False])


def test_multilabel_loss_matches_formula():
  logits = np.array([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
  labels = np.array([[0, 2], [1, 0]])
  targets = np.array([[1, 0, 1], [1, 1, 0]], np.float64)
  np.testing.assert_array_equal(multimnist.two_hot(jnp.asarray(labels), 3),
                                targets)
  # Sigmoid cross-entropy: log(1 + e^z) - t z, summed over classes.
  per_class = np.log1p(np.exp(logits)) - targets * logits
  expected = per_class.sum(-1).mean()
  got = multimnist.multilabel_loss(jnp.asarray(logits), jnp.asarray(labels))
  np.testing.assert_allclose(got, expected, rtol=1e-6)
