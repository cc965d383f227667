"""A two-convolution network with BatchNorm, for fast tests and smoke runs."""

import flax.linen as nn
import jax.numpy as jnp


class TinyCNN(nn.Module):
  num_classes: int
  width: float = 1.0
  bn_momentum: float = 0.9
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = max(1, int(round(8 * self.width)))
    x = x.astype(self.dtype)
    for i, features in enumerate((c, 2 * c)):
      x = nn.Conv(features, (3, 3), strides=(2, 2), use_bias=False,
                  dtype=self.dtype, name=f'conv{i}')(x)
      x = nn.BatchNorm(use_running_average=not train,
                       momentum=self.bn_momentum, dtype=self.dtype,
                       name=f'bn{i}')(x)
      x = nn.relu(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype,
                    name='head')(x).astype(jnp.float32)
