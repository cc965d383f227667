"""Phase 3 against NumPy: the average, and BN statistics recomputed."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxswap import step as step_lib
from jaxswap.data import pipeline

import helpers


class DenseBN(nn.Module):
  """flatten -> Dense -> BN -> ReLU -> Dense -> BN: two BN layers."""
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(6, name='d0')(x)
    x = nn.BatchNorm(use_running_average=not train,
                     momentum=self.bn_momentum, name='bn0')(x)
    x = nn.relu(x)
    x = nn.Dense(3, name='d1')(x)
    return nn.BatchNorm(use_running_average=not train,
                        momentum=self.bn_momentum, name='bn1')(x)


def test_average_is_the_mean_over_replicas():
  rng = np.random.default_rng(0)
  tree = {'a': rng.normal(size=(4, 3, 2)), 'b': rng.normal(size=(4,))}
  got = step_lib.average(jax.tree.map(jnp.asarray, tree))
  np.testing.assert_allclose(got['a'][0], tree['a'].sum(0) / 4, rtol=1e-6)
  np.testing.assert_allclose(got['b'][0], tree['b'].sum(0) / 4, rtol=1e-6)
  weights = jnp.asarray([1.0, 0.0, 1.0, 1.0])
  got = step_lib.average(jax.tree.map(jnp.asarray, tree), weights)
  np.testing.assert_allclose(got['a'][0], tree['a'][[0, 2, 3]].mean(0),
                             rtol=1e-6)


def _bn_reference(params, images, mean, std, perm, batch_size, batches):
  """The plain average of each BN layer's batch statistics, in float64."""
  p = jax.tree.map(lambda x: np.asarray(x[0], np.float64), params)
  sums = {'bn0': [0.0, 0.0], 'bn1': [0.0, 0.0]}
  n = images.shape[0]
  spe = n // batch_size
  for i in range(batches):
    start = (i % spe) * batch_size
    idx = np.asarray(perm[start:start + batch_size])
    x = (images[idx].astype(np.float64) / 255 - mean) / std
    x = x.reshape(batch_size, -1)
    h = x @ p['d0']['kernel'] + p['d0']['bias']
    m0, v0 = h.mean(0), h.var(0)
    sums['bn0'][0] += m0
    sums['bn0'][1] += v0
    h = (h - m0) / np.sqrt(v0 + 1e-5) * p['bn0']['scale'] + p['bn0']['bias']
    h = np.maximum(h, 0) @ p['d1']['kernel'] + p['d1']['bias']
    sums['bn1'][0] += h.mean(0)
    sums['bn1'][1] += h.var(0)
  return {k: {'mean': s[0] / batches, 'var': s[1] / batches}
          for k, s in sums.items()}


def test_bn_recompute_matches_numpy_reference():
  arrays = helpers.synthetic_arrays(n_train=200, shape=(4, 4, 1))
  model = DenseBN()
  replicas = 3
  keys = helpers.replica_keys(1, replicas)
  _, tx = helpers.sgd()
  sample = jnp.zeros((1, 4, 4, 1))
  state = step_lib.init_replicas(model, tx, keys, sample)
  # Stale, nonsense running statistics: the recompute must ignore them.
  stale = jax.tree.map(lambda x: x + 3.0, state.batch_stats)
  params, _ = step_lib.average((state.params, stale))
  data = pipeline.put(arrays, jax.devices()[0])
  cfg = step_lib.StepConfig(batch_size=48, crop_padding=0, flip=False,
                            label_smoothing=0.0)
  key = helpers.replica_keys(9, 1)
  got = step_lib.recompute_batch_stats(
      params, jax.tree.map(lambda x: x[:1], stale), key, data, model=model,
      num_batches=5, cfg=cfg)
  perm = np.asarray(jax.random.permutation(key[0], 200))
  want = _bn_reference(params, arrays.train_images, 0.4, 0.3, perm, 48, 5)
  for layer in ('bn0', 'bn1'):
    for stat in ('mean', 'var'):
      np.testing.assert_allclose(got[layer][stat][0], want[layer][stat],
                                 rtol=2e-4, atol=2e-5)
  # The plain average over 5 batches is not what momentum 0.9 would give.
  assert np.abs(want['bn0']['mean']).max() > 1e-3


def test_bn_recompute_of_a_model_without_bn_is_a_no_op():
  got = step_lib.recompute_batch_stats(
      {}, {}, None, None, model=DenseBN(), num_batches=1,
      cfg=step_lib.StepConfig(1, 0, False, 0.0))
  assert got == {}


def test_swa_running_sum_matches_snapshots_taken_by_hand():
  arrays = helpers.synthetic_arrays(n_train=128, shape=(4, 4, 1))
  model = DenseBN()
  schedule, tx = helpers.sgd(peak=0.05, total=20)
  keys = helpers.replica_keys(2, 2)
  state = step_lib.init_replicas(model, tx, keys, jnp.zeros((1, 4, 4, 1)))
  state = step_lib.with_swa(state)
  data = pipeline.put(arrays, jax.devices()[0])
  cfg = step_lib.StepConfig(batch_size=16, crop_padding=0, flip=False,
                            label_smoothing=0.0, swa_every=3, swa_start=4)
  step = jax.jit(lambda s, p: step_lib.train_step(
      s, data, p, model=model, tx=tx, schedule=schedule, cfg=cfg))
  perm = pipeline.permutations(state.key, 0, 128)
  snapshots = []
  for t in range(1, 12):
    state, _ = step(state, perm)
    if t >= 4 and (t - 4) % 3 == 0:      # steps 4, 7, 10
      snapshots.append(jax.device_get(state.params))
  np.testing.assert_array_equal(state.swa_count, [3, 3])
  want = jax.tree.map(lambda *xs: np.mean(xs, axis=0), *snapshots)
  got = step_lib.swa_params(state)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
