"""Tests of the matched CNN baseline and the MultiMNIST comparison script."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcaps import baselines_cnn
from jaxcaps import configs
from jaxcaps import model as capsnet
from jaxcaps import multimnist

SCRIPT = (pathlib.Path(__file__).resolve().parents[1] / 'scripts'
          / 'multimnist_compare.py')


@pytest.fixture(scope='module')
def script():
  spec = importlib.util.spec_from_file_location('multimnist_compare', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def init(model, x):
  return jax.jit(model.init, static_argnames='train')(jax.random.key(1), x,
                                                      train=False)


def both_models(config, num_classes):
  return (capsnet.from_config(config, num_classes),
          baselines_cnn.matched_cnn_from_config(config, num_classes))


# Neurons per layer worked out by hand from the configs. mnist_small on
# 36x36: the stride-2 padded backbone halves 36 to 18 (64 channels); 16
# primary capsules of 16 numbers keep 18x18; the k3 s2 unpadded conv
# capsules give (18 - 3) // 2 + 1 = 8, 16 types of 16; 10 class capsules
# of 16; 10 logits. cifar10 'simple' on 32x32: 16x16x128, 16x16x(32 * 16),
# 7x7x(32 * 16), then k3 s1 to 5x5x(32 * 16), 10 x 16, 10.
@pytest.mark.parametrize('config,num_classes,input_shape,expected', [
    (configs.mnist_small(), 10, (1, 36, 36, 1),
     [18 * 18 * 64, 18 * 18 * 256, 8 * 8 * 256, 160, 10]),
    (configs.cifar10('simple'), 10, (1, 32, 32, 3),
     [16 * 16 * 128, 16 * 16 * 512, 7 * 7 * 512, 5 * 5 * 512, 160, 10]),
    (configs.cifar100('simple'), 100, (1, 32, 32, 3),
     [16 * 16 * 128, 16 * 16 * 1152, 7 * 7 * 1152, 5 * 5 * 1152, 20 * 36,
      100 * 36, 100]),
])
def test_neurons_per_layer_match(config, num_classes, input_shape,
                                 expected):
  caps, cnn = both_models(config, num_classes)
  pairs = baselines_cnn.matched_layer_names(config)
  caps_counts = baselines_cnn.neurons_per_layer(caps, input_shape,
                                                [c for c, _ in pairs])
  cnn_counts = baselines_cnn.neurons_per_layer(cnn, input_shape,
                                               [n for _, n in pairs])
  assert list(caps_counts.values()) == expected
  assert list(cnn_counts.values()) == expected


def test_cnn_layers_follow_the_capsule_config():
  config = configs.cifar10('simple')
  caps, cnn = both_models(config, 10)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  caps_params = jax.eval_shape(
      lambda x: caps.init(jax.random.key(0), x, train=False), x)['params']
  cnn_params = jax.eval_shape(
      lambda x: cnn.init(jax.random.key(0), x, train=False), x)['params']

  # The same backbone module, so the same arrays.
  assert (jax.tree.map(lambda a: a.shape, caps_params['backbone'])
          == jax.tree.map(lambda a: a.shape, cnn_params['backbone']))
  shapes = {name: sub['kernel'].shape for name, sub in cnn_params.items()
            if name != 'backbone'}
  assert shapes == {
      'primary': (1, 1, 128, 512),
      'layer_0': (3, 3, 512, 512),
      'layer_1': (3, 3, 512, 512),
      'layer_2': (5 * 5 * 512, 160),
      'logits': (160, 10),
  }


def test_cnn_takes_the_resnet_backbone_and_checks_classes():
  cnn = baselines_cnn.matched_cnn_from_config(configs.cifar10('resnet'), 10)
  variables = jax.eval_shape(
      lambda x: cnn.init(jax.random.key(0), x, train=False),
      jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  assert 'batch_stats' in variables
  with pytest.raises(ValueError, match='num_caps'):
    baselines_cnn.matched_cnn_from_config(configs.mnist_small(), 12)


@pytest.mark.parametrize('which', [0, 1])
def test_forward_shapes(which):
  model = both_models(configs.mnist_small(), 10)[which]
  x = jax.random.uniform(jax.random.key(0), (3, 36, 36, 1))
  variables = init(model, x)
  logits = jax.jit(model.apply, static_argnames='train')(variables, x,
                                                         train=True)
  assert logits.shape == (3, 10) and logits.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(logits)))


def tiny_batch(n=8, seed=0):
  """Overlaid random blobs; learnable enough for a step to lower the loss."""
  rng = np.random.default_rng(seed)
  digits = rng.integers(0, 256, (20, 28, 28)).astype(np.uint8)
  labels = np.arange(20) % 10
  return multimnist.make_multimnist(digits, labels, n, seed)


@pytest.mark.parametrize('which', [0, 1])
def test_one_train_step_lowers_the_loss(script, which):
  model = both_models(configs.mnist_small(), 10)[which]
  images, labels = tiny_batch()
  variables = init(model, images.astype(np.float32))
  optimizer = optax.adam(1e-3)
  state = {'params': variables['params'], 'batch_stats': {},
           'opt_state': optimizer.init(variables['params'])}
  train_step, eval_step = script.make_steps(model, optimizer)

  # A step reports the loss before its update, so the second step's loss
  # is the loss after the first.
  state, before = train_step(state, images, labels)
  state, after = train_step(state, images, labels)
  assert float(after['loss']) < float(before['loss'])
  assert 0 <= int(before['correct']) <= len(labels)

  logits = jax.jit(model.apply, static_argnames='train')(
      {'params': state['params']}, images.astype(np.float32) / 255,
      train=False)
  np.testing.assert_array_equal(
      eval_step(state, images, labels),
      multimnist.both_digits_correct(logits, labels))


def test_evaluate_pads_the_last_batch(script):
  # A stand-in eval step: an example is right when its first label is even.
  def eval_step(state, images, labels):
    del state, images
    return labels[:, 0] % 2 == 0

  labels = np.stack([np.arange(7), np.arange(7) + 1], axis=1)
  images = np.zeros((7, 2, 2, 1), np.uint8)
  assert script.evaluate(eval_step, None, images, labels, 3) == (
      pytest.approx(4 / 7))


def test_markdown_table(script):
  runs = {'capsnet': [{'params': 1234, 'test_both_right': 0.5,
                       'train_images_per_s': 10.0,
                       'eval_images_per_s': 30.0},
                      {'params': 1234, 'test_both_right': 0.7,
                       'train_images_per_s': 12.0,
                       'eval_images_per_s': 34.0}]}
  table = script.markdown_table(script.summarize(runs))
  assert table.splitlines()[-1] == (
      '| capsnet | 1,234 | 60.00 ± 14.14 | 11 ± 1 | 32 ± 3 |')
