"""The ResNet-9 and the model registry."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxswap import config as config_lib
from jaxswap import models
from jaxswap.models import resnet9


@pytest.mark.parametrize('size', [(2, 7, 7, 3), (3, 28, 28, 2),
                                  (1, 9, 6, 1)])
def test_max_pool_2x2_equals_flax_max_pool(size):
  x = jax.random.normal(jax.random.PRNGKey(0), size)
  chex.assert_trees_all_close(
      resnet9.max_pool_2x2(x), nn.max_pool(x, (2, 2), (2, 2)))


def _count(model, shape):
  variables = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros(shape), train=False))
  return sum(x.size for x in jax.tree.leaves(variables['params']))


def test_resnet9_parameter_count_matches_the_dawnbench_network():
  # Convs (no bias) 3*3*(3*64 + 64*128 + 2*128*128 + 128*256 + 256*512
  # + 2*512*512), BN scale and shift 2*(64 + 3*128 + 256 + 3*512), and the
  # 512x10 head without bias.
  convs = 9 * (3 * 64 + 64 * 128 + 2 * 128 * 128 + 128 * 256 + 256 * 512
               + 2 * 512 * 512)
  bn = 2 * (64 + 3 * 128 + 256 + 3 * 512)
  want = convs + bn + 512 * 10
  assert _count(resnet9.ResNet9(10), (1, 32, 32, 3)) == want
  assert want == 6_573_120


def test_resnet9_takes_any_input_size_and_channels():
  for shape in [(2, 28, 28, 1), (2, 32, 32, 3), (2, 64, 48, 5)]:
    model = resnet9.ResNet9(7, width=0.125)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros(shape))
    out = model.apply(variables, jnp.ones(shape))
    assert out.shape == (2, 7) and np.all(np.isfinite(out))


def test_registry_builds_each_model_and_refuses_unknown_names():
  c = config_lib.base_config()
  for name, cls in [('resnet9', resnet9.ResNet9), ('tiny_cnn', None)]:
    c.model.name = name
    model = models.build(c, 10)
    assert cls is None or isinstance(model, cls)
  c.model.name = 'capsnet'
  assert type(models.build(c, 10)).__name__ == 'CapsNet'
  c.model.name = 'resnet18'
  assert type(models.build(c, 10)).__name__ == 'ResNet18'
  c.model.name = 'vgg'
  with pytest.raises(ValueError, match="model.name='vgg' is unknown"):
    models.build(c, 10)


def test_resnet18_parameter_count_matches_the_cifar_network():
  # Per stage of widths (c_in -> c): two blocks of two 3x3 convs and two
  # BNs each, plus a 1x1 projection and its BN where the shape changes.
  def stage(c_in, c):
    convs = 9 * (c_in * c + 3 * c * c)
    projection = (c_in * c + 2 * c) if c_in != c else 0
    return convs + 2 * 4 * c + projection
  want = (9 * 3 * 64 + 2 * 64 + stage(64, 64) + stage(64, 128)
          + stage(128, 256) + stage(256, 512) + 512 * 10 + 10)
  from jaxcaps import baselines_cnn
  assert _count(baselines_cnn.ResNet18(10), (1, 32, 32, 3)) == want
  assert want == 11_173_962  # torchvision-style CIFAR ResNet-18


def test_resnet18_downsamples_three_times_and_takes_any_channels():
  from jaxcaps import baselines_cnn
  model = baselines_cnn.ResNet18(7, width=0.125)
  for shape in [(2, 28, 28, 1), (2, 32, 32, 3)]:
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros(shape),
                           train=False)
    out, _ = model.apply(variables, jnp.ones(shape), train=True,
                         mutable=['batch_stats'])
    assert out.shape == (2, 7) and np.all(np.isfinite(out))
  # Eighth width: the last stage has 512 / 8 channels.
  assert variables['params']['stage4_1']['conv2']['kernel'].shape == (
      3, 3, 64, 64)
