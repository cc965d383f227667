"""Host-streamed input: tf.data over tensorflow-datasets, sharded per host.

For data sets too large to keep on every device (ImageNet), each process
reads, decodes and augments its own part of every batch with tf.data, and
the parts become one global array (`jax.make_array_from_process_local_data`)
laid out as the step's sharding wants it.

Which part a process reads follows from that sharding alone (`layout`):
the processes that hold a replica split that replica's batch rows, and
each of them reads a disjoint shard of the split (`tfds.even_splits`), so
no example is read twice for one replica and no host reads what it does
not feed.

Like the in-memory pipeline, a batch is a pure function of its place: the
order of an epoch is a seeded shuffle of (seed, phase, replica, epoch) and
each example's augmentation is seeded by its position in that order. A
resumed run skips to its step and sees the batches an uninterrupted one
would have (on the same number of processes).
"""

import dataclasses
import functools
from typing import Any, Iterator

import jax
import numpy as np

from jaxswap.data.errors import DataError

SHUFFLE_BUFFER = 10_000     # examples, per process and replica
CROP_AREA = (0.08, 1.0)     # Inception-style crop: share of the image...
CROP_ASPECT = (3 / 4, 4 / 3)  # ...and aspect ratios it may take
EVAL_CROP = 0.875           # centre crop of the evaluation images


@dataclasses.dataclass(frozen=True)
class Layout:
  """The part of a global (W, B, ...) batch that this process feeds.

  Attributes:
    replicas: (first, stop) of the replicas whose rows it holds.
    rows: (first, stop) of the batch rows it gives each of them.
    shard: which of `num_shards` disjoint shards of the split it reads;
      the processes sharing its replicas read the others.
    num_shards: how many processes split each replica's batch.
  """
  replicas: tuple[int, int]
  rows: tuple[int, int]
  shard: int
  num_shards: int

  @property
  def local_shape(self) -> tuple[int, int]:
    return (self.replicas[1] - self.replicas[0],
            self.rows[1] - self.rows[0])


def layout(sharding: jax.sharding.Sharding, shape: tuple[int, int],
           process: int | None = None) -> Layout:
  """Where `process` (default: this one) sits in a (W, B) global batch.

  Args:
    sharding: the sharding of the (W, B, ...) batch.
    shape: (W, B).
    process: a process index, for tests of multi-host layouts.

  Raises:
    ValueError: a process holds a block that is not a rectangle, or the
      processes of a replica hold unequal row ranges.
  """
  process = jax.process_index() if process is None else process
  blocks = {}  # process -> (replica range, row range)
  for device, index in sharding.devices_indices_map(tuple(shape)).items():
    r = index[0].indices(shape[0])[:2]
    b = index[1].indices(shape[1])[:2]
    blocks.setdefault(device.process_index, []).append((r, b))

  def block(p):
    parts = set(blocks[p])
    rs = (min(r[0] for r, _ in parts), max(r[1] for r, _ in parts))
    bs = (min(b[0] for _, b in parts), max(b[1] for _, b in parts))
    area = sum((r[1] - r[0]) * (b[1] - b[0]) for r, b in parts)
    if area != (rs[1] - rs[0]) * (bs[1] - bs[0]):
      raise ValueError(f'process {p} holds a non-rectangular part of the '
                       f'batch ({sorted(parts)}); build the mesh with '
                       'jax.make_mesh so that each host holds a block')
    return rs, bs

  mine = block(process)
  sharing = sorted({block(p)[1] for p in blocks
                    if block(p)[0][0] < mine[0][1]
                    and mine[0][0] < block(p)[0][1]})
  sizes = {b[1] - b[0] for b in sharing}
  if len(sizes) != 1:
    raise ValueError(f'the processes holding replicas {mine[0]} split their '
                     f'rows unevenly ({sharing})')
  return Layout(replicas=mine[0], rows=mine[1],
                shard=sharing.index(mine[1]), num_shards=len(sharing))


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
               seed: int = 0, download: bool = False):
    # Seconds of TensorFlow import; only this input path needs it.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tf.config.set_visible_devices([], 'GPU')  # the host's GPUs are JAX's
    self._tf, self._tfds = tf, tfds
    self.name, self.image_size, self.seed = name, image_size, seed
    self.image_shape = (image_size, image_size, 3)
    self._data_dir, self._download = data_dir, download
    self._splits = {'train': train_split, 'test': eval_split}
    self._loaded = {}
    try:
      builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as e:
      raise DataError(f'tensorflow-datasets has no data set {name!r}; use '
                      'one of tfds.list_builders(), such as imagenet2012'
                      ) from e
    label = builder.info.features['label']
    self.class_names = tuple(getattr(label, 'names', None) or
                             map(str, range(label.num_classes)))
    self.num_train = self._size('train')
    self.num_test = self._size('test')

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def _load(self, split: str):
    try:
      return self._tfds.load(
          self.name, split=split, data_dir=self._data_dir,
          as_supervised=True, shuffle_files=False, download=self._download,
          decoders={'image': self._tfds.decode.SkipDecoding()},
          read_config=self._tfds.ReadConfig(try_autocache=False))
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

  def _shard(self, which: str, shard: int, num_shards: int):
    """The (encoded image, label) examples of one shard of a split.

    Loaded once: every epoch's pipeline starts from the same dataset.
    """
    key = which, shard, num_shards
    if key not in self._loaded:
      split = self._splits[which]
      if num_shards > 1:
        split = self._tfds.even_splits(split, num_shards)[shard]
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

  def _epoch(self, phase: int, replica: int, epoch: int, lay: Layout,
             steps: int, skip: int):
    """One replica's rows of `steps` batches of one epoch, from `skip`."""
    tf = self._tf
    rows = lay.rows[1] - lay.rows[0]
    seed = _seed(self.seed, phase, replica, epoch, lay.shard)
    ds = self._shard('train', lay.shard, lay.num_shards)
    ds = ds.shuffle(SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=False)
    ds = ds.take(steps * rows).skip(skip * rows)
    ds = ds.enumerate(start=skip * rows)
    base = tf.constant(seed % (2**31), tf.int64)

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
    lay = layout(sharding, (replicas, batch_size))
    image_shape = (replicas, batch_size) + self.image_shape
    label_shape = (replicas, batch_size)
    epoch, skip = divmod(start, steps_per_epoch)
    while True:
      parts = [self._epoch(phase, r, epoch, lay, steps_per_epoch, skip)
               for r in range(*lay.replicas)]
      ds = tf.data.Dataset.zip(tuple(parts)).map(
          lambda *p: (tf.stack([x for x, _ in p]), tf.stack([y for _, y in p])))
      for images, labels in ds.prefetch(2).as_numpy_iterator():
        yield (jax.make_array_from_process_local_data(
                   sharding, images, image_shape),
               jax.make_array_from_process_local_data(
                   sharding, labels, label_shape))
      epoch, skip = epoch + 1, 0

  def eval_batches(self, which: str, sharding, batch_size: int
                   ) -> Iterator[tuple[jax.Array, jax.Array]]:
    """A split as (1, E, S, S, 3) uint8 batches, padded with label -1.

    Every process yields the same number of batches (collectives must
    match); the last ones are padding where its shard ran out.
    """
    tf = self._tf
    lay = layout(sharding, (1, batch_size))
    rows = lay.rows[1] - lay.rows[0]
    total = self.num_train if which == 'train' else self.num_test
    per_shard = -(-total // lay.num_shards)
    ds = self._shard(which, lay.shard, lay.num_shards).map(
        lambda encoded, label: (self._eval_image(encoded),
                                tf.cast(label, tf.int32)),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    it = ds.batch(rows).prefetch(2).as_numpy_iterator()
    image_shape = (1, batch_size) + self.image_shape
    for _ in range(-(-per_shard // rows)):
      images, labels = next(it, (np.zeros((0,) + self.image_shape, np.uint8),
                                 np.zeros((0,), np.int32)))
      pad = rows - len(labels)
      images = np.pad(images, ((0, pad),) + ((0, 0),) * 3)
      labels = np.pad(labels, (0, pad), constant_values=-1)
      yield (jax.make_array_from_process_local_data(
                 sharding, images[None], image_shape),
             jax.make_array_from_process_local_data(
                 sharding, labels[None], (1, batch_size)))


def from_config(data: Any, seed: int) -> TfdsStream:
  """The stream of a config's `data` block (source 'tfds_stream')."""
  if data.validation_size:
    v = data.validation_size
    train, held = f'{data.train_split}[{v}:]', f'{data.train_split}[:{v}]'
    raise DataError(
        f'config.data.validation_size={v}: a streamed data set holds no '
        f'examples out itself; set data.train_split={train!r} and '
        f'data.eval_split={held!r} instead, or 0')
  return TfdsStream(data.name, image_size=data.image_size,
                    data_dir=data.tfds_data_dir,
                    train_split=data.train_split,
                    eval_split=data.eval_split, seed=seed)
