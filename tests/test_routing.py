"""Tests of jaxcaps.routing against float64 NumPy loops."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcaps import routing

ATOL, RTOL = 3e-5, 1e-4  # float32 against float64


# --------------------------------------------------- float64 loop reference


def np_layer_norm(pose, scale, bias, eps=1e-5):
  flat = pose.reshape(-1)
  normed = (flat - flat.mean()) / np.sqrt(flat.var() + eps)
  return (normed * scale + bias).reshape(pose.shape)


def np_route_children(children, weights, parents, scale, bias):
  """One routing iteration for one parent group, the obvious way.

  Args:
    children: list of N child poses (matrices or vectors).
    weights: weights[i][j], the transform of child i for parent j.
    parents: list of M previous parent poses, or None.
    scale, bias: layer-norm parameters, (d,).

  Returns:
    (list of M new parent poses, (N, M) couplings).
  """
  num_parents = len(weights[0])
  couplings = np.zeros((len(children), num_parents))
  sums = [0.0] * num_parents
  for i, child in enumerate(children):
    votes = [child @ weights[i][j] for j in range(num_parents)]
    if parents is None:
      logits = np.zeros(num_parents)
    else:
      logits = np.array([np.sum(votes[j] * parents[j])
                         / np.sqrt(parents[j].size)
                         for j in range(num_parents)])
    r = np.exp(logits - logits.max())
    r /= r.sum()
    couplings[i] = r
    for j in range(num_parents):
      sums[j] = sums[j] + r[j] * votes[j]
  return [np_layer_norm(s, scale, bias) for s in sums], couplings


def np_fc_step(child, weight, scale, bias, parent=None):
  """child (B, N, *P), weight (N, M, a, b) -> ((B, M, *P), (B, N, M))."""
  out, couplings = [], []
  for b in range(child.shape[0]):
    children = list(child[b])
    weights = [[weight[i, j] for j in range(weight.shape[1])]
               for i in range(weight.shape[0])]
    parents = None if parent is None else list(parent[b])
    poses, r = np_route_children(children, weights, parents, scale, bias)
    out.append(np.stack(poses))
    couplings.append(r)
  return np.stack(out), np.stack(couplings)


def np_conv_step(child, weight, scale, bias, stride, parent=None):
  """child (B, H, W, N, *P), weight (k, k, N, a, b, M).

  Returns ((B, H', W', M, *P), (B, H', W', k, k, N, M)).
  """
  batch, height, width, num_in = child.shape[:4]
  kernel, num_out = weight.shape[0], weight.shape[-1]
  out_h = (height - kernel) // stride + 1
  out_w = (width - kernel) // stride + 1
  out = np.zeros((batch, out_h, out_w, num_out) + child.shape[4:])
  couplings = np.zeros((batch, out_h, out_w, kernel, kernel, num_in,
                        num_out))
  for b in range(batch):
    for y in range(out_h):
      for x in range(out_w):
        children, weights = [], []
        for u in range(kernel):
          for v in range(kernel):
            for n in range(num_in):
              children.append(child[b, stride * y + u, stride * x + v, n])
              weights.append([weight[u, v, n, ..., j]
                              for j in range(num_out)])
        parents = None if parent is None else list(parent[b, y, x])
        poses, r = np_route_children(children, weights, parents, scale,
                                     bias)
        out[b, y, x] = np.stack(poses)
        couplings[b, y, x] = r.reshape(kernel, kernel, num_in, num_out)
  return out, couplings


# ----------------------------------------------------------------- fixtures


def pose_shape(matrix_pose):
  return (3, 3) if matrix_pose else (5,)


def weight_tail(matrix_pose):
  # Vector poses map d_in = 5 to d_out = 5; matrices are 3x3 by 3x3.
  return (3, 3) if matrix_pose else (5, 5)


def random_fc(seed, matrix_pose, batch=2, num_in=5, num_out=4):
  rng = np.random.default_rng(seed)
  shape = pose_shape(matrix_pose)
  d = math.prod(shape)
  child = rng.normal(size=(batch, num_in) + shape)
  weight = rng.normal(size=(num_in, num_out) + weight_tail(matrix_pose))
  scale = 1 + 0.3 * rng.normal(size=d)
  bias = 0.2 * rng.normal(size=d)
  return child, weight, scale, bias


def random_conv(seed, matrix_pose, size=6, kernel=3, num_in=3, num_out=4,
                batch=2):
  rng = np.random.default_rng(seed)
  shape = pose_shape(matrix_pose)
  d = math.prod(shape)
  child = rng.normal(size=(batch, size, size, num_in) + shape)
  weight = rng.normal(size=(kernel, kernel, num_in)
                      + weight_tail(matrix_pose) + (num_out,))
  scale = 1 + 0.3 * rng.normal(size=d)
  bias = 0.2 * rng.normal(size=d)
  return child, weight, scale, bias


def f32(*arrays):
  return [jnp.asarray(a, jnp.float32) for a in arrays]


# -------------------------------------------------------------------- tests


@pytest.mark.parametrize('matrix_pose', [True, False])
def test_fc_routing_matches_numpy_over_iterations(matrix_pose):
  child, weight, scale, bias = random_fc(0, matrix_pose)
  j_args = f32(child, weight, scale, bias)
  step = jax.jit(lambda c, w, s, b, p: routing.fc_routing_step(
      c, w, s, b, p, matrix_pose=matrix_pose))
  np_parent, j_parent = None, None
  for it in range(4):
    expected, expected_r = np_fc_step(child, weight, scale, bias, np_parent)
    r = routing.fc_couplings(j_args[0], j_args[1], j_parent,
                             matrix_pose=matrix_pose)
    j_parent = (routing.fc_routing_step(*j_args, matrix_pose=matrix_pose)
                if it == 0 else step(*j_args, j_parent))
    chex.assert_shape(j_parent, (2, 4) + pose_shape(matrix_pose))
    np.testing.assert_allclose(r, expected_r, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(j_parent, expected, atol=ATOL, rtol=RTOL,
                               err_msg=f'iteration {it}')
    np_parent = expected
  # Later iterations must actually move away from the uniform couplings.
  assert np.abs(expected_r - 1 / 4).max() > 0.05


@pytest.mark.parametrize('impl', routing.CONV_IMPLS)
@pytest.mark.parametrize('matrix_pose,stride,size',
                         [(True, 1, 6), (True, 2, 7), (False, 2, 6)])
def test_conv_routing_matches_numpy_over_iterations(impl, matrix_pose,
                                                    stride, size):
  child, weight, scale, bias = random_conv(1, matrix_pose, size=size)
  j_args = f32(child, weight, scale, bias)
  step = jax.jit(lambda c, w, s, b, p: routing.conv_routing_step(
      c, w, s, b, p, stride=stride, matrix_pose=matrix_pose, impl=impl))
  out = (size - 3) // stride + 1
  np_parent, j_parent = None, None
  for it in range(3):
    expected, expected_r = np_conv_step(child, weight, scale, bias, stride,
                                        np_parent)
    r = routing.conv_couplings(j_args[0], j_args[1], j_parent,
                               stride=stride, matrix_pose=matrix_pose)
    j_parent = (routing.conv_routing_step(*j_args, stride=stride,
                                          matrix_pose=matrix_pose, impl=impl)
                if it == 0 else step(*j_args, j_parent))
    chex.assert_shape(j_parent, (2, out, out, 4) + pose_shape(matrix_pose))
    np.testing.assert_allclose(r, expected_r, atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(j_parent, expected, atol=ATOL, rtol=RTOL,
                               err_msg=f'iteration {it}')
    np_parent = expected
  assert np.abs(expected_r - 1 / 4).max() > 0.05


@pytest.mark.parametrize('matrix_pose', [True, False])
def test_conv_windows_keep_each_pose_whole(matrix_pose):
  # Every window entry must be one input pose, untouched and in place.
  child = np.arange(2 * 7 * 7 * 3 * math.prod(pose_shape(matrix_pose)),
                    dtype=np.float32).reshape(
                        (2, 7, 7, 3) + pose_shape(matrix_pose))
  windows = routing.conv_windows(jnp.asarray(child), 3, 2,
                                 matrix_pose=matrix_pose)
  chex.assert_shape(windows, (2, 3, 3, 3, 3, 3) + pose_shape(matrix_pose))
  for y, x, u, v, n in np.ndindex(3, 3, 3, 3, 3):
    np.testing.assert_array_equal(windows[:, y, x, u, v, n],
                                  child[:, 2 * y + u, 2 * x + v, n])


def test_conv_votes_match_loops():
  child, weight, _, _ = random_conv(2, True, size=5)
  votes = routing.conv_votes(*f32(child, weight), stride=2)
  chex.assert_shape(votes, (2, 2, 2, 3, 3, 3, 4, 3, 3))
  for b, y, x, u, v, n, m in np.ndindex(*votes.shape[:7]):
    np.testing.assert_allclose(
        votes[b, y, x, u, v, n, m],
        child[b, 2 * y + u, 2 * x + v, n] @ weight[u, v, n, :, :, m],
        atol=ATOL, rtol=RTOL)


def test_first_iteration_couplings_are_exactly_uniform():
  child, weight, _, _ = random_fc(3, True)
  r = routing.fc_couplings(*f32(child, weight))
  np.testing.assert_array_equal(r, np.full((2, 5, 4), np.float32(1 / 4)))
  child, weight, _, _ = random_conv(3, True, num_out=7)
  r = routing.conv_couplings(*f32(child, weight), stride=1)
  chex.assert_shape(r, (2, 4, 4, 3, 3, 3, 7))
  np.testing.assert_array_equal(r, np.full(r.shape, np.float32(1 / 7)))


def test_uniform_pass_is_layer_norm_of_mean_vote():
  child, weight, scale, bias = random_fc(4, True)
  out = routing.fc_routing_step(*f32(child, weight, scale, bias))
  votes = np.einsum('bnax,nmxd->bnmad', child, weight)
  mean = votes.sum(1) / weight.shape[1]
  for b, m in np.ndindex(2, 4):
    np.testing.assert_allclose(out[b, m], np_layer_norm(mean[b, m], scale,
                                                        bias),
                               atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize('matrix_pose', [True, False])
def test_couplings_sum_to_one_over_parents(matrix_pose):
  child, weight, scale, bias = random_fc(5, matrix_pose)
  args = f32(child, weight, scale, bias)
  parent = routing.fc_routing_step(*args, matrix_pose=matrix_pose)
  r = routing.fc_couplings(args[0], args[1], parent,
                           matrix_pose=matrix_pose)
  np.testing.assert_allclose(r.sum(-1), np.ones((2, 5)), atol=1e-6)
  assert float(r.min()) >= 0

  child, weight, scale, bias = random_conv(5, matrix_pose, size=7)
  args = f32(child, weight, scale, bias)
  parent = routing.conv_routing_step(*args, stride=2,
                                     matrix_pose=matrix_pose)
  r = routing.conv_couplings(args[0], args[1], parent, stride=2,
                             matrix_pose=matrix_pose)
  # One unit per child per output position, even where windows overlap.
  np.testing.assert_allclose(r.sum(-1), np.ones(r.shape[:-1]), atol=1e-6)
  # ... and a child shared by two windows couples differently in each.
  assert np.abs(r[0, 0, 0, 2, 2] - r[0, 1, 1, 0, 0]).max() > 1e-3


def _np_route(layers, primary, num_routing, mode):
  """The two schedules, written out with NumPy layer steps."""
  if mode == 'concurrent':
    poses = [primary]
    for layer in layers:
      poses.append(layer(poses[-1], None))
    for _ in range(num_routing - 1):
      new = [primary]
      for i, layer in enumerate(layers):
        new.append(layer(poses[i], poses[i + 1]))
      poses = new
    return poses
  poses = [primary]
  for layer in layers:
    parent = layer(poses[-1], None)
    for _ in range(num_routing - 1):
      parent = layer(poses[-1], parent)
    poses.append(parent)
  return poses


def _conv_fc_stack(seed):
  """A conv capsule layer (6x6 -> 4x4) then an FC layer to 3 capsules."""
  child, conv_w, conv_s, conv_b = random_conv(seed, True, num_out=2)
  rng = np.random.default_rng(seed + 100)
  fc_w = rng.normal(size=(4 * 4 * 2, 3, 3, 3)) * 0.5
  fc_s, fc_b = 1 + 0.3 * rng.normal(size=9), 0.2 * rng.normal(size=9)

  def np_conv(c, p):
    return np_conv_step(c, conv_w, conv_s, conv_b, 1, p)[0]

  def np_fc(c, p):
    return np_fc_step(c.reshape(c.shape[0], -1, 3, 3), fc_w, fc_s, fc_b,
                      p)[0]

  jc = f32(conv_w, conv_s, conv_b)
  jf = f32(fc_w, fc_s, fc_b)

  def j_conv(c, p):
    return routing.conv_routing_step(c, *jc, p, stride=1)

  def j_fc(c, p):
    return routing.fc_routing_step(c.reshape(c.shape[0], -1, 3, 3), *jf, p)

  return child, [np_conv, np_fc], [j_conv, j_fc]


@pytest.mark.parametrize('num_routing', [1, 2, 3])
def test_schedules_match_numpy_and_differ_for_two_layers(num_routing):
  child, np_layers, j_layers = _conv_fc_stack(6)
  results = {}
  for mode in routing.ROUTING_MODES:
    expected = _np_route(np_layers, child, num_routing, mode)
    got = jax.jit(lambda c, mode=mode: routing.route(
        j_layers, c, num_routing, mode=mode))(jnp.asarray(child,
                                                          jnp.float32))
    assert len(got) == 3
    for level in (1, 2):
      np.testing.assert_allclose(got[level], expected[level], atol=ATOL,
                                 rtol=RTOL, err_msg=f'{mode} level {level}')
    results[mode] = np.asarray(got[-1])
  gap = np.abs(results['concurrent'] - results['sequential']).max()
  if num_routing <= 1:
    assert gap == 0
  else:
    # From iteration 2 the top layer sees stale children under concurrent
    # routing, so the class poses must differ.
    assert gap > 1e-2


def test_concurrent_two_iterations_route_only_the_top_layer():
  # The top layer at iteration 2 sees its children's uniform-pass poses.
  child, _, (conv, fc) = _conv_fc_stack(12)
  child = jnp.asarray(child, jnp.float32)
  poses = routing.route([conv, fc], child, 2, mode='concurrent')
  uniform_conv = conv(child, None)
  expected = fc(uniform_conv, fc(uniform_conv, None))
  np.testing.assert_allclose(poses[-1], expected, atol=1e-6)
  # The conv layer's own second iteration exists but feeds nothing.
  assert np.abs(poses[1] - uniform_conv).max() > 1e-2


@pytest.mark.parametrize('num_routing', [1, 2, 4])
def test_schedules_agree_for_a_single_layer(num_routing):
  child, weight, scale, bias = f32(*random_fc(7, True))

  def layer(c, p):
    return routing.fc_routing_step(c, weight, scale, bias, p)

  concurrent = routing.route([layer], child, num_routing, mode='concurrent')
  sequential = routing.route([layer], child, num_routing, mode='sequential')
  np.testing.assert_array_equal(concurrent[-1], sequential[-1])


def test_route_rejects_bad_arguments():
  with pytest.raises(ValueError, match='num_routing'):
    routing.route([], jnp.zeros(3), 0)
  with pytest.raises(ValueError, match='routing mode'):
    routing.route([], jnp.zeros(3), 2, mode='parallel')
  with pytest.raises(ValueError, match='impl'):
    routing.conv_routing_step(*f32(*random_conv(0, True)), stride=1,
                              impl='fast')
  with pytest.raises(ValueError, match='kernel 3'):
    routing.conv_windows(jnp.zeros((1, 2, 2, 1, 3, 3)), 3, 1)


@pytest.mark.parametrize('kind', ['fc', 'conv'])
def test_vmap_over_batch_and_extra_axes(kind):
  if kind == 'fc':
    child, weight, scale, bias = f32(*random_fc(8, True, batch=3))

    def step(c, p=None):
      return routing.fc_routing_step(c, weight, scale, bias, p)
  else:
    child, weight, scale, bias = f32(*random_conv(8, True, batch=3))

    def step(c, p=None):
      return routing.conv_routing_step(c, weight, scale, bias, p, stride=1)

  def two_iterations(c):
    return step(c, step(c))

  batched = two_iterations(child)
  # Per-example calls see no batch axis at all.
  per_example = jax.vmap(two_iterations)(child)
  np.testing.assert_allclose(per_example, batched, atol=1e-6, rtol=1e-6)
  # An extra leading axis is carried through as well.
  stacked = jnp.stack([child, 2 * child])
  outer = jax.jit(jax.vmap(two_iterations))(stacked)
  np.testing.assert_allclose(outer[0], batched, atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(outer[1], two_iterations(2 * child), atol=1e-6,
                             rtol=1e-6)


def test_chunked_and_reference_conv_agree_with_gradients():
  child, weight, scale, bias = f32(*random_conv(9, True, size=7))
  target = jax.random.normal(jax.random.key(0), (2, 3, 3, 4, 3, 3))

  def loss(child, weight, scale, bias, impl):
    def step(c, p=None):
      return routing.conv_routing_step(c, weight, scale, bias, p, stride=2,
                                       impl=impl)
    return jnp.sum(step(child, step(child, step(child))) * target)

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)),
                 static_argnums=4)
  (v_c, g_c), (v_r, g_r) = [grad(child, weight, scale, bias, impl)
                            for impl in routing.CONV_IMPLS]
  np.testing.assert_allclose(v_c, v_r, rtol=1e-5)
  for a, b in zip(g_c, g_r):
    chex.assert_tree_all_finite(a)
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('kind', ['fc', 'conv'])
def test_gradients_match_finite_differences(kind):
  with jax.enable_x64(True):
    if kind == 'fc':
      child, weight, scale, bias = [jnp.asarray(a) for a in
                                    random_fc(10, True)]

      def step(c, w, s, b, p=None):
        return routing.fc_routing_step(c, w, s, b, p)
    else:
      child, weight, scale, bias = [jnp.asarray(a) for a in
                                    random_conv(10, True, size=5)]

      def step(c, w, s, b, p=None):
        return routing.conv_routing_step(c, w, s, b, p, stride=1)

    target = jax.random.normal(jax.random.key(1),
                               step(child, weight, scale, bias).shape,
                               jnp.float64)

    def loss(args):
      parent = step(*args)
      parent = step(*args, parent)
      return jnp.sum(step(*args, parent) * target)

    args = (child, weight, scale, bias)
    grads = jax.jit(jax.grad(loss))(args)
    loss = jax.jit(loss)
    for i, key in enumerate(jax.random.split(jax.random.key(2), 3)):
      direction = jax.tree.map(
          lambda a, k=key: jax.random.normal(k, a.shape, a.dtype), args)
      eps = 1e-5
      plus = jax.tree.map(lambda a, d: a + eps * d, args, direction)
      minus = jax.tree.map(lambda a, d: a - eps * d, args, direction)
      numeric = (loss(plus) - loss(minus)) / (2 * eps)
      analytic = sum(jnp.vdot(g, d) for g, d in
                     zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
      np.testing.assert_allclose(analytic, numeric, rtol=1e-6,
                                 err_msg=f'direction {i}')


def test_init_scale_follows_the_paper():
  # Official CIFAR-10: conv 32 -> 32 types, k3, 4x4 poses; FC 800 -> 10.
  assert routing.capsule_init_scale(32, 32, 16, 3) == pytest.approx(
      math.sqrt(32 / (4 * 32 * 9)))
  assert routing.capsule_init_scale(800, 10, 16) == pytest.approx(
      math.sqrt(10 / (4 * 800)))
  assert routing.capsule_init_scale(800, 10, 16, matrix_pose=False) == (
      pytest.approx(math.sqrt(10 / (16 * 800))))


def test_pose_layer_norm_matches_numpy():
  rng = np.random.default_rng(11)
  pose = rng.normal(size=(3, 4, 4)) * 5 + 2
  scale, bias = rng.normal(size=16), rng.normal(size=16)
  got = routing.pose_layer_norm(*f32(pose, scale, bias))
  for i in range(3):
    np.testing.assert_allclose(got[i], np_layer_norm(pose[i], scale, bias),
                               atol=ATOL, rtol=RTOL)
