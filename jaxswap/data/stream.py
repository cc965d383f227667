"""Host-streamed input: tf.data over tensorflow-datasets, sharded per host.

For data sets too large to keep on every device (ImageNet), each process
reads, decodes and augments its own part of every batch with tf.data, and
the parts become one global array laid out as the step's sharding wants
it (`assemble`, one piece per device).

Which part a process reads follows from that sharding alone (`layout`):
the processes that hold a replica split that replica's batch rows, and
each of them reads a disjoint shard of the split (`tfds.even_splits`), so
no example is read twice for one replica and no host reads what it does
not feed.

Like the in-memory pipeline, a batch is a pure function of its place: an
epoch's order is the shard's files in an order seeded by (seed, phase,
replica, epoch), then a shuffle buffer with the same seed, and each
example's augmentation is seeded by its position in that order. A resumed
run skips to its step and sees the batches an uninterrupted one would
have (on the same number of processes)."""

import collections
import dataclasses
from typing import Any, Iterator

import jax
import numpy as np

from jaxswap.data.errors import DataError

CROP_AREA = (0.08, 1.0)     # Inception-style crop: share of the image...
CROP_ASPECT = (3 / 4, 4 / 3)  # ...and aspect ratios it may take
EVAL_CROP = 0.875           # centre crop of the evaluation images


@dataclasses.dataclass(frozen=True)
class Feed:
  """What this process reads for one replica of a global (W, B) batch.

  Attributes:
    replica: the replica.
    rows: the ranges of its batch rows that this process's devices hold.
    shard: which of `num_shards` disjoint shards of the split to read them
      from; the other processes holding the replica read the others.
    num_shards: how many processes split the replica's rows.
  """
  replica: int
  rows: tuple[tuple[int, int], ...]
  shard: int
  num_shards: int

  @property
  def size(self) -> int:
    return sum(stop - start for start, stop in self.rows)


def layout(sharding: jax.sharding.Sharding, shape: tuple[int, int],
           process: int | None = None) -> tuple[Feed, ...]:
  """What `process` (default: this one) reads for a (W, B) global batch.

  The processes that hold a replica's rows split its batch: each reads
  the rows its devices hold, from its own shard of the split. A process's
  rows need not be contiguous (on a TPU slice, `jax.make_mesh` follows the
  torus, not the hosts).

  Args:
    sharding: the sharding of the (W, B, ...) batch.
    shape: (W, B).
    process: a process index, for tests of multi-host layouts.

  Returns:
    One Feed per replica the process holds a part of, by replica.

  Raises:
    ValueError: the processes of a replica hold unequal numbers of rows,
      or overlapping but different ones.
  """
  process = jax.process_index() if process is None else process
  held = collections.defaultdict(set)  # (process, replica) -> row ranges
  for device, index in sharding.devices_indices_map(tuple(shape)).items():
    first, stop = index[0].indices(shape[0])[:2]
    rows = index[1].indices(shape[1])[:2]
    for r in range(first, stop):
      held[device.process_index, r].add(rows)
  feeds = []
  for (p, r), rows in sorted(held.items()):
    if p != process:
      continue
    groups = sorted({tuple(sorted(v)) for (_, q), v in held.items()
                     if q == r})
    sizes = {sum(b - a for a, b in g) for g in groups}
    if len(sizes) != 1 or sum(sizes) * len(groups) != shape[1]:
      raise ValueError(f'the processes holding replica {r} split its '
                       f'{shape[1]} rows unevenly or overlapping ({groups})')
    mine = tuple(sorted(rows))
    feeds.append(Feed(r, mine, groups.index(mine), len(groups)))
  return tuple(feeds)


def assemble(sharding: jax.sharding.Sharding, shape: tuple[int, ...],
             feeds: tuple[Feed, ...], local: dict[int, np.ndarray]
             ) -> jax.Array:
  """The global (W, B, ...) array from this process's rows of each replica.

  Args:
    sharding: the array's sharding.
    shape: its global shape.
    feeds: `layout(sharding, shape[:2])`.
    local: replica -> (feed.size, ...) rows, in the order of feed.rows.
  """
  offsets = {}
  for f in feeds:
    at = 0
    for start, stop in f.rows:
      offsets[f.replica, start] = at
      at += stop - start
  pieces = []
  for device, index in sharding.addressable_devices_indices_map(
      tuple(shape)).items():
    first, stop = index[0].indices(shape[0])[:2]
    start, end = index[1].indices(shape[1])[:2]
    piece = np.stack([
        local[r][offsets[r, start]:offsets[r, start] + end - start]
        for r in range(first, stop)])
    pieces.append(jax.device_put(piece[(slice(None), slice(None))
                                       + tuple(index[2:])], device))
  return jax.make_array_from_single_device_arrays(tuple(shape), sharding,
                                                   pieces)


def _seed(*parts: int) -> int:
  """A 63-bit seed that mixes `parts` (the same on every process)."""
  return int(np.random.SeedSequence(list(parts)).generate_state(
      2, np.uint64)[0] >> np.uint64(1))


class TfdsStream:
  """Batches of a tensorflow-datasets image data set, read per host.

  Attributes:
    name: the tfds name.
    class_names: one per label.
    num_train, num_test: global sizes of the train and evaluation splits.
    image_shape: (size, size, 3) of every batch's images.
  """

  def __init__(self, name: str, *, image_size: int, data_dir: str | None,
               train_split: str = 'train', eval_split: str = 'validation',
               seed: int = 0, shuffle_buffer: int = 10_000,
               download: bool = False):
    # Seconds of TensorFlow import; only this input path needs it.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], 'GPU')  # the host's GPUs are JAX's
    self._tf, self._tfds = tf, tfds
    self.name, self.image_size, self.seed = name, image_size, seed
    self.image_shape = (image_size, image_size, 3)
    self._data_dir, self._download = data_dir, download
    self._splits = {'train': train_split, 'test': eval_split}
    self._shuffle_buffer = shuffle_buffer
    self._loaded = {}
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as e:
      raise DataError(f'tensorflow-datasets has no data set {name!r}; use '
                      'one of tfds.list_builders(), such as imagenet2012'
                      ) from e
    features = builder.info.features
    image = features['image'] if 'image' in features else None
    label = features['label'] if 'label' in features else None
    if (label is None or not hasattr(label, 'num_classes')
        or getattr(image, 'encoding_format', None) != 'jpeg'):
      raise DataError(
          f'tfds data set {name!r} has no JPEG `image` and class `label` '
          f'features ({", ".join(features.keys())}); the streamed path '
          "decodes JPEGs: use data.source='tfds' for other image sets")
    self.class_names = tuple(getattr(label, 'names', None) or
                             map(str, range(label.num_classes)))
    self.num_train = self._size('train')
    self.num_test = self._size('test')

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def _load(self, split: str, shuffle_seed: int | None = None):
    """(encoded image, label) examples; files in a seeded order if given."""
    try:
      return self._tfds.load(
          self.name, split=split, data_dir=self._data_dir,
          as_supervised=True, shuffle_files=shuffle_seed is not None,
          download=self._download,
          decoders={'image': self._tfds.decode.SkipDecoding()},
          read_config=self._tfds.ReadConfig(try_autocache=False,
                                            shuffle_seed=shuffle_seed))
    except (AssertionError, OSError) as e:
      where = self._data_dir or '$TFDS_DATA_DIR or ~/tensorflow_datasets'
      raise DataError(
          f'tfds data set {self.name!r} split {split!r} is not prepared in '
          f'{where} ({type(e).__name__}: {str(e)[:200]}); prepare it with '
          f'`tfds build {self.name} --data_dir=DIR` (ImageNet needs its '
          'tarballs in DIR/downloads/manual) and pass '
          '--config.data.tfds_data_dir=DIR') from e

  def _size(self, which: str) -> int:
    ds = self._shard(which, 0, 1)
    n = int(ds.cardinality())
    if n < 0:
      raise DataError(f'tfds {self.name!r} {self._splits[which]!r}: the '
                      'number of examples is unknown')
    return n

  def _shard(self, which: str, shard: int, num_shards: int,
             shuffle_seed: int | None = None):
    """The (encoded image, label) examples of one shard of a split.

    In file order (loaded once), or with the files in a seeded order.
    """
    split = self._splits[which]
    if num_shards > 1:
      split = self._tfds.even_splits(split, num_shards)[shard]
    if shuffle_seed is not None:
      return self._load(split, shuffle_seed)
    key = which, shard, num_shards
    if key not in self._loaded:
      self._loaded[key] = self._load(split)
    return self._loaded[key]

  # ------------------------------------------------------------ decoding

  def _train_image(self, encoded, seed):
    """Inception-style random crop, resize and flip: uint8 (S, S, 3)."""
    tf = self._tf
    shape = tf.image.extract_jpeg_shape(encoded)
    box_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 2))
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, tf.zeros([0, 0, 4], tf.float32), seed=box_seed,
        min_object_covered=0.1, aspect_ratio_range=CROP_ASPECT,
        area_range=CROP_AREA, max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
    image = self._resize(image)
    return tf.image.stateless_random_flip_left_right(image, flip_seed)

  def _eval_image(self, encoded):
    """The centre EVAL_CROP of the shorter side, resized: uint8 (S, S, 3)."""
    tf = self._tf
    shape = tf.image.extract_jpeg_shape(encoded)
    side = tf.cast(EVAL_CROP * tf.cast(tf.minimum(shape[0], shape[1]),
                                       tf.float32), tf.int32)
    window = tf.stack([(shape[0] - side + 1) // 2,
                       (shape[1] - side + 1) // 2, side, side])
    return self._resize(tf.image.decode_and_crop_jpeg(encoded, window,
                                                      channels=3))

  def _resize(self, image):
    tf = self._tf
    image = tf.image.resize(image, [self.image_size] * 2,
                            method='bicubic', antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)

  # ------------------------------------------------------------- batches

  def _epoch(self, phase: int, feed: Feed, epoch: int, steps: int,
             skip: int):
    """One replica's rows of `steps` batches of one epoch, from `skip`.

    The order is the shard's files in a seeded order, then a seeded
    shuffle buffer: different for every replica and epoch, and the same
    wherever it is rebuilt.
    """
    tf = self._tf
    rows = feed.size
    seed = _seed(self.seed, phase, feed.replica, epoch, feed.shard)
    ds = self._shard('train', feed.shard, feed.num_shards,
                     shuffle_seed=seed % 2**31)
    ds = ds.shuffle(self._shuffle_buffer, seed=seed,
                    reshuffle_each_iteration=False)
    ds = ds.take(steps * rows).skip(skip * rows)
    ds = ds.enumerate(start=skip * rows)
    base = tf.constant(seed % 2**31, tf.int64)

    def decode(i, example):
      encoded, label = example
      image = self._train_image(encoded, tf.stack([base, i]))
      return image, tf.cast(label, tf.int32)
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
    return ds.batch(rows, drop_remainder=True)

  def train_batches(self, phase: int, sharding, replicas: int,
                    batch_size: int, steps_per_epoch: int, start: int
                    ) -> Iterator[tuple[jax.Array, jax.Array]]:
    """Global (W, B, S, S, 3) uint8 images and (W, B) labels, from `start`.

    Args:
      phase: a number that keeps the phases' orders apart.
      sharding: of the (W, B, ...) batch; it sets what this process reads.
      replicas, batch_size: W and B (B per replica).
      steps_per_epoch: batches per replica per epoch.
      start: the step to begin at (a resumed run's position).
    """
    tf = self._tf
    feeds = layout(sharding, (replicas, batch_size))
    shape = (replicas, batch_size)
    epoch, skip = divmod(start, steps_per_epoch)
    while True:
      parts = tuple(self._epoch(phase, f, epoch, steps_per_epoch, skip)
                    for f in feeds)
      for batch in tf.data.Dataset.zip(parts).prefetch(2).as_numpy_iterator():
        yield (assemble(sharding, shape + self.image_shape, feeds,
                        {f.replica: x for f, (x, _) in zip(feeds, batch)}),
               assemble(sharding, shape, feeds,
                        {f.replica: y for f, (_, y) in zip(feeds, batch)}))
      epoch, skip = epoch + 1, 0

  def eval_batches(self, which: str, sharding, batch_size: int
                   ) -> Iterator[tuple[jax.Array, jax.Array]]:
    """A split as (1, E, S, S, 3) uint8 batches, padded with label -1.

    Every process yields the same number of batches (collectives must
    match); the last ones are padding where its shard ran out.
    """
    tf = self._tf
    (feed,) = layout(sharding, (1, batch_size))
    rows = feed.size
    total = self.num_train if which == 'train' else self.num_test
    per_shard = -(-total // feed.num_shards)
    ds = self._shard(which, feed.shard, feed.num_shards).map(
        lambda encoded, label: (self._eval_image(encoded),
                                tf.cast(label, tf.int32)),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    it = ds.batch(rows).prefetch(2).as_numpy_iterator()
    empty = (np.zeros((0,) + self.image_shape, np.uint8),
             np.zeros((0,), np.int32))
    for _ in range(-(-per_shard // rows)):
      images, labels = next(it, empty)
      pad = rows - len(labels)
      images = np.pad(images, ((0, pad),) + ((0, 0),) * 3)
      labels = np.pad(labels, (0, pad), constant_values=-1)
      yield (assemble(sharding, (1, batch_size) + self.image_shape, (feed,),
                      {0: images}),
             assemble(sharding, (1, batch_size), (feed,), {0: labels}))


def from_config(data: Any, seed: int) -> TfdsStream:
  """The stream of a config's `data` block (source 'tfds_stream')."""
  return TfdsStream(data.name, image_size=data.image_size,
                    data_dir=data.tfds_data_dir,
                    train_split=data.train_split,
                    eval_split=data.eval_split, seed=seed,
                    shuffle_buffer=data.shuffle_buffer)
