"""MultiMNIST-style overlaid digits, their metric and a multi-label loss.

Following the paper's overlaid-digits experiment: each example overlays two
digits of different classes, each shifted independently by up to
`max_shift` pixels along each axis, on a (28 + 2 * max_shift)-pixel square
canvas; pixels are summed and clipped to 255. A prediction counts as right
only when both digits are: the two highest logits are the two labels.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array


def make_multimnist(images: np.ndarray, labels: np.ndarray,
                    num_examples: int, seed: int, *, max_shift: int = 4,
                    return_info: bool = False):
  """Draws overlaid pairs of digits, deterministically from `seed`.

  The first digit is uniform over `images`; the second's class is uniform
  over the other classes present, then its image uniform within the class.

  Args:
    images: (n, h, w) or (n, h, w, 1) uint8 digits.
    labels: (n,) integer classes; at least two distinct.
    num_examples: examples to draw.
    seed: seed of the numpy Generator; the same seed gives the same data.
    max_shift: largest shift in pixels of a digit along each axis.
    return_info: also return where each digit came from.

  Returns:
    images (num_examples, h + 2 * max_shift, w + 2 * max_shift, 1) uint8,
    labels (num_examples, 2) int32 with two different classes per row and,
    if `return_info`, a dict with 'indices' (num_examples, 2) into
    `images` and 'shifts' (num_examples, 2, 2), each digit's (row, column)
    shift in [-max_shift, max_shift].
  """
  images = np.asarray(images)
  if images.ndim == 4 and images.shape[-1] == 1:
    images = images[..., 0]
  labels = np.asarray(labels).astype(np.int64)
  if images.ndim != 3 or len(images) != len(labels):
    raise ValueError(f'Expected images (n, h, w[, 1]) and labels (n,), got '
                     f'{images.shape} and {labels.shape}.')
  classes, counts = np.unique(labels, return_counts=True)
  if len(classes) < 2:
    raise ValueError(f'Need digits of at least two classes, got {classes}.')
  rng = np.random.default_rng(seed)

  first = rng.integers(0, len(labels), num_examples)
  first_class = np.searchsorted(classes, labels[first])
  # Adding 1..C-1 modulo C picks uniformly among the other classes.
  second_class = (first_class + rng.integers(1, len(classes), num_examples)
                  ) % len(classes)
  order = np.argsort(labels, kind='stable')
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  second = order[starts[second_class]
                 + rng.integers(0, counts[second_class])]
  indices = np.stack([first, second], axis=1)
  shifts = rng.integers(-max_shift, max_shift + 1, (num_examples, 2, 2))

  height, width = images.shape[1:]
  canvas = np.zeros((num_examples, height + 2 * max_shift,
                     width + 2 * max_shift), np.int32)
  example = np.arange(num_examples)[:, None, None]
  for digit in range(2):
    rows = max_shift + shifts[:, digit, 0, None] + np.arange(height)
    cols = max_shift + shifts[:, digit, 1, None] + np.arange(width)
    # No (example, row, col) repeats within one digit, so += is exact.
    canvas[example, rows[:, :, None], cols[:, None, :]] += images[
        indices[:, digit]]
  out_images = np.clip(canvas, 0, 255).astype(np.uint8)[..., None]
  out_labels = labels[indices].astype(np.int32)
  if return_info:
    return out_images, out_labels, {'indices': indices, 'shifts': shifts}
  return out_images, out_labels


def both_digits_correct(logits: Array, labels: Array) -> Array:
  """Whether the two top logits are exactly the two labels.

  Args:
    logits: (n, C) class scores.
    labels: (n, 2) distinct classes.

  Returns:
    (n,) bool.
  """
  _, top2 = jax.lax.top_k(logits, 2)
  return jnp.all(jnp.sort(top2, axis=-1) == jnp.sort(labels, axis=-1),
                 axis=-1)


def two_hot(labels: Array, num_classes: int) -> Array:
  """(n, 2) distinct classes -> (n, C) targets with two ones."""
  return jax.nn.one_hot(labels, num_classes).sum(axis=-2)


def multilabel_loss(logits: Array, labels: Array) -> Array:
  """Mean over examples of the sigmoid cross-entropy to the two-hot target.

  Each class is an independent present/absent decision, so the loss does
  not ask the two digits to share one softmax's probability mass.

  Args:
    logits: (n, C) class scores.
    labels: (n, 2) distinct classes.

  Returns:
    Scalar loss.
  """
  targets = two_hot(labels, logits.shape[-1])
  return optax.sigmoid_binary_cross_entropy(logits, targets).sum(-1).mean()
