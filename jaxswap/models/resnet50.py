"""ResNet-50 (He et al. 2016), the ImageNet network of the SWAP paper.

The v1.5 layout that most large-batch ImageNet work trains: the stride of
a downsampling bottleneck sits on its 3x3 convolution, and the last
BatchNorm of every residual branch starts at zero scale (Goyal et al.
2017), so that each block starts as the identity, which is what keeps
large-batch training with a warm-up stable.
"""

import functools

import flax.linen as nn
import jax.numpy as jnp

STAGES = (3, 4, 6, 3)  # bottleneck blocks per stage


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand by 4, plus the shortcut."""
  features: int
  strides: int
  bn_momentum: float
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, dtype=self.dtype)
    out = self.features * 4
    y = nn.relu(norm()(conv(self.features, (1, 1))(x)))
    y = conv(self.features, (3, 3), (self.strides,) * 2,
             padding=((1, 1), (1, 1)))(y)
    y = nn.relu(norm()(y))
    y = norm(scale_init=nn.initializers.zeros)(conv(out, (1, 1))(y))
    if x.shape[-1] != out or self.strides != 1:
      x = norm(name='proj_bn')(conv(out, (1, 1), (self.strides,) * 2,
                                    name='proj')(x))
    return nn.relu(x + y)


class ResNet50(nn.Module):
  """ResNet-50 with a width multiplier.

  Attributes:
    num_classes: size of the output layer.
    width: multiplier of the stage widths (64, 128, 256, 512; the blocks
      put out 4x that).
    bn_momentum: running-average momentum of every BatchNorm.
    dtype: computation dtype (parameters stay float32).
  """
  num_classes: int
  width: float = 1.0
  bn_momentum: float = 0.9
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    widths = [max(1, int(round(w * self.width))) for w in (64, 128, 256, 512)]
    x = nn.Conv(widths[0], (7, 7), (2, 2), padding=((3, 3), (3, 3)),
                use_bias=False, dtype=self.dtype, name='stem')(
                    x.astype(self.dtype))
    x = nn.BatchNorm(use_running_average=not train,
                     momentum=self.bn_momentum, dtype=self.dtype,
                     name='stem_bn')(x)
    x = nn.max_pool(nn.relu(x), (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for stage, (blocks, features) in enumerate(zip(STAGES, widths)):
      for i in range(blocks):
        strides = 2 if stage > 0 and i == 0 else 1
        x = Bottleneck(features, strides, self.bn_momentum, self.dtype,
                       name=f'stage{stage + 1}_block{i + 1}')(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return x.astype(jnp.float32)
