"""Tests of the capsule network: sizes, protocol, routing and gradients."""

import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxcaps import configs
from jaxcaps import model as capsnet


def init_shapes(model, input_shape):
  return jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False),
      jax.ShapeDtypeStruct(input_shape, jnp.float32))


def init(model, x):
  return jax.jit(model.init, static_argnames='train')(jax.random.key(1), x,
                                                      train=False)


@functools.partial(jax.jit, static_argnums=0)
def evaluate(model, variables, x):
  return model.apply(variables, x, train=False)


def module_sizes(params):
  return {name: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(sub))
          for name, sub in params.items()}


@pytest.mark.parametrize('config,num_classes,total', [
    (configs.cifar10('resnet'), 10, 1_828_817),
    (configs.cifar10('simple'), 10, 492_177),
    (configs.cifar100('resnet'), 100, 2_799_629),
    (configs.cifar100('simple'), 100, 1_462_989),
])
def test_official_parameter_counts(config, num_classes, total):
  model = capsnet.from_config(config, num_classes)
  params = init_shapes(model, (1, 32, 32, 3))['params']
  count, table = capsnet.parameter_summary(params)
  assert count == total, table
  assert capsnet.count_params(model, (1, 32, 32, 3)) == total
  assert f'{total:,}' in table.splitlines()[-1]


def test_official_cifar10_per_layer_counts():
  model = capsnet.from_config(configs.cifar10('resnet'), 10)
  params = init_shapes(model, (1, 32, 32, 3))['params']
  assert module_sizes(params) == {
      'backbone': 1_340_224,
      'primary_caps': 65_536 + 32,
      'caps_0': 147_488,
      'caps_1': 147_488,
      'caps_2': 128_032,
      'logits': 17,
  }
  chex.assert_shape(params['primary_caps']['conv']['kernel'],
                    (1, 1, 128, 512))
  chex.assert_shape(params['caps_0']['kernel'], (3, 3, 32, 4, 4, 32))
  chex.assert_shape(params['caps_2']['kernel'], (800, 10, 4, 4))
  chex.assert_shape(params['logits']['kernel'], (16, 1))


def test_official_cifar100_per_layer_counts():
  model = capsnet.from_config(configs.cifar100('simple'), 100)
  params = init_shapes(model, (1, 32, 32, 3))['params']
  assert module_sizes(params) == {
      'backbone': 3 * 3 * 3 * 128 + 128,
      'primary_caps': 128 * 32 * 36 + 72,
      'caps_0': 3 * 3 * 32 * 36 * 32 + 72,
      'caps_1': 3 * 3 * 32 * 36 * 32 + 72,
      'caps_2': 800 * 20 * 36 + 72,
      'caps_3': 20 * 100 * 36 + 72,
      'logits': 37,
  }


def tiny_config(**fields):
  """10x10 input -> 5x5 features -> 3x3 conv capsules -> 3 classes."""
  config = ml_collections.ConfigDict(dict(
      backbone='simple', backbone_width=8, primary_caps=3, pose_dim=4,
      matrix_pose=True, num_routing=3, routing_mode='concurrent',
      conv_impl='chunked',
      layers=[dict(type='conv', num_caps=2, kernel=3, stride=1),
              dict(type='fc', num_caps=3)]))
  config.update(fields)
  return config


def test_logits_shape_jit_and_class_map_shared():
  model = capsnet.from_config(tiny_config(), 3)
  x = jax.random.normal(jax.random.key(0), (4, 10, 10, 1))
  variables = init(model, x)
  logits, state = jax.jit(lambda v, x: model.apply(
      v, x, train=False, capture_intermediates=True))(variables, x)
  chex.assert_shape(logits, (4, 3))
  chex.assert_tree_all_finite(logits)

  # The logits are one affine map of each class pose, the same for all.
  class_pose = state['intermediates']['caps_1']['__call__'][-1]
  dense = variables['params']['logits']
  expected = (class_pose.reshape(4, 3, 4) @ dense['kernel'])[..., 0]
  np.testing.assert_allclose(logits, expected + dense['bias'], atol=1e-5)


def test_model_vmaps_like_a_batch():
  model = capsnet.from_config(tiny_config(), 3)
  x = jax.random.normal(jax.random.key(0), (3, 10, 10, 1))
  variables = init(model, x)
  batched = evaluate(model, variables, x)
  one = jax.jit(jax.vmap(
      lambda xi: model.apply(variables, xi[None], train=False)[0]))
  np.testing.assert_allclose(one(x), batched, atol=1e-5, rtol=1e-5)


def test_conv_impls_and_routing_modes():
  x = jax.random.normal(jax.random.key(0), (2, 10, 10, 1))
  base = capsnet.from_config(tiny_config(), 3)
  variables = init(base, x)
  out = evaluate(base, variables, x)
  reference = evaluate(base.clone(conv_impl='reference'), variables, x)
  np.testing.assert_allclose(out, reference, atol=1e-5, rtol=1e-5)
  sequential = evaluate(base.clone(routing_mode='sequential'), variables, x)
  assert np.abs(out - sequential).max() > 1e-4
  # One iteration is the uniform pass alone, whatever the schedule.
  one = [evaluate(base.clone(num_routing=1, routing_mode=mode), variables, x)
         for mode in ('concurrent', 'sequential')]
  np.testing.assert_array_equal(one[0], one[1])
  assert np.abs(out - one[0]).max() > 1e-4


def test_gradients_match_finite_differences():
  model = capsnet.from_config(tiny_config(), 3)
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (2, 10, 10, 1), jnp.float64)
    labels = jnp.array([0, 2])
    params = init(model, x)['params']
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)

    @jax.jit
    def loss(params):
      logits = model.apply({'params': params}, x, train=True)
      assert logits.dtype == jnp.float64
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, labels).mean()

    grads = jax.jit(jax.grad(loss))(params)
    chex.assert_tree_all_finite(grads)
    # Every capsule layer must receive gradient.
    for name in ('primary_caps', 'caps_0', 'caps_1', 'logits'):
      assert float(optax.global_norm(grads[name])) > 0, name
    for i, key in enumerate(jax.random.split(jax.random.key(2), 3)):
      leaves, tree = jax.tree.flatten(params)
      keys = jax.random.split(key, len(leaves))
      direction = tree.unflatten([jax.random.normal(k, a.shape, a.dtype)
                                  for k, a in zip(keys, leaves)])
      eps = 1e-6
      numeric = (loss(jax.tree.map(lambda a, d: a + eps * d, params,
                                   direction))
                 - loss(jax.tree.map(lambda a, d: a - eps * d, params,
                                     direction))) / (2 * eps)
      analytic = sum(jnp.vdot(g, d) for g, d in
                     zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
      np.testing.assert_allclose(analytic, numeric, rtol=1e-6,
                                 err_msg=f'direction {i}')


def resnet_tiny():
  """ResNet backbone on 8x8 inputs: 4x4 features, 2x2 conv capsules."""
  config = configs.cifar10('resnet')
  config.layers = [dict(type='conv', num_caps=4, kernel=3, stride=1),
                   dict(type='fc', num_caps=10)]
  return capsnet.from_config(config, 10)


def test_batch_norm_protocol():
  model = resnet_tiny()
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  variables = init(model, x)
  assert set(variables) == {'params', 'batch_stats'}
  stats = variables['batch_stats']
  noisy = jax.tree.map(lambda a: a + 3.0, stats)

  @functools.partial(jax.jit, static_argnums=0)
  def updated(m, batch_stats):
    _, new = m.apply({'params': variables['params'],
                      'batch_stats': batch_stats}, x, train=True,
                     mutable=['batch_stats'])
    return new['batch_stats']

  # With momentum 0 (the trainer's BN recompute) the new statistics are the
  # batch's own, whatever the old ones were.
  zero = model.clone(bn_momentum=0.0)
  chex.assert_trees_all_close(updated(zero, stats), updated(zero, noisy),
                              atol=1e-5)
  # With the default they move 10% of the way from the old ones.
  moved = updated(model, noisy)
  expected = jax.tree.map(lambda old, new: 0.9 * old + 0.1 * new, noisy,
                          updated(zero, stats))
  chex.assert_trees_all_close(moved, expected, atol=1e-4)
  # Evaluation uses the running averages and leaves them alone.
  chex.assert_shape(evaluate(model, variables, x), (4, 10))


def test_simple_backbone_has_no_batch_stats():
  model = capsnet.from_config(configs.cifar10('simple'), 10)
  shapes = init_shapes(model, (1, 32, 32, 3))
  assert set(shapes) == {'params'}


def test_mnist_small_config_runs():
  model = capsnet.from_config(configs.mnist_small(), 10)
  # 36x36 is the MultiMNIST canvas; its class capsules see 8x8x16 children.
  x = jax.random.normal(jax.random.key(0), (2, 36, 36, 1))
  variables = init(model, x)
  logits = evaluate(model, variables, x)
  chex.assert_shape(logits, (2, 10))
  chex.assert_tree_all_finite(logits)
  assert capsnet.count_params(model, (1, 28, 28, 1)) == (
      3 * 3 * 64 + 64                     # simple backbone
      + 64 * 16 * 16 + 32                 # primary capsules and their LN
      + 3 * 3 * 16 * 16 * 16 + 32         # conv capsules, 14x14 -> 6x6
      + 6 * 6 * 16 * 10 * 16 + 32         # class capsules
      + 17)                               # shared pose -> logit map


def test_from_config_errors_are_actionable():
  with pytest.raises(ValueError, match='10 capsules but the dataset has 100'):
    capsnet.from_config(configs.cifar10(), 100)
  config = configs.cifar10()
  config.layers = [dict(type='conv', num_caps=32, kernel=3, stride=2)]
  with pytest.raises(ValueError, match='must end with an fc layer'):
    capsnet.from_config(config, 10)
  config.layers = [dict(type='dense', num_caps=10)]
  with pytest.raises(ValueError, match="unknown|type 'dense'"):
    capsnet.from_config(config, 10)
  with pytest.raises(ValueError, match='square pose_dim'):
    init_shapes(capsnet.from_config(configs.cifar10(), 10, pose_dim=12),
                (1, 32, 32, 3))
  with pytest.raises(ValueError, match='backbone'):
    init_shapes(capsnet.from_config(configs.cifar10(), 10, backbone='vgg'),
                (1, 32, 32, 3))


def test_get_config_and_overrides():
  assert configs.get_config('cifar10:simple').backbone == 'simple'
  assert configs.get_config('cifar100').pose_dim == 36
  model = capsnet.from_config(configs.get_config('cifar10'), 10,
                              num_routing=3, bn_momentum=0.5)
  assert (model.num_routing, model.bn_momentum) == (3, 0.5)
  assert model.layers[0] == capsnet.CapsuleLayerSpec('conv', 32, 3, 2)
  hash(model.layers)  # Static under jit.
  with pytest.raises(ValueError, match='Unknown capsule config'):
    configs.get_config('imagenet')
