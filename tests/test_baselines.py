"""Tests of jaxcaps.baselines (dynamic and EM routing) and their CapsNets."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcaps import baselines
from jaxcaps import configs
from jaxcaps import model as capsnet

ATOL, RTOL = 3e-5, 1e-4  # float32 against float64


# --------------------------------------------------- float64 loop references


def np_softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def np_squash(s):
  norm = np.sqrt(np.sum(s * s))
  return norm ** 2 / (1 + norm ** 2) * s / norm


def np_dynamic_group(children, weights, num_routing):
  """Sabour et al.'s procedure for one group of children and parents.

  Args:
    children: list of N child poses (vectors or matrices).
    weights: weights[i][j], the transform of child i for parent j.
    num_routing: iterations.

  Returns:
    (list of M parent outputs, (N, M) couplings of the last iteration).
  """
  num_children, num_parents = len(children), len(weights[0])
  votes = [[children[i] @ weights[i][j] for j in range(num_parents)]
           for i in range(num_children)]
  logits = np.zeros((num_children, num_parents))
  for _ in range(num_routing):
    couplings = np.stack([np_softmax(logits[i])
                          for i in range(num_children)])
    parents = []
    for j in range(num_parents):
      s = sum(couplings[i, j] * votes[i][j] for i in range(num_children))
      parents.append(np_squash(s))
    for i in range(num_children):
      for j in range(num_parents):
        logits[i, j] += np.sum(votes[i][j] * parents[j])
  return parents, couplings


def np_em_group(children, activations, weights, beta_u, beta_a,
                num_routing, final_temperature, eps):
  """EM routing for one group of children and parents, densities directly.

  Args:
    children: list of N child poses; activations: their N activations.
    weights: weights[i][j], the transform of child i for parent j.
    beta_u, beta_a: (M,) costs.
    num_routing: M-steps.
    final_temperature: lambda of the last M-step, reached linearly.
    eps: added to the mass in the means and to the variances.

  Returns:
    (list of M parent poses, (M,) activations, (N, M) assignments of the
    last M-step).
  """
  num_children, num_parents = len(children), len(weights[0])
  pose_shape = (children[0] @ weights[0][0]).shape
  votes = [[(children[i] @ weights[i][j]).reshape(-1)
            for j in range(num_parents)] for i in range(num_children)]
  assign = np.full((num_children, num_parents), 1 / num_parents)
  for t in range(num_routing):
    temperature = final_temperature * (t + 1) / num_routing
    means, variances, parent_act = [], [], np.zeros(num_parents)
    for j in range(num_parents):
      r = [assign[i, j] * activations[i] for i in range(num_children)]
      mass = sum(r)
      mean = sum(r[i] * votes[i][j] for i in range(num_children)) / (
          mass + eps)
      var = sum(r[i] * (votes[i][j] - mean) ** 2
                for i in range(num_children)) / (mass + eps) + eps
      cost = np.sum((beta_u[j] + np.log(np.sqrt(var))) * mass
                    / num_children)
      parent_act[j] = 1 / (1 + np.exp(-temperature * (beta_a[j] - cost)))
      means.append(mean)
      variances.append(var)
    if t + 1 == num_routing:
      break
    new = np.zeros_like(assign)
    for i in range(num_children):
      for j in range(num_parents):
        density = np.prod(
            np.exp(-(votes[i][j] - means[j]) ** 2 / (2 * variances[j]))
            / np.sqrt(2 * np.pi * variances[j]))
        new[i, j] = parent_act[j] * density
      new[i] /= new[i].sum()
    assign = new
  return [m.reshape(pose_shape) for m in means], parent_act, assign


def np_fc(group_fn, child, weight, *extra_children):
  """Runs group_fn on every example of child (B, N, *P), weight (N, M, ..).

  extra_children are per-child arrays (B, N) such as activations.
  """
  results = []
  for b in range(child.shape[0]):
    weights = [[weight[i, j] for j in range(weight.shape[1])]
               for i in range(weight.shape[0])]
    extras = [list(e[b]) for e in extra_children]
    results.append(group_fn(list(child[b]), *extras, weights))
  return results


def np_conv(group_fn, child, weight, stride, *extra_children):
  """Runs group_fn on every window of child (B, H, W, N, *P).

  Returns a dict {(b, y, x): result}, with window entries in (u, v, n)
  order.
  """
  batch, height, width, num_in = child.shape[:4]
  kernel, num_out = weight.shape[0], weight.shape[-1]
  out_h = (height - kernel) // stride + 1
  out_w = (width - kernel) // stride + 1
  results = {}
  for b, y, x in np.ndindex(batch, out_h, out_w):
    children, weights = [], []
    extras = [[] for _ in extra_children]
    for u, v, n in np.ndindex(kernel, kernel, num_in):
      position = (b, stride * y + u, stride * x + v, n)
      children.append(child[position])
      weights.append([weight[u, v, n, ..., j] for j in range(num_out)])
      for e, source in zip(extras, extra_children):
        e.append(source[position])
    results[b, y, x] = group_fn(children, *extras, weights)
  return results


# ----------------------------------------------------------------- fixtures


def pose_shape(matrix_pose):
  return (3, 3) if matrix_pose else (5,)


def weight_tail(matrix_pose):
  return (3, 3) if matrix_pose else (5, 5)


def random_fc(seed, matrix_pose, batch=2, num_in=5, num_out=4, scale=0.5):
  rng = np.random.default_rng(seed)
  child = rng.normal(size=(batch, num_in) + pose_shape(matrix_pose))
  weight = scale * rng.normal(size=(num_in, num_out)
                              + weight_tail(matrix_pose))
  activation = rng.uniform(0.1, 1.0, size=(batch, num_in))
  return child, weight, activation


def random_conv(seed, matrix_pose, size=5, kernel=3, num_in=2, num_out=3,
                batch=2, scale=0.5):
  rng = np.random.default_rng(seed)
  child = rng.normal(size=(batch, size, size, num_in)
                     + pose_shape(matrix_pose))
  weight = scale * rng.normal(size=(kernel, kernel, num_in)
                              + weight_tail(matrix_pose) + (num_out,))
  activation = rng.uniform(0.1, 1.0, size=(batch, size, size, num_in))
  return child, weight, activation


def random_betas(seed, num_out):
  rng = np.random.default_rng(seed)
  return 0.5 * rng.normal(size=num_out), 0.5 * rng.normal(size=num_out)


def f32(*arrays):
  return [jnp.asarray(a, jnp.float32) for a in arrays]


EM_TEMPERATURE, EM_EPS = 2.0, 1e-6


def assert_sum_to_one_over_parents(couplings, stride=None):
  """Couplings or assignments (..., M): non-negative, one unit per child.

  With a stride, they are a conv layer's (B, H', W', k, k, N, M), and the
  input at (2, 2), inside the windows of outputs (0, 0) and (1, 1) with
  k = 3, must couple differently as each window's entry.
  """
  couplings = np.asarray(couplings)
  np.testing.assert_allclose(couplings.sum(-1), 1, atol=1e-6)
  assert couplings.min() >= 0
  if stride is not None:
    corner = 2 - stride
    gap = np.abs(couplings[:, 0, 0, 2, 2] - couplings[:, 1, 1, corner,
                                                        corner]).max()
    assert gap > 1e-3


# ------------------------------------------------------------ squash, length


@pytest.mark.parametrize('matrix_pose', [False, True])
def test_squash_keeps_direction_and_maps_length(matrix_pose):
  rng = np.random.default_rng(0)
  s = rng.normal(size=(6,) + pose_shape(matrix_pose))
  # Lengths from far inside to far outside the unit sphere.
  s *= np.array([1e-2, 0.3, 1, 2, 10, 100]).reshape((6,)
                                                    + (1,) * (s.ndim - 1))
  v = np.asarray(baselines.squash(*f32(s), matrix_pose=matrix_pose),
                 np.float64)
  axes = tuple(range(1, s.ndim))
  norm = np.sqrt((s ** 2).sum(axes))
  np.testing.assert_allclose(np.sqrt((v ** 2).sum(axes)),
                             norm ** 2 / (1 + norm ** 2), rtol=1e-5)
  direction = v / np.sqrt((v ** 2).sum(axes, keepdims=True))
  np.testing.assert_allclose(direction, s / norm.reshape(
      (6,) + (1,) * (s.ndim - 1)), atol=1e-6)
  np.testing.assert_allclose(
      baselines.capsule_length(*f32(v), matrix_pose=matrix_pose),
      norm ** 2 / (1 + norm ** 2), rtol=1e-5)


def test_squash_and_length_have_finite_gradients_at_zero():
  grad = jax.grad(lambda s: baselines.capsule_length(
      baselines.squash(s)).sum())(jnp.zeros((2, 4)))
  chex.assert_tree_all_finite(grad)
  np.testing.assert_array_equal(baselines.squash(jnp.zeros(4)), 0.0)


# ---------------------------------------------------------- dynamic routing


@pytest.mark.parametrize('matrix_pose', [False, True])
def test_dynamic_fc_matches_numpy_over_iterations(matrix_pose):
  child, weight, _ = random_fc(1, matrix_pose)
  route = jax.jit(baselines.dynamic_fc_routing,
                  static_argnames=('num_routing', 'matrix_pose'))
  for num_routing in (1, 2, 4):
    parent, couplings = route(*f32(child, weight), num_routing=num_routing,
                              matrix_pose=matrix_pose)
    expected = np_fc(functools.partial(np_dynamic_group,
                                       num_routing=num_routing),
                     child, weight)
    chex.assert_shape(parent, (2, 4) + pose_shape(matrix_pose))
    for b, (poses, r) in enumerate(expected):
      np.testing.assert_allclose(parent[b], np.stack(poses), atol=ATOL,
                                 rtol=RTOL, err_msg=f'{num_routing} its')
      np.testing.assert_allclose(couplings[b], r, atol=ATOL, rtol=RTOL)
  # By the last iteration the couplings have left the uniform 1/M.
  assert np.abs(np.asarray(couplings) - 1 / 4).max() > 0.1
  assert_sum_to_one_over_parents(couplings)


@pytest.mark.parametrize('impl', ['chunked', 'reference'])
@pytest.mark.parametrize('matrix_pose,stride,size',
                         [(True, 1, 5), (True, 2, 7), (False, 2, 5)])
def test_dynamic_conv_matches_numpy_over_iterations(matrix_pose, stride,
                                                    size, impl):
  child, weight, _ = random_conv(2, matrix_pose, size=size)
  num_routing = 3
  parent, couplings = jax.jit(functools.partial(
      baselines.dynamic_conv_routing, num_routing=num_routing,
      stride=stride, matrix_pose=matrix_pose, impl=impl))(
          *f32(child, weight))
  out = (size - 3) // stride + 1
  chex.assert_shape(parent, (2, out, out, 3) + pose_shape(matrix_pose))
  chex.assert_shape(couplings, (2, out, out, 3, 3, 2, 3))
  expected = np_conv(functools.partial(np_dynamic_group,
                                       num_routing=num_routing),
                     child, weight, stride)
  for (b, y, x), (poses, r) in expected.items():
    np.testing.assert_allclose(parent[b, y, x], np.stack(poses), atol=ATOL,
                               rtol=RTOL, err_msg=f'position {(b, y, x)}')
    np.testing.assert_allclose(couplings[b, y, x], r.reshape(3, 3, 2, 3),
                               atol=ATOL, rtol=RTOL)
  assert np.abs(np.asarray(couplings) - 1 / 3).max() > 0.1
  assert_sum_to_one_over_parents(couplings, stride)


# --------------------------------------------------------------- EM routing


def np_em(num_routing):
  return functools.partial(np_em_group, num_routing=num_routing,
                           final_temperature=EM_TEMPERATURE, eps=EM_EPS)


@pytest.mark.parametrize('matrix_pose', [True, False])
def test_em_fc_matches_numpy_over_iterations(matrix_pose):
  child, weight, activation = random_fc(3, matrix_pose)
  beta_u, beta_a = random_betas(3, 4)
  route = jax.jit(baselines.em_fc_routing,
                  static_argnames=('num_routing', 'matrix_pose',
                                   'inverse_temperature'))
  for num_routing in (1, 2, 3):
    pose, act, assign = route(
        *f32(child, activation, weight, beta_u, beta_a),
        num_routing=num_routing, inverse_temperature=EM_TEMPERATURE,
        matrix_pose=matrix_pose)
    chex.assert_shape((pose, act, assign),
                      ((2, 4) + pose_shape(matrix_pose), (2, 4), (2, 5, 4)))
    em = functools.partial(np_em(num_routing), beta_u=beta_u, beta_a=beta_a)
    expected = np_fc(lambda c, a, w: em(c, a, w), child, weight, activation)
    for b, (poses, parent_act, r) in enumerate(expected):
      message = f'{num_routing} iterations, example {b}'
      np.testing.assert_allclose(pose[b], np.stack(poses), atol=ATOL,
                                 rtol=RTOL, err_msg=message)
      np.testing.assert_allclose(act[b], parent_act, atol=ATOL, rtol=RTOL,
                                 err_msg=message)
      np.testing.assert_allclose(assign[b], r, atol=ATOL, rtol=RTOL,
                                 err_msg=message)
  # The E-steps moved the assignments, and the activations spread out.
  assert np.abs(np.asarray(assign) - 1 / 4).max() > 0.1
  assert_sum_to_one_over_parents(assign)
  assert np.ptp(np.asarray(act)) > 0.05


@pytest.mark.parametrize('impl', ['chunked', 'reference'])
@pytest.mark.parametrize('matrix_pose,stride,size',
                         [(True, 1, 5), (True, 2, 7), (False, 1, 4)])
def test_em_conv_matches_numpy_over_iterations(matrix_pose, stride, size,
                                               impl):
  child, weight, activation = random_conv(4, matrix_pose, size=size)
  beta_u, beta_a = random_betas(4, 3)
  num_routing = 3
  pose, act, assign = jax.jit(functools.partial(
      baselines.em_conv_routing, num_routing=num_routing, stride=stride,
      inverse_temperature=EM_TEMPERATURE, matrix_pose=matrix_pose,
      impl=impl))(
          *f32(child, activation, weight, beta_u, beta_a))
  out = (size - 3) // stride + 1
  chex.assert_shape((pose, act, assign),
                    ((2, out, out, 3) + pose_shape(matrix_pose),
                     (2, out, out, 3), (2, out, out, 3, 3, 2, 3)))
  em = functools.partial(np_em(num_routing), beta_u=beta_u, beta_a=beta_a)
  expected = np_conv(lambda c, a, w: em(c, a, w), child, weight, stride,
                     activation)
  for (b, y, x), (poses, parent_act, r) in expected.items():
    message = f'position {(b, y, x)}'
    np.testing.assert_allclose(pose[b, y, x], np.stack(poses), atol=ATOL,
                               rtol=RTOL, err_msg=message)
    np.testing.assert_allclose(act[b, y, x], parent_act, atol=ATOL,
                               rtol=RTOL, err_msg=message)
    np.testing.assert_allclose(assign[b, y, x], r.reshape(3, 3, 2, 3),
                               atol=ATOL, rtol=RTOL, err_msg=message)
  assert np.abs(np.asarray(assign) - 1 / 3).max() > 0.1
  assert_sum_to_one_over_parents(assign, stride)


def test_em_first_m_step_is_activation_weighted_mean_of_votes():
  child, weight, activation = random_fc(5, True)
  pose, _, assign = baselines.em_fc_routing(
      *f32(child, activation, weight, np.zeros(4), np.zeros(4)), 1)
  np.testing.assert_array_equal(assign, np.full((2, 5, 4), np.float32(0.25)))
  votes = np.einsum('bnax,nmxd->bnmad', child, weight)
  expected = (np.einsum('bn,bnmad->bmad', activation, votes)
              / (activation.sum(1)[:, None, None, None] + EM_EPS))
  np.testing.assert_allclose(pose, expected, atol=ATOL, rtol=RTOL)


def test_em_routing_survives_extreme_votes():
  # Votes far from every parent: a density product would underflow.
  child, weight, activation = random_fc(6, True, num_in=8)
  child[:, :4] *= 1e3
  activation[:, 4:] = 1e-6
  pose, act, assign = baselines.em_fc_routing(
      *f32(child, activation, weight, np.zeros(4), np.zeros(4)), 3)
  chex.assert_tree_all_finite((pose, act, assign))
  np.testing.assert_allclose(assign.sum(-1), 1, atol=1e-5)


def test_routing_rejects_zero_iterations():
  child, weight, activation = f32(*random_fc(0, True))
  with pytest.raises(ValueError, match='num_routing'):
    baselines.dynamic_fc_routing(child, weight, 0, matrix_pose=True)
  with pytest.raises(ValueError, match='num_routing'):
    baselines.em_fc_routing(child, activation, weight, jnp.zeros(4),
                            jnp.zeros(4), 0)


def test_inverse_temperatures_ramp_to_final():
  assert baselines.em_inverse_temperatures(4, 2.0) == pytest.approx(
      [0.5, 1.0, 1.5, 2.0])
  assert baselines.em_inverse_temperatures(1) == [1.0]


# -------------------------------------------------------------------- losses


def test_margin_loss_hand_values():
  lengths = jnp.array([[0.95, 0.3, 0.05], [0.2, 0.5, 0.15]])
  labels = jnp.array([0, 1])
  # Example 0: 0 + 0.5 * 0.2^2 + 0 = 0.02.
  # Example 1: 0.5 * 0.1^2 + 0.4^2 + 0.5 * 0.05^2 = 0.16625.
  np.testing.assert_allclose(baselines.margin_loss(lengths, labels),
                             (0.02 + 0.16625) / 2, rtol=1e-6)
  np.testing.assert_allclose(
      baselines.margin_loss(lengths[:1], labels[:1], m_plus=1.0,
                            m_minus=0.0, absent_weight=1.0),
      0.05 ** 2 + 0.3 ** 2 + 0.05 ** 2, rtol=1e-6)


def test_spread_loss_hand_values():
  activations = jnp.array([[0.8, 0.5, 0.1], [0.3, 0.6, 0.5]])
  labels = jnp.array([0, 2])
  # Example 0: (0.4 - 0.3)^2 + 0 = 0.01.
  # Example 1: (0.4 - 0.2)^2 + (0.4 + 0.1)^2 = 0.29.
  np.testing.assert_allclose(
      baselines.spread_loss(activations, labels, 0.4), 0.15, rtol=1e-6)
  # Inside the margin everywhere, nothing to pay.
  assert float(baselines.spread_loss(activations[:1], labels[:1],
                                     0.2)) == 0.0
  margin = jax.jit(baselines.spread_margin, static_argnums=1)
  np.testing.assert_allclose([margin(s, 100) for s in (0, 50, 100, 150)],
                             [0.2, 0.55, 0.9, 0.9], rtol=1e-6)


def test_loss_for_each_routing():
  scores = jnp.array([[0.8, 0.5, 0.1], [0.3, 0.6, 0.5]])
  labels = jnp.array([0, 2])
  np.testing.assert_allclose(
      baselines.loss_for('inverted')(scores, labels),
      optax.softmax_cross_entropy_with_integer_labels(scores, labels).mean(),
      rtol=1e-6)
  np.testing.assert_allclose(baselines.loss_for('dynamic')(scores, labels),
                             baselines.margin_loss(scores, labels))
  np.testing.assert_allclose(baselines.loss_for('em')(scores, labels),
                             baselines.spread_loss(scores, labels, 0.9))
  # A traced margin, as a trainer would pass from its step counter.
  loss = jax.jit(lambda m: baselines.loss_for('em', margin=m)(scores,
                                                              labels))
  np.testing.assert_allclose(loss(0.4), 0.15, rtol=1e-6)
  with pytest.raises(ValueError, match='Unknown routing'):
    baselines.loss_for('capsule')
  with pytest.raises(ValueError, match='margin'):
    baselines.loss_for('dynamic', margin=0.5)


# ------------------------------------------------------- gradients, vmap, jit


@pytest.mark.parametrize('routing', ['dynamic', 'em'])
def test_routing_gradients_match_finite_differences(routing):
  """Through two iterations of a conv layer and an fc layer above it."""
  with jax.enable_x64(True):
    child, conv_w, activation = [jnp.asarray(a) for a in
                                 random_conv(8, True, size=4)]
    rng = np.random.default_rng(8)
    fc_w = jnp.asarray(0.5 * rng.normal(size=(2 * 2 * 3, 3, 3, 3)))
    betas = [jnp.asarray(b) for b in random_betas(8, 3) + random_betas(9, 3)]
    target = jnp.asarray(rng.normal(size=(2, 3)))

    def loss(params):
      child, conv_w, fc_w, activation, *betas = params
      if routing == 'dynamic':
        pose, _ = baselines.dynamic_conv_routing(child, conv_w, 2, stride=1,
                                                 matrix_pose=True)
        pose, _ = baselines.dynamic_fc_routing(
            pose.reshape(2, -1, 3, 3), fc_w, 2, matrix_pose=True)
        scores = baselines.capsule_length(pose, matrix_pose=True)
      else:
        pose, act, _ = baselines.em_conv_routing(
            child, activation, conv_w, betas[0], betas[1], 2, stride=1)
        _, scores, _ = baselines.em_fc_routing(
            pose.reshape(2, -1, 3, 3), act.reshape(2, -1), fc_w, betas[2],
            betas[3], 2)
      return jnp.sum(scores * target)

    @jax.jit
    def both_slopes(params, direction, eps=1e-6):
      """The analytic and the central-difference slope along direction."""
      grads = jax.grad(loss)(params)
      analytic = sum(jnp.vdot(g, d) for g, d in zip(grads, direction))
      plus = loss([a + eps * d for a, d in zip(params, direction)])
      minus = loss([a - eps * d for a, d in zip(params, direction)])
      return grads, analytic, (plus - minus) / (2 * eps)

    params = [child, conv_w, fc_w, activation] + betas
    for i in range(2):
      # NumPy draws: each shape of jax.random.normal would compile anew.
      direction = [jnp.asarray(rng.normal(size=a.shape)) for a in params]
      grads, analytic, numeric = both_slopes(params, direction)
      chex.assert_tree_all_finite(grads)
      np.testing.assert_allclose(analytic, numeric, rtol=1e-5,
                                 err_msg=f'direction {i}')


def mnist_tiny(routing):
  """28x28x1 -> 14x14x8 -> 4 primary 4x4 capsules -> 6x6x4 -> 10 classes."""
  config = configs.mnist_small()
  config.backbone_width = 8
  config.primary_caps = 4
  config.num_routing = 2  # Three are checked on the routing functions.
  config.routing = routing
  config.layers = [dict(type='conv', num_caps=4, kernel=3, stride=2),
                   dict(type='fc', num_caps=10)]
  return capsnet.from_config(config, 10)


@pytest.mark.parametrize('routing', ['dynamic', 'em'])
def test_capsnet_on_28x28_jit_vmap_and_gradients(routing):
  model = mnist_tiny(routing)
  assert model.routing == routing
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 28, 28, 1)),
                  jnp.float32)
  labels = jnp.array([0, 7, 3])
  # An rbg key: threefry's init compiles for ~4 s on a 2-core CPU, rbg's
  # in under one.
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(1, impl='rbg'), x[:1])
  params = variables['params']

  extra = 0
  if routing == 'em':
    extra = (8 * 4 + 4        # primary activation conv
             + 2 * 4          # betas of the conv capsules
             + 2 * 10)        # betas of the class capsules
  assert capsnet.parameter_summary(params)[0] == (
      3 * 3 * 8 + 8                       # simple backbone
      + 8 * 4 * 16                        # primary capsule poses
      + 3 * 3 * 4 * 16 * 4                # conv capsules, 14x14 -> 6x6
      + 6 * 6 * 4 * 10 * 16               # class capsules, no logit map
      + extra)

  @jax.jit
  def scores_batched_and_one_by_one(variables, x):
    one = jax.vmap(lambda xi: model.apply(variables, xi[None],
                                          train=False)[0])
    return model.apply(variables, x, train=False), one(x)

  scores, one_by_one = scores_batched_and_one_by_one(variables, x)
  chex.assert_shape(scores, (3, 10))
  chex.assert_tree_all_finite(scores)
  # Lengths or activations, both in (0, 1), and not collapsed to one value.
  assert float(scores.min()) > 0 and float(scores.max()) < 1
  assert np.ptp(np.asarray(scores)) > 1e-3
  # Examples are routed independently: vmap of one gives the batch.
  np.testing.assert_allclose(one_by_one, scores, atol=1e-5, rtol=1e-5)

  loss_fn = baselines.loss_for(routing)
  grads = jax.jit(jax.grad(lambda p: loss_fn(
      model.apply({'params': p}, x, train=True), labels)))(params)
  chex.assert_tree_all_finite(grads)
  for name in ('backbone', 'primary_caps', 'caps_0', 'caps_1'):
    assert float(optax.global_norm(grads[name])) > 0, name
  if routing == 'em':
    for layer in ('caps_0', 'caps_1'):
      for beta in ('beta_u', 'beta_a'):
        assert float(jnp.abs(grads[layer][beta]).max()) > 0, (layer, beta)


def test_routing_field_defaults_and_checks():
  assert configs.cifar10().routing == 'inverted'
  assert capsnet.from_config(configs.mnist_small(), 10).routing == 'inverted'
  model = capsnet.from_config(configs.mnist_small(), 10, routing='em')
  assert model.routing == 'em'
  bad = capsnet.from_config(configs.mnist_small(), 10, routing='votes')
  with pytest.raises(ValueError, match="Unknown routing 'votes'"):
    bad.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)), train=False)


@pytest.mark.parametrize('num_routing', [1, 3])
@pytest.mark.parametrize('routing', ['dynamic', 'em'])
def test_chunked_conv_routing_has_the_reference_gradients(routing,
                                                          num_routing):
  child, weight, activation = random_conv(4, True, size=6)
  beta_u, beta_a = random_betas(4, 3)

  def loss(impl, child, weight, activation):
    if routing == 'dynamic':
      pose = baselines.dynamic_conv_routing(
          child, weight, num_routing, stride=1, matrix_pose=True,
          impl=impl)[0]
      return jnp.sum(jnp.sin(pose))
    pose, act, _ = baselines.em_conv_routing(
        child, activation, weight, beta_u, beta_a, num_routing, stride=1,
        inverse_temperature=EM_TEMPERATURE, impl=impl)
    return jnp.sum(jnp.sin(pose)) + jnp.sum(jnp.cos(act))

  grads = {impl: jax.jit(jax.grad(functools.partial(loss, impl),
                                  argnums=(0, 1, 2)))(
                                      *f32(child, weight, activation))
           for impl in ('chunked', 'reference')}
  chex.assert_trees_all_close(grads['chunked'], grads['reference'],
                              atol=1e-4, rtol=1e-4)
  assert all(np.abs(g).max() > 1e-3 for g in grads['chunked'][:2])
