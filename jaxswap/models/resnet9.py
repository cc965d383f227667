"""ResNet-9, the DAWNBench CIFAR-10 network of D. Page (2018).

prep conv -> [conv, pool, residual] -> [conv, pool] -> [conv, pool, residual]
-> global max pool -> linear, with the logits scaled by 1/8 as in the
original. Channel widths are (64, 128, 256, 512) times `width`. Works for any
input size of at least 8x8 and any channel count, since every pooling is 2x2
with floor and the head pools globally.
"""

import functools

import flax.linen as nn
import jax.numpy as jnp


def max_pool_2x2(x):
  """2x2 max pooling with stride 2 (floor), as a reshape and a max.

  Same values as `nn.max_pool(x, (2, 2), (2, 2))`; its gradient is an
  elementwise mask rather than XLA's select-and-scatter, which the CPU
  backend runs about 3x slower.
  """
  b, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class ConvBN(nn.Module):
  """3x3 convolution, BatchNorm, ReLU."""
  features: int
  bn_momentum: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.features, (3, 3), padding='SAME', use_bias=False,
                dtype=self.dtype)(x)
    x = nn.BatchNorm(use_running_average=not train,
                     momentum=self.bn_momentum, dtype=self.dtype)(x)
    return nn.relu(x)


class ResNet9(nn.Module):
  """ResNet-9 with a width multiplier.

  Attributes:
    num_classes: size of the output layer.
    width: multiplier of the base widths (64, 128, 256, 512).
    widths: the four widths themselves, instead of `width`; on a CPU the
      early, high-resolution layers cost the most, so they can be kept
      narrow while the late ones carry the capacity.
    bn_momentum: running-average momentum of every BatchNorm; the BN
      recompute clones the model with 0.0 to read plain batch statistics.
    logit_scale: the original multiplies the logits by 0.125.
    dtype: computation dtype (parameters stay float32).
  """
  num_classes: int
  width: float = 1.0
  widths: tuple[int, ...] | None = None
  bn_momentum: float = 0.9
  logit_scale: float = 0.125
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = self.widths or [max(1, int(round(w * self.width)))
                        for w in (64, 128, 256, 512)]
    block = functools.partial(ConvBN, bn_momentum=self.bn_momentum,
                              dtype=self.dtype)
    pool = max_pool_2x2

    x = block(c[0], name='prep')(x.astype(self.dtype), train)

    x = pool(block(c[1], name='layer1')(x, train))
    r = block(c[1], name='res1a')(x, train)
    x = x + block(c[1], name='res1b')(r, train)

    x = pool(block(c[2], name='layer2')(x, train))

    x = pool(block(c[3], name='layer3')(x, train))
    r = block(c[3], name='res3a')(x, train)
    x = x + block(c[3], name='res3b')(r, train)

    x = jnp.max(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype,
                 name='head')(x)
    return (x * self.logit_scale).astype(jnp.float32)
