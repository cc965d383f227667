"""The train step: sharded equals single-device, vmapped equals separate."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxswap import step as step_lib
from jaxswap.data import pipeline
from jaxswap.models.tiny import TinyCNN

import helpers

CFG = step_lib.StepConfig(batch_size=32, crop_padding=1, flip=True,
                          label_smoothing=0.1)


def _mesh(replica, data):
  devices = np.asarray(jax.devices()[:replica * data])
  return jax.sharding.Mesh(devices.reshape(replica, data),
                           ('replica', 'data'))


def _run(mesh, keys, steps, arrays, model, tx, schedule, cfg=CFG):
  """`steps` train steps of len(keys) replicas, jitted on `mesh`."""
  rep = NamedSharding(mesh, P('replica'))
  data = pipeline.put(arrays, NamedSharding(mesh, P()))
  sample = jnp.zeros((1,) + arrays.train_images.shape[1:])
  init_keys = jnp.broadcast_to(jax.random.PRNGKey(42), keys.shape)
  state = jax.jit(functools.partial(step_lib.init_replicas, model, tx),
                  out_shardings=rep)(init_keys, sample)
  state = state.replace(key=jax.device_put(keys, rep))
  step = jax.jit(functools.partial(step_lib.train_step, model=model, tx=tx,
                                   schedule=schedule, cfg=cfg, mesh=mesh),
                 out_shardings=(rep, rep))
  n = arrays.train_images.shape[0]
  perm_fn = jax.jit(functools.partial(pipeline.permutations, n=n),
                    out_shardings=rep)
  history = []
  for s in range(steps):
    perm = perm_fn(state.key, s // (n // cfg.batch_size))
    state, metrics = step(state, data, perm)
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history


def test_eight_device_step_equals_one_device():
  arrays = helpers.synthetic_arrays()
  model = TinyCNN(num_classes=4)
  schedule, tx = helpers.sgd()
  keys = helpers.replica_keys(0, 1)
  one, h1 = _run(_mesh(1, 1), keys, 10, arrays, model, tx, schedule)
  eight, h8 = _run(_mesh(1, 8), keys, 10, arrays, model, tx, schedule)
  chex.assert_trees_all_close(one.params, eight.params, atol=2e-5,
                              rtol=2e-4)
  chex.assert_trees_all_close(one.batch_stats, eight.batch_stats,
                              atol=2e-5, rtol=2e-4)
  np.testing.assert_allclose([m['loss'] for m in h1],
                             [m['loss'] for m in h8], rtol=1e-4)
  # The model learned something, so the comparison is not of a no-op.
  assert h1[-1]['loss'][0] < h1[0]['loss'][0]
  assert not np.allclose(jax.tree.leaves(one.params)[0],
                         jax.tree.leaves(eight.params)[0] * 0)


@pytest.mark.parametrize('unroll', [False, True])
def test_vmapped_replicas_equal_separate_runs(unroll):
  arrays = helpers.synthetic_arrays()
  model = TinyCNN(num_classes=4)
  schedule, tx = helpers.sgd()
  keys = helpers.replica_keys(7, 4)
  cfg = CFG.replace(unroll=unroll)
  together, _ = _run(_mesh(4, 2), keys, 6, arrays, model, tx, schedule, cfg)
  for r in range(4):
    alone, _ = _run(_mesh(1, 8), keys[r:r + 1], 6, arrays, model, tx,
                    schedule)
    mine = jax.tree.map(lambda x, r=r: x[r:r + 1], together.params)
    chex.assert_trees_all_close(mine, alone.params, atol=2e-5, rtol=2e-4)
  # Different keys gave the replicas different data, hence weights.
  first = jax.tree.leaves(together.params)[0]
  assert np.abs(first[0] - first[1]).max() > 1e-4


def test_eight_replicas_on_one_device_equal_one_per_device():
  arrays = helpers.synthetic_arrays()
  model = TinyCNN(num_classes=4)
  schedule, tx = helpers.sgd()
  keys = helpers.replica_keys(3, 8)
  batched, _ = _run(_mesh(1, 1), keys, 4, arrays, model, tx, schedule)
  unrolled, _ = _run(_mesh(1, 1), keys, 4, arrays, model, tx, schedule,
                     CFG.replace(unroll=True))
  chex.assert_trees_all_close(batched.params, unrolled.params, atol=2e-5,
                              rtol=2e-4)
  spread, _ = _run(_mesh(8, 1), keys, 4, arrays, model, tx, schedule)
  chex.assert_trees_all_close(batched.params, spread.params, atol=2e-5,
                              rtol=2e-4)


def test_schedule_warmup_and_linear_decay():
  schedule, _ = helpers.sgd(peak=0.1, total=10)
  got = np.asarray([schedule(s) for s in range(12)])
  want = [0.05, 0.1] + [0.1 * (1 - (s - 2) / 8) for s in range(2, 10)] + [
      0.0, 0.0]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


def test_augment_crops_within_padding_and_flips():
  images = jnp.arange(2 * 6 * 6, dtype=jnp.int32).reshape(2, 6, 6, 1)
  images = (images % 200 + 1).astype(jnp.uint8)
  out = np.asarray(pipeline.augment(jax.random.PRNGKey(0), images, 2, True))
  src = np.asarray(images)
  for i in range(2):
    padded = np.pad(src[i], ((2, 2), (2, 2), (0, 0)))
    found = any(
        np.array_equal(out[i], padded[a:a + 6, b:b + 6][:, ::f])
        for a in range(5) for b in range(5) for f in (1, -1))
    assert found, 'output is not a crop (or flipped crop) of the input'


def test_cpu_compiler_options_keep_the_numbers():
  """The trainer's XLA options on the CPU change speed, not the step."""
  options = step_lib.compiler_options()
  assert options == step_lib.CPU_OPTIONS
  arrays = helpers.synthetic_arrays()
  model = TinyCNN(num_classes=4)
  schedule, tx = helpers.sgd()
  mesh = _mesh(1, 1)
  rep = NamedSharding(mesh, P('replica'))
  data = pipeline.put(arrays, NamedSharding(mesh, P()))
  state = jax.jit(functools.partial(step_lib.init_replicas, model, tx))(
      helpers.replica_keys(0, 1), jnp.zeros((1, 8, 8, 1)))
  perm = pipeline.permutations(state.key, 0, n=arrays.train_images.shape[0])
  fn = functools.partial(step_lib.train_step, model=model, tx=tx,
                         schedule=schedule, cfg=CFG, mesh=mesh)
  finals = []
  for jitted in (jax.jit(fn, out_shardings=(rep, rep)),
                 step_lib.jit(fn, out_shardings=(rep, rep))):
    s = state
    for _ in range(3):
      s, _ = jitted(s, data, perm)
    finals.append(jax.device_get(s))
  chex.assert_trees_all_close(finals[0].params, finals[1].params, atol=1e-5,
                              rtol=1e-4)
  chex.assert_trees_all_close(finals[0].batch_stats, finals[1].batch_stats,
                              atol=1e-5, rtol=1e-4)


@pytest.fixture
def fresh_options():
  """Empties the cache of compiler_options before and after a test."""
  step_lib.compiler_options.cache_clear()
  yield
  step_lib.compiler_options.cache_clear()


def test_compiler_options_fall_back_when_xla_rejects_them(monkeypatch,
                                                         fresh_options):
  del fresh_options
  monkeypatch.setattr(step_lib, 'CPU_OPTIONS',
                      {'xla_cpu_experimental_ynn_fusion_type': 'NO_SUCH'})
  assert step_lib.compiler_options() == {}


def test_compiler_options_off_by_environment(monkeypatch, fresh_options):
  del fresh_options
  monkeypatch.setenv('JAXSWAP_XLA_DEFAULTS', '1')
  assert step_lib.compiler_options() == {}
  assert step_lib.compiler_options('gpu') == {}
