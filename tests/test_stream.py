"""The host-streamed input path (ImageNet's), on tfds's mock data.

`tfds.testing.mock_data` makes `tfds.load('imagenet2012', ...)` yield
random JPEGs of random sizes with random labels, without the data set, so
these tests run the real tf.data code: layout per host, decoding, the
Inception crop, determinism and resume, and the trainer end to end.
"""

import collections
import os
import signal

import chex
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxswap import config as config_lib
from jaxswap import models
from jaxswap import train
from jaxswap.data import stream as stream_lib

import helpers

tfds = pytest.importorskip('tensorflow_datasets')

NUM_EXAMPLES = 48


# ------------------------------------------------------------------ layout

Device = collections.namedtuple('Device', 'id process_index')


class FakeSharding:
  """P('replica', 'data') over a (R, D) grid of devices of given hosts."""

  def __init__(self, hosts: np.ndarray):
    self.hosts = hosts  # (R, D): the process of each mesh position

  def devices_indices_map(self, shape):
    w, b = shape
    r, d = self.hosts.shape
    return {Device(i * d + j, int(self.hosts[i, j])):
            (slice(i * w // r, (i + 1) * w // r),
             slice(j * b // d, (j + 1) * b // d))
            for i in range(r) for j in range(d)}


def test_one_process_feeds_the_whole_batch():
  mesh = jax.make_mesh((2, 4), ('replica', 'data'))
  feeds = stream_lib.layout(NamedSharding(mesh, P('replica', 'data')),
                            (4, 32))
  rows = ((0, 8), (8, 16), (16, 24), (24, 32))
  assert feeds == tuple(stream_lib.Feed(r, rows, 0, 1) for r in range(4))
  assert feeds[0].size == 32


@pytest.mark.parametrize('hosts,shape,expected', [
    # Phase 1 on 2 hosts of 4 devices: one replica, its rows split.
    ([[0, 0, 0, 0, 1, 1, 1, 1]], (1, 64),
     [[(0, 0, 32, 0, 2)], [(0, 32, 64, 1, 2)]]),
    # The same where the mesh interleaves the hosts' devices.
    ([[0, 1, 0, 1, 0, 1, 0, 1]], (1, 64),
     [[(0, 0, 32, 0, 2)], [(0, 32, 64, 1, 2)]]),
    # 8 replicas, one per device: each host feeds 4 whole replicas.
    ([[0], [0], [0], [0], [1], [1], [1], [1]], (8, 16),
     [[(r, 0, 16, 0, 1) for r in range(4)],
      [(r, 0, 16, 0, 1) for r in range(4, 8)]]),
    # 2 replicas over 4 hosts: each replica's rows split over 2 hosts.
    ([[0, 0, 1, 1], [2, 2, 3, 3]], (2, 8),
     [[(0, 0, 4, 0, 2)], [(0, 4, 8, 1, 2)], [(1, 0, 4, 0, 2)],
      [(1, 4, 8, 1, 2)]]),
])
def test_hosts_split_each_replica_into_disjoint_shards(hosts, shape,
                                                       expected):
  sharding = FakeSharding(np.array(hosts))
  for process, want in enumerate(expected):
    feeds = stream_lib.layout(sharding, shape, process=process)
    # (replica, rows held, shard, shards), the rows counted, not listed.
    assert [(f.replica, f.size, f.shard, f.num_shards) for f in feeds] == [
        (r, stop - start, shard, n) for r, start, stop, shard, n in want]
  # Together the hosts hold every row of every replica exactly once.
  for r in range(shape[0]):
    rows = sorted(b for p in range(len(expected))
                  for f in stream_lib.layout(sharding, shape, process=p)
                  if f.replica == r for b in f.rows)
    assert sum(b - a for a, b in rows) == shape[1]
    assert all(a[1] <= b[0] for a, b in zip(rows, rows[1:]))


def test_hosts_holding_unequal_rows_are_refused():
  sharding = FakeSharding(np.array([[0, 0, 0, 1]]))
  with pytest.raises(ValueError, match='unevenly'):
    stream_lib.layout(sharding, (1, 8), process=0)


def test_assemble_puts_each_replicas_rows_where_the_sharding_says():
  devices = np.array(jax.devices())[[3, 0, 6, 1, 5, 2, 7, 4]]
  mesh = jax.sharding.Mesh(devices.reshape(2, 4), ('replica', 'data'))
  sharding = NamedSharding(mesh, P('replica', 'data'))
  feeds = stream_lib.layout(sharding, (2, 8))
  local = {r: np.arange(8 * 3).reshape(8, 3) + 100 * r for r in (0, 1)}
  out = stream_lib.assemble(sharding, (2, 8, 3), feeds, local)
  assert out.sharding == sharding
  np.testing.assert_array_equal(np.asarray(out), np.stack([local[0],
                                                           local[1]]))


# ------------------------------------------------------------------ stream


@pytest.fixture
def mock_imagenet():
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    yield


def _stream(seed=0):
  return stream_lib.TfdsStream('imagenet2012', image_size=24,
                               data_dir=None, seed=seed)


def _take(it, n):
  return [tuple(np.asarray(a) for a in next(it)) for _ in range(n)]


def test_train_batches_are_a_pure_function_of_their_place(mock_imagenet):
  s = _stream()
  assert (s.num_train, s.num_test, s.num_classes) == (NUM_EXAMPLES,) * 2 + (
      1000,)
  mesh = jax.make_mesh((2, 4), ('replica', 'data'))
  sharding = NamedSharding(mesh, P('replica', 'data'))
  spe = NUM_EXAMPLES // 8  # 6 steps of 8 per epoch
  straight = _take(s.train_batches(2, sharding, 2, 8, spe, 0), 9)
  images, labels = straight[0]
  assert images.shape == (2, 8, 24, 24, 3) and images.dtype == np.uint8
  assert labels.shape == (2, 8) and labels.dtype == np.int32
  assert ((labels >= 0) & (labels < 1000)).all()
  # Each replica has its own order; an epoch sees every example once.
  assert not np.array_equal(images[0], images[1])
  epoch = np.concatenate([lab[1] for _, lab in straight[:spe]])
  assert len(epoch) == NUM_EXAMPLES
  # A resumed stream (step 4, and across the epoch boundary) continues
  # with the same batches; a new stream with the same seed repeats them.
  for start in (4, 7):
    resumed = _take(s.train_batches(2, sharding, 2, 8, spe, start),
                    9 - start)
    for a, b in zip(straight[start:], resumed):
      chex.assert_trees_all_equal(a, b)
  chex.assert_trees_all_equal(
      straight[:2], _take(_stream().train_batches(2, sharding, 2, 8, spe, 0),
                          2))
  # The next epoch is reshuffled and re-augmented.
  assert not np.array_equal(straight[spe][0], straight[0][0])
  other = _take(_stream(seed=1).train_batches(2, sharding, 2, 8, spe, 0), 1)
  assert not np.array_equal(other[0][0], images)


def test_eval_batches_cover_the_split_once_padded(mock_imagenet):
  s = _stream()
  mesh = jax.make_mesh((1, 8), ('replica', 'data'))
  batches = list(s.eval_batches('test', NamedSharding(mesh, P(None, 'data')),
                                32))
  assert len(batches) == 2  # 48 examples in batches of 32
  labels = np.concatenate([np.asarray(y)[0] for _, y in batches])
  assert (labels[:NUM_EXAMPLES] >= 0).all() and (labels[NUM_EXAMPLES:] == -1
                                                   ).all()
  images = np.concatenate([np.asarray(x)[0] for x, _ in batches])
  assert not images[NUM_EXAMPLES:].any()
  again = np.concatenate([np.asarray(x)[0] for x, _ in s.eval_batches(
      'test', NamedSharding(mesh, P(None, 'data')), 32)])
  np.testing.assert_array_equal(images, again)  # no randomness


def test_resnet50_has_the_reference_parameter_count():
  c = config_lib.base_config()
  c.model.name, c.model.width = 'resnet50', 1.0
  model = models.build(c, 1000)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jax.numpy.zeros((1, 224, 224, 3)), train=False))
  # torchvision's resnet50 has 25,557,032 parameters.
  assert sum(x.size for x in jax.tree.leaves(shapes['params'])) == 25_557_032
  # Each residual branch starts at zero: the blocks start as the identity.
  bn = shapes['params']['stage1_block1']['BatchNorm_2']['scale']
  variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3)),
                         train=False)
  assert bn.shape == (256,)
  assert not np.asarray(variables['params']['stage1_block1']['BatchNorm_2'][
      'scale']).any()
  assert model.apply(variables, np.zeros((2, 64, 64, 3)),
                     train=False).shape == (2, 1000)


# ----------------------------------------------------------------- trainer


def stream_config():
  c = config_lib.base_config()
  c.data.source = 'tfds_stream'
  c.data.name = 'imagenet2012'
  c.data.image_size = 16
  c.data.mean = (0.485, 0.456, 0.406)
  c.data.std = (0.229, 0.224, 0.225)
  c.model.name = 'tiny_cnn'
  c.model.width = 0.5
  c.phase1.batch_size = 16
  c.phase1.max_epochs = 2.0
  c.phase1.warmup_epochs = 0.5
  c.phase1.peak_lr = 0.1
  c.phase2.replicas = 2
  c.phase2.batch_size = 8
  c.phase2.epochs = 1.0
  c.phase2.peak_lr = 0.05
  c.phase3.bn_batches = 2
  c.phase3.bn_batch_size = 16
  c.eval.batch_size = 16
  c.eval.every_epochs = 1.0
  c.train.checkpoint_every = 2
  c.train.log_every = 1
  c.train.progress = 'log'
  return c


@pytest.fixture
def in_memory_imagenet(mock_imagenet, monkeypatch):
  """imagenet2012's metadata from the mock, its examples from memory.

  tfds's mock redirects every file operation of the process into a
  temporary folder while it loads a split, and the trainer loads one
  each epoch while orbax writes a checkpoint in the background: that
  checkpoint would land in the mock's folder. So the examples come from
  JPEGs made here, their files shuffled by the seed as tfds would.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  encoded = [tf.io.encode_jpeg(rng.integers(
      0, 256, (rng.integers(12, 40), rng.integers(12, 40), 3), np.uint8)
                               ).numpy() for _ in range(NUM_EXAMPLES)]
  labels = rng.integers(0, 1000, NUM_EXAMPLES)

  def load(self, split, shuffle_seed=None):
    del self, split
    ds = tf.data.Dataset.from_tensor_slices((encoded, labels))
    if shuffle_seed is None:
      return ds
    files = ds.batch(8)  # six "files" of 8 examples, in a seeded order
    return files.shuffle(6, seed=shuffle_seed).unbatch()
  monkeypatch.setattr(stream_lib.TfdsStream, '_load', load)


def test_a_streamed_run_stopped_and_resumed_ends_as_uninterrupted(
    in_memory_imagenet, tmp_path, monkeypatch):
  config = stream_config()
  straight = train.train_and_evaluate(config, tmp_path / 'straight')
  assert (straight['phase1']['steps'], straight['phase2']['steps']) == (6, 6)
  assert 0 <= straight['final']['test_accuracy'] <= 1
  assert len(straight['phase2']['replica_test_accuracy']) == 2

  # SIGTERM after the 3rd phase-2 batch is read: a checkpoint, a clean
  # stop; the rerun resumes from it and reads on from the same place.
  real = stream_lib.TfdsStream.train_batches

  def stopping(self, phase, *args):
    for i, batch in enumerate(real(self, phase, *args)):
      if phase == train._PHASE2 and i == 3:
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch
  monkeypatch.setattr(stream_lib.TfdsStream, 'train_batches', stopping)
  workdir = tmp_path / 'stopped'
  with pytest.raises(train.Preempted):
    train.train_and_evaluate(config, workdir)
  monkeypatch.setattr(stream_lib.TfdsStream, 'train_batches', real)
  resumed = train.train_and_evaluate(config, workdir)
  assert resumed['final'] == straight['final']
  chex.assert_trees_all_equal(helpers.final_params(workdir),
                              helpers.final_params(tmp_path / 'straight'))


def test_dry_run_compiles_the_streamed_step(in_memory_imagenet):
  plan = train.dry_run(stream_config())
  assert plan['phase2']['replicas'] == 2
  assert plan['phase1']['bytes_per_device'] > 0


@pytest.mark.parametrize('key,value,match', [
    ('data.mean', None, 'data.mean'), ('data.std', (0.2,), 'data.std'),
    ('data.validation_size', 1000, r"train_split='train\[1000:\]'")])
def test_a_stream_config_that_cannot_work_is_refused(key, value, match):
  c = stream_config()
  section, name = key.split('.')
  with c[section].ignore_type():
    c[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(c, 8)


def test_a_data_set_of_other_than_jpegs_is_refused(mock_imagenet):
  with pytest.raises(stream_lib.DataError, match='JPEG'):
    stream_lib.TfdsStream('mnist', image_size=28, data_dir=None)
