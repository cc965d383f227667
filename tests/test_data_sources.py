"""Tests for jaxswap.data.sources, on the real data sets and on bad input.

The real data lives in ../shared/data (MNIST idx files and the CIFAR-10 JPEG
tarball) and /usr/share/datasets/fashion-mnist. Expected values come from
the data sets' published counts or from parsing the files here another
way, never from the code under test.
"""

import gzip
import io
import math
import os
import pathlib
import struct
import tarfile
import tempfile
import time
import types

import hypothesis
from hypothesis import strategies as st
import ml_collections
import numpy as np
from PIL import Image
import pytest

from jaxswap.data import sources
from jaxswap.data.errors import DataError

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / 'shared' / 'data'
MNIST_DIR = SHARED_DATA / 'mnist'
CIFAR_TARBALL = SHARED_DATA / 'cifar10-jpeg.tar.gz'
FASHION_DIR = pathlib.Path('/usr/share/datasets/fashion-mnist')

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851,
                      5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
CIFAR_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog',
                 'frog', 'horse', 'ship', 'truck')

# Big-endian numpy types of the idx type codes, written out independently of
# the reader's own table.
IDX_CODES = {'>u1': 0x08, '>i1': 0x09, '>i2': 0x0B, '>i4': 0x0C,
             '>f4': 0x0D, '>f8': 0x0E}


def idx_bytes(array: np.ndarray, dtype: str = '>u1') -> bytes:
  """Encodes `array` as an idx file of the big-endian type `dtype`."""
  header = bytes([0, 0, IDX_CODES[dtype], array.ndim])
  header += struct.pack(f'>{array.ndim}I', *array.shape)
  return header + np.ascontiguousarray(array, dtype).tobytes()


def write(path: pathlib.Path, data: bytes, gz: bool = False) -> pathlib.Path:
  path.write_bytes(gzip.compress(data) if gz else data)
  return path


def gunzip_payload(path: pathlib.Path, header_size: int) -> np.ndarray:
  """The uint8 payload of an idx file, parsed without the code under test."""
  return np.frombuffer(gzip.decompress(path.read_bytes()), np.uint8,
                       offset=header_size)


def data_config(**fields) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict({
      'source': 'idx', 'name': 'mnist', 'path': None, 'cache_dir': None,
      'tfds_data_dir': None})
  config.update(fields)
  return config


def write_idx_folder(folder: pathlib.Path, train_images, train_labels,
                     test_images, test_labels) -> pathlib.Path:
  folder.mkdir(parents=True, exist_ok=True)
  write(folder / 'train-images-idx3-ubyte.gz', idx_bytes(train_images), True)
  write(folder / 'train-labels-idx1-ubyte.gz', idx_bytes(train_labels), True)
  write(folder / 't10k-images-idx3-ubyte', idx_bytes(test_images))
  write(folder / 't10k-labels-idx1-ubyte', idx_bytes(test_labels))
  return folder


def tiny_idx_folder(folder: pathlib.Path, train_labels=(0, 1, 2, 9),
                    test_labels=(3, 4)) -> pathlib.Path:
  rng = np.random.default_rng(0)
  train_labels, test_labels = np.array(train_labels), np.array(test_labels)
  return write_idx_folder(
      folder, rng.integers(0, 256, (len(train_labels), 5, 4), np.uint8),
      train_labels, rng.integers(0, 256, (len(test_labels), 5, 4), np.uint8),
      test_labels)


def save_image(path: pathlib.Path, pixels: np.ndarray):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(pixels).save(path)


def make_image_folder(root: pathlib.Path, layout) -> pathlib.Path:
  """Writes PNGs (lossless, so pixels can be compared exactly).

  Args:
    root: the folder to create.
    layout: {split: {class: {file name: pixels}}}.

  Returns:
    `root`.
  """
  for split, classes in layout.items():
    for name, files in classes.items():
      (root / split / name).mkdir(parents=True, exist_ok=True)
      for filename, pixels in files.items():
        save_image(root / split / name / filename, pixels)
  return root


def tar_folder(folder: pathlib.Path, tarball: pathlib.Path,
               arcname: str) -> pathlib.Path:
  mode = 'w' if tarball.name.endswith('.tar') else 'w:gz'
  with tarfile.open(tarball, mode) as tar:
    tar.add(folder, arcname=arcname)
  return tarball


def pixels(seed: int, shape=(4, 3, 3)) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, shape, np.uint8)


# Classes 'b', 'a', 'c' are written out of order, and file names '10.png'
# and '2.png' sort as strings, so the expected order is spelled out here.
SMALL_LAYOUT = {
    'train': {
        'b': {'2.png': pixels(1), '10.png': pixels(2)},
        'a': {'x.png': pixels(3)},
        'c': {'k.png': pixels(4), 'j.png': pixels(5), 'l.png': pixels(6)},
    },
    'test': {
        'c': {'z.png': pixels(7)},
        'a': {'y.png': pixels(8)},
    },
}
SMALL_TRAIN_ORDER = [('a', 'x.png', 0), ('b', '10.png', 1),
                     ('b', '2.png', 1), ('c', 'j.png', 2), ('c', 'k.png', 2),
                     ('c', 'l.png', 2)]
SMALL_TEST_ORDER = [('a', 'y.png', 0), ('c', 'z.png', 2)]


def check_small(ds: sources.ArrayDataset):
  assert ds.class_names == ('a', 'b', 'c')
  assert ds.image_shape == (4, 3, 3)
  for split, order in (('train', SMALL_TRAIN_ORDER),
                       ('test', SMALL_TEST_ORDER)):
    images = getattr(ds, f'{split}_images')
    labels = getattr(ds, f'{split}_labels')
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    assert labels.tolist() == [label for _, _, label in order]
    expected = np.stack([SMALL_LAYOUT[split][c][f] for c, f, _ in order])
    np.testing.assert_array_equal(images, expected)


# ------------------------------------------------------------------- MNIST


@pytest.fixture(scope='module')
def mnist():
  return sources.load_idx(MNIST_DIR)


def test_read_idx_mnist_train_files():
  images = sources.read_idx(MNIST_DIR / 'train-images-idx3-ubyte.gz')
  labels = sources.read_idx(MNIST_DIR / 'train-labels-idx1-ubyte.gz')

  assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
  assert labels.shape == (60000,) and labels.dtype == np.uint8
  assert np.bincount(labels).tolist() == MNIST_TRAIN_COUNTS
  # The pixels are the bytes after the 16-byte header, in order.
  # np.array_equal: assert_array_equal takes seconds on 47M pixels.
  assert np.array_equal(
      images.ravel(),
      gunzip_payload(MNIST_DIR / 'train-images-idx3-ubyte.gz', 16))


def test_load_idx_mnist(mnist):
  assert mnist.name == 'mnist'
  assert mnist.train_images.shape == (60000, 28, 28, 1)
  assert mnist.test_images.shape == (10000, 28, 28, 1)
  assert mnist.train_images.dtype == np.uint8
  assert mnist.train_labels.dtype == mnist.test_labels.dtype == np.int32
  assert mnist.image_shape == (28, 28, 1)
  assert mnist.num_classes == 10
  assert mnist.class_names == tuple('0123456789')
  assert np.bincount(mnist.train_labels).tolist() == MNIST_TRAIN_COUNTS

  # Test labels, counted from the raw bytes after the 8-byte header.
  raw = gunzip_payload(MNIST_DIR / 't10k-labels-idx1-ubyte.gz', 8)
  counts = [int(np.count_nonzero(raw == digit)) for digit in range(10)]
  assert sum(counts) == 10000
  assert counts == MNIST_TEST_COUNTS
  assert np.bincount(mnist.test_labels, minlength=10).tolist() == counts
  assert np.array_equal(
      mnist.test_images.ravel(),
      gunzip_payload(MNIST_DIR / 't10k-images-idx3-ubyte.gz', 16))


def test_load_config_default_mnist_path_is_relative_to_cwd(
    mnist, monkeypatch):
  monkeypatch.chdir(ROOT)
  ds = sources.load(data_config(source='idx', name='mnist'))
  assert np.array_equal(ds.train_images, mnist.train_images)
  assert np.array_equal(ds.test_labels, mnist.test_labels)


def test_load_idx_reads_raw_and_gzipped_files_alike(tmp_path):
  folder = tiny_idx_folder(tmp_path / 'mixed')  # train gzipped, test raw
  ds = sources.load_idx(folder, name='mnist')
  assert ds.train_images.shape == (4, 5, 4, 1)
  assert ds.train_labels.tolist() == [0, 1, 2, 9]
  assert ds.test_labels.tolist() == [3, 4]
  rng = np.random.default_rng(0)
  np.testing.assert_array_equal(
      ds.train_images[..., 0], rng.integers(0, 256, (4, 5, 4), np.uint8))


def test_load_idx_other_name_numbers_classes(tmp_path):
  folder = tiny_idx_folder(tmp_path / 'k', train_labels=(0, 3, 1, 2),
                           test_labels=(3, 0))
  ds = sources.load_idx(folder, name='kmnist')
  assert ds.class_names == ('0', '1', '2', '3')


# ----------------------------------------------------------- Fashion-MNIST


@pytest.mark.skipif(
    not FASHION_DIR.is_dir(),
    reason=f'{FASHION_DIR} is absent; `apt-get install dataset-fashion-mnist`'
           ' installs it')
def test_load_fashion_mnist_from_default_path():
  ds = sources.load(data_config(source='idx', name='fashion_mnist'))
  assert ds.name == 'fashion_mnist'
  assert ds.train_images.shape == (60000, 28, 28, 1)
  assert ds.test_images.shape == (10000, 28, 28, 1)
  assert np.bincount(ds.train_labels).tolist() == [6000] * 10
  assert np.bincount(ds.test_labels).tolist() == [1000] * 10
  assert ds.class_names == ('T-shirt/top', 'Trouser', 'Pullover', 'Dress',
                            'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                            'Ankle boot')
  assert np.array_equal(
      ds.train_labels,
      gunzip_payload(FASHION_DIR / 'train-labels-idx1-ubyte.gz', 8))


# ---------------------------------------------------------------- CIFAR-10


@pytest.fixture(scope='session')
def cifar(tmp_path_factory):
  """Decodes the CIFAR-10 tarball once per session into a temporary cache."""
  cache_dir = tmp_path_factory.mktemp('cifar_cache')
  start = time.perf_counter()
  ds = sources.load_image_folder(CIFAR_TARBALL, cache_dir=cache_dir,
                                 name='cifar10')
  seconds = time.perf_counter() - start
  print(f'\nCIFAR-10: decoded 60000 JPEGs in {seconds:.1f} s')
  return types.SimpleNamespace(ds=ds, cache_dir=cache_dir, seconds=seconds)


def test_cifar_tarball_shapes_counts_and_classes(cifar):
  ds = cifar.ds
  assert ds.name == 'cifar10'
  assert ds.train_images.shape == (50000, 32, 32, 3)
  assert ds.test_images.shape == (10000, 32, 32, 3)
  assert ds.train_images.dtype == ds.test_images.dtype == np.uint8
  assert ds.class_names == CIFAR_CLASSES
  assert np.bincount(ds.train_labels).tolist() == [5000] * 10
  assert np.bincount(ds.test_labels).tolist() == [1000] * 10
  # Sorted by class, so labels never decrease.
  assert np.all(np.diff(ds.train_labels) >= 0)
  assert np.all(np.diff(ds.test_labels) >= 0)


def test_cifar_pixels_match_a_separate_pillow_decode(cifar):
  members = {}
  with tarfile.open(CIFAR_TARBALL, 'r:gz') as tar:
    for member in tar:
      if member.isfile():
        members[member.name] = tar.extractfile(member).read()
  rng = np.random.default_rng(42)
  for split in ('train', 'test'):
    names = sorted(n for n in members if n.startswith(split + '/'))
    # Sorting the full member names sorts by class, then by file name.
    images = getattr(cifar.ds, f'{split}_images')
    labels = getattr(cifar.ds, f'{split}_labels')
    picks = [0, len(names) - 1, *rng.integers(0, len(names), 30)]
    for i in picks:
      decoded = np.asarray(Image.open(io.BytesIO(members[names[i]])))
      np.testing.assert_array_equal(images[i], decoded, err_msg=names[i])
      assert CIFAR_CLASSES[labels[i]] == names[i].split('/')[1]


def test_cifar_second_load_reads_the_cache(cifar, monkeypatch):
  def no_decoding(*args):
    raise AssertionError('the second load decoded images again')
  monkeypatch.setattr(sources, '_decode_images', no_decoding)

  start = time.perf_counter()
  again = sources.load_image_folder(CIFAR_TARBALL, cache_dir=cifar.cache_dir,
                                    name='cifar10')
  # Speed is a benchmark's business, not a test's: the time is only shown.
  seconds = time.perf_counter() - start
  print(f'\nCIFAR-10: cached load in {seconds:.2f} s '
        f'(first decode {cifar.seconds:.1f} s)')
  assert again.class_names == cifar.ds.class_names
  for field in ('train_images', 'train_labels', 'test_images',
                'test_labels'):
    assert np.array_equal(getattr(again, field), getattr(cifar.ds, field))
  files = sorted(p.name for p in cifar.cache_dir.iterdir())
  assert len(files) == 1 and files[0].endswith('.npz'), files


def test_normalization_on_cifar_matches_float64(cifar):
  mean, std = sources.normalization(cifar.ds.train_images)
  assert mean.shape == std.shape == (3,)
  for c in range(3):
    channel = cifar.ds.train_images[..., c].astype(np.float64) / 255
    np.testing.assert_allclose(mean[c], channel.mean(), rtol=1e-6)
    np.testing.assert_allclose(std[c], channel.std(), rtol=1e-6)


# ------------------------------------------------------- small image folders


def test_image_folder_directory_orders_classes_and_files(tmp_path):
  folder = make_image_folder(tmp_path / 'small', SMALL_LAYOUT)
  ds = sources.load_image_folder(folder, cache_dir=tmp_path / 'cache')
  assert ds.name == 'small'
  check_small(ds)


@pytest.mark.parametrize('tarball, arcname', [
    ('small.tar.gz', 'small'),  # one top-level folder
    ('small.tgz', '.'),  # members named ./train/...
    ('small.tar', 'small'),  # not compressed
])
def test_image_folder_tarballs(tmp_path, tarball, arcname):
  folder = make_image_folder(tmp_path / 'small', SMALL_LAYOUT)
  path = tar_folder(folder, tmp_path / tarball, arcname)
  ds = sources.load_image_folder(path, cache_dir=tmp_path / 'cache')
  assert ds.name == 'small'
  check_small(ds)


def test_image_folder_all_grayscale_keeps_one_channel(tmp_path):
  gray = {'train': {'a': {'0.png': pixels(1, (4, 3))},
                    'b': {'0.png': pixels(2, (4, 3))}},
          'test': {'b': {'0.png': pixels(3, (4, 3))}}}
  ds = sources.load_image_folder(make_image_folder(tmp_path / 'g', gray),
                                 cache_dir=tmp_path / 'cache')
  assert ds.image_shape == (4, 3, 1)
  np.testing.assert_array_equal(ds.train_images[1, ..., 0], pixels(2, (4, 3)))


def test_image_folder_mixed_gray_and_rgb_becomes_rgb(tmp_path):
  mixed = {'train': {'a': {'0.png': pixels(1, (4, 3)),
                           '1.png': pixels(2, (4, 3, 3))}},
           'test': {'a': {'0.png': pixels(3, (4, 3))}}}
  ds = sources.load_image_folder(make_image_folder(tmp_path / 'm', mixed),
                                 cache_dir=tmp_path / 'cache')
  assert ds.image_shape == (4, 3, 3)
  gray = pixels(1, (4, 3))
  np.testing.assert_array_equal(ds.train_images[0],
                                np.stack([gray, gray, gray], axis=-1))
  np.testing.assert_array_equal(ds.train_images[1], pixels(2, (4, 3, 3)))


def test_image_folder_decodes_in_processes(tmp_path, monkeypatch):
  # Chunks of 2 images give the 6 + 2 images four tasks, so a pool runs.
  monkeypatch.setattr(sources, '_DECODE_CHUNK', 2)
  folder = make_image_folder(tmp_path / 'small', SMALL_LAYOUT)
  check_small(sources.load_image_folder(folder, cache_dir=tmp_path / 'c'))

  save_image(folder / 'train' / 'c' / 'm.png', pixels(9, (5, 3, 3)))
  with pytest.raises(DataError, match=r'm\.png is 3x5 pixels but .* 3x4'):
    sources.load_image_folder(folder, cache_dir=tmp_path / 'c')


def test_image_folder_cache_follows_changes(tmp_path):
  folder = make_image_folder(tmp_path / 'small', SMALL_LAYOUT)
  cache_dir = tmp_path / 'cache'
  check_small(sources.load_image_folder(folder, cache_dir=cache_dir))

  changed = folder / 'train' / 'a' / 'x.png'
  save_image(changed, pixels(99))
  stat = changed.stat()
  os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
  ds = sources.load_image_folder(folder, cache_dir=cache_dir)
  np.testing.assert_array_equal(ds.train_images[0], pixels(99))
  assert not [p for p in cache_dir.iterdir() if p.suffix == '.tmp']


def test_image_folder_rebuilds_an_unreadable_cache(tmp_path):
  folder = make_image_folder(tmp_path / 'small', SMALL_LAYOUT)
  cache_dir = tmp_path / 'cache'
  sources.load_image_folder(folder, cache_dir=cache_dir)
  (cache_file,) = cache_dir.iterdir()
  cache_file.write_bytes(b'not a zip file')
  check_small(sources.load_image_folder(folder, cache_dir=cache_dir))


def test_image_folder_default_cache_dir_is_env(tmp_path, monkeypatch):
  monkeypatch.setenv('JAXSWAP_CACHE', str(tmp_path / 'env_cache'))
  folder = make_image_folder(tmp_path / 'small', SMALL_LAYOUT)
  sources.load_image_folder(folder)
  (cache_file,) = (tmp_path / 'env_cache').iterdir()
  assert cache_file.name.startswith('small-') and cache_file.suffix == '.npz'


def test_load_config_image_folder_uses_name_and_cache_dir(tmp_path):
  folder = make_image_folder(tmp_path / 'small', SMALL_LAYOUT)
  tarball = tar_folder(folder, tmp_path / 'small.tar.gz', 'small')
  ds = sources.load(data_config(source='image_folder', name='tiny',
                                path=str(tarball),
                                cache_dir=str(tmp_path / 'c')))
  assert ds.name == 'tiny'
  check_small(ds)
  assert len(list((tmp_path / 'c').iterdir())) == 1


# ------------------------------------------------------------- idx reading


@pytest.mark.parametrize('dtype', sorted(IDX_CODES))
@pytest.mark.parametrize('gz', [False, True])
def test_read_idx_round_trips_every_type(tmp_path, dtype, gz):
  rng = np.random.default_rng(7)
  values = (rng.normal(0, 1000, (3, 2, 5)) if dtype[1] == 'f'
            else rng.integers(-128 if dtype[1] == 'i' else 0, 128, (3, 2, 5)))
  expected = values.astype(dtype)
  path = write(tmp_path / 'a.idx', idx_bytes(expected, dtype), gz)
  array = sources.read_idx(path)
  assert array.dtype == np.dtype(dtype).newbyteorder('=')
  assert array.dtype.isnative
  np.testing.assert_array_equal(array, expected)


def test_read_idx_empty_dimension(tmp_path):
  path = write(tmp_path / 'e.idx', idx_bytes(np.zeros((0, 28), np.uint8)))
  assert sources.read_idx(path).shape == (0, 28)


# ------------------------------------------------------------- bad inputs


@pytest.mark.parametrize('shape', [(0, 2**31, 2**31, 2**31), (1,) * 70])
def test_idx_header_with_an_impossible_shape(tmp_path, shape):
  # Found by fuzzing: the payload size matches, numpy refuses the shape.
  header = bytes([0, 0, 0x08, len(shape)]) + struct.pack(
      f'>{len(shape)}I', *shape)
  path = write(tmp_path / 'shape.idx', header + bytes(math.prod(shape)))
  with pytest.raises(DataError, match='is not a valid array shape'):
    sources.read_idx(path)


def test_truncated_idx(tmp_path):
  data = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
  path = write(tmp_path / 'cut.idx', data[:-5])
  with pytest.raises(DataError, match=r'needs 24 payload bytes but the file '
                     r'has 19; the file is truncated') as e:
    sources.read_idx(path)
  assert str(path) in str(e.value)


def test_truncated_idx_header(tmp_path):
  path = write(tmp_path / 'head.idx', b'\0\0\x08\x03' + b'\0\0\0\x02')
  with pytest.raises(DataError, match='needs 16 bytes but the file has 8'):
    sources.read_idx(path)


def test_truncated_gzip(tmp_path):
  data = gzip.compress(idx_bytes(np.zeros((50, 50), np.uint8)))
  path = write(tmp_path / 'cut.gz', data[:len(data) // 2])
  with pytest.raises(DataError, match='broken gzip'):
    sources.read_idx(path)


@pytest.mark.parametrize('magic', [b'\0\0\x07\x01', b'\x01\0\x08\x01',
                                   b'\0\0\x08\x00', b'PK\x03\x04'])
def test_wrong_magic(tmp_path, magic):
  path = write(tmp_path / 'bad.idx', magic + b'\0\0\0\x01' + b'\x05')
  with pytest.raises(DataError, match=f'magic number 0x{magic.hex()} is not '
                     'idx'):
    sources.read_idx(path)


def test_trailing_bytes(tmp_path):
  data = idx_bytes(np.arange(6, dtype=np.int32).reshape(2, 3), '>i4')
  path = write(tmp_path / 'long.idx', data + b'\0\0\0', gz=True)
  with pytest.raises(DataError, match='needs 24 payload bytes but the file '
                     'has 27; the file is followed by extra bytes'):
    sources.read_idx(path)


def test_missing_idx_file(tmp_path):
  with pytest.raises(DataError, match='cannot read .*nope.idx'):
    sources.read_idx(tmp_path / 'nope.idx')
  folder = tiny_idx_folder(tmp_path / 'm')
  (folder / 't10k-labels-idx1-ubyte').unlink()
  with pytest.raises(DataError, match='neither t10k-labels-idx1-ubyte.gz nor'):
    sources.load_idx(folder)


def test_labels_out_of_range(tmp_path):
  folder = tiny_idx_folder(tmp_path / 'm', test_labels=(3, 10))
  with pytest.raises(DataError, match=r't10k-labels-idx1-ubyte: label 10 at '
                     r'index 1 is outside \[0, 10\)'):
    sources.load_idx(folder, name='mnist')


def test_label_count_differs_from_image_count(tmp_path):
  folder = tiny_idx_folder(tmp_path / 'm')
  write(folder / 't10k-labels-idx1-ubyte', idx_bytes(np.array([1, 2, 3])))
  with pytest.raises(DataError, match='has 2 images but .* has 3 labels'):
    sources.load_idx(folder)


def test_swapped_idx_files(tmp_path):
  folder = tiny_idx_folder(tmp_path / 'm')
  labels = (folder / 't10k-labels-idx1-ubyte').read_bytes()
  images = (folder / 't10k-images-idx3-ubyte').read_bytes()
  (folder / 't10k-labels-idx1-ubyte').write_bytes(images)
  (folder / 't10k-images-idx3-ubyte').write_bytes(labels)
  with pytest.raises(DataError, match='not uint8 images'):
    sources.load_idx(folder)


def test_image_folder_empty_class(tmp_path):
  folder = make_image_folder(tmp_path / 'small', SMALL_LAYOUT)
  (folder / 'train' / 'd').mkdir()
  with pytest.raises(DataError, match=r'class folder .*train/d is empty'):
    sources.load_image_folder(folder, cache_dir=tmp_path / 'c')
  tarball = tar_folder(folder, tmp_path / 'small.tar.gz', 'small')
  with pytest.raises(DataError, match=r'small/train/d in .* is empty'):
    sources.load_image_folder(tarball, cache_dir=tmp_path / 'c')


def test_image_folder_test_class_missing_from_train(tmp_path):
  folder = make_image_folder(tmp_path / 'small', SMALL_LAYOUT)
  save_image(folder / 'test' / 'zebra' / '0.png', pixels(0))
  with pytest.raises(DataError, match=r"test classes \['zebra'\] have no "
                     'train folder'):
    sources.load_image_folder(folder, cache_dir=tmp_path / 'c')


def test_image_folder_mixed_sizes(tmp_path):
  folder = make_image_folder(tmp_path / 'small', SMALL_LAYOUT)
  save_image(folder / 'test' / 'a' / 'wide.png', pixels(0, (4, 6, 3)))
  with pytest.raises(DataError, match=r'test/a/wide\.png is 6x4 pixels but '
                     r'.*train/a/x\.png is 3x4'):
    sources.load_image_folder(folder, cache_dir=tmp_path / 'c')


def test_image_folder_undecodable_file(tmp_path):
  folder = make_image_folder(tmp_path / 'small', SMALL_LAYOUT)
  (folder / 'train' / 'b' / 'broken.jpg').write_bytes(b'\xff\xd8 not a jpeg')
  with pytest.raises(DataError, match=r'cannot decode .*train/b/broken\.jpg'):
    sources.load_image_folder(folder, cache_dir=tmp_path / 'c')


def test_image_folder_wrong_layout(tmp_path):
  save_image(tmp_path / 'flat' / 'cat' / '0.png', pixels(0))
  save_image(tmp_path / 'flat' / 'dog' / '0.png', pixels(1))
  with pytest.raises(DataError, match='expected folders train/ and test/'):
    sources.load_image_folder(tmp_path / 'flat', cache_dir=tmp_path / 'c')
  save_image(tmp_path / 'onlytrain' / 'train' / 'cat' / '0.png', pixels(0))
  with pytest.raises(DataError, match='no test/ folder'):
    sources.load_image_folder(tmp_path / 'onlytrain',
                              cache_dir=tmp_path / 'c')


@pytest.mark.parametrize('suffix', ['.tar.gz', '.tar'])
def test_truncated_tarball(tmp_path, suffix):
  folder = make_image_folder(tmp_path / 'small', SMALL_LAYOUT)
  tarball = tar_folder(folder, tmp_path / f'small{suffix}', 'small')
  data = tarball.read_bytes()
  # Cut everywhere, member boundaries included: a stream cut there reads as
  # a shorter archive unless its end is checked.
  if suffix == '.tar':
    with tarfile.open(tarball) as tar:
      tar.getmembers()
      end = tar.offset  # The first zero block; zeros pad the file after it.
    cuts = range(512, end + 512, 512)
  else:
    cuts = range(97, len(data), 97)
  for cut in cuts:
    tarball.write_bytes(data[:cut])
    with pytest.raises(DataError, match='cannot read tarball'):
      sources.load_image_folder(tarball, cache_dir=tmp_path / 'c')
  tarball.write_bytes(data)
  sources.load_image_folder(tarball, cache_dir=tmp_path / 'c')


def test_missing_paths(tmp_path, monkeypatch):
  with pytest.raises(DataError, match='nowhere does not exist'):
    sources.load_image_folder(tmp_path / 'nowhere')
  with pytest.raises(DataError, match='idx folder .*nowhere for mnist does '
                     'not exist'):
    sources.load_idx(tmp_path / 'nowhere')

  # The default mnist path is relative to the current directory.
  monkeypatch.chdir(tmp_path)
  with pytest.raises(DataError, match=r'mnist data not found at '
                     r'\.\./shared/data/mnist .*run from the project root'):
    sources.load(data_config(source='idx', name='mnist'))

  missing = str(tmp_path / 'no-fashion')
  monkeypatch.setitem(sources._DEFAULT_PATHS, ('idx', 'fashion_mnist'),
                      missing)
  with pytest.raises(DataError) as e:
    sources.load(data_config(source='idx', name='fashion_mnist'))
  message = str(e.value)
  assert missing in message
  assert '`apt-get install dataset-fashion-mnist`' in message
  assert '--config.data.path' in message

  with pytest.raises(DataError, match='check --config.data.path'):
    sources.load(data_config(source='image_folder', name='cifar10',
                             path=str(tmp_path / 'gone.tar.gz')))


def test_unknown_source_and_name():
  with pytest.raises(DataError, match='unknown data source .csv.; set '
                     '--config.data.source to one of idx, image_folder, '
                     'tfds'):
    sources.load(data_config(source='csv'))
  with pytest.raises(DataError, match='unknown idx data set .kmnist.; set '
                     '--config.data.name to one of mnist, fashion_mnist'):
    sources.load(data_config(source='idx', name='kmnist'))
  with pytest.raises(DataError, match='no default path for image_folder '
                     'data set .imagenet. .only for cifar10.'):
    sources.load(data_config(source='image_folder', name='imagenet'))


def test_array_dataset_checks_its_fields():
  images = np.zeros((2, 3, 3, 1), np.uint8)
  labels = np.array([0, 1], np.int32)
  ds = sources.ArrayDataset('ok', images, labels, images, labels, ('a', 'b'))
  assert ds.num_classes == 2 and ds.image_shape == (3, 3, 1)
  assert 'ok' in repr(ds)
  with pytest.raises(DataError, match='convert them to int32'):
    sources.ArrayDataset('x', images, labels.astype(np.int64), images,
                         labels, ('a', 'b'))
  with pytest.raises(DataError, match='convert them to uint8'):
    sources.ArrayDataset('x', images[..., 0], labels, images, labels,
                         ('a', 'b'))
  with pytest.raises(DataError, match='label 1 at index 1 is outside'):
    sources.ArrayDataset('x', images, labels, images, labels, ('a',))
  with pytest.raises(DataError, match='one image shape'):
    sources.ArrayDataset('x', images, labels, images[:, :2], labels,
                         ('a', 'b'))


# ------------------------------------------------------------ normalization


def test_normalization_mnist(mnist):
  mean, std = sources.normalization(mnist.train_images)
  assert mean.dtype == std.dtype == np.float32
  assert mean.shape == std.shape == (1,)
  pixels01 = mnist.train_images.astype(np.float64) / 255
  np.testing.assert_allclose(mean, [pixels01.mean()], rtol=1e-6)
  np.testing.assert_allclose(std, [pixels01.std()], rtol=1e-6)
  # The constants everybody quotes for MNIST.
  np.testing.assert_allclose(mean, [0.1307], atol=5e-5)
  np.testing.assert_allclose(std, [0.3081], atol=5e-5)


def test_normalization_over_many_chunks():
  # 1000 images of 70x70x3 make 4 chunks, the last one partial.
  images = np.random.default_rng(3).integers(0, 256, (1000, 70, 70, 3),
                                             np.uint8)
  images[..., 2] //= 4  # channels must not mix
  mean, std = sources.normalization(images)
  flat = images.reshape(-1, 3).astype(np.float64) / 255
  np.testing.assert_allclose(mean, flat.mean(axis=0), rtol=1e-6)
  np.testing.assert_allclose(std, flat.std(axis=0), rtol=1e-6)


def test_normalization_constant_and_bad_input():
  mean, std = sources.normalization(np.full((3, 2, 2, 2), 51, np.uint8))
  np.testing.assert_array_equal(mean, np.float32(0.2))
  np.testing.assert_array_equal(std, [0.0, 0.0])
  with pytest.raises(DataError, match='uint8 images'):
    sources.normalization(np.zeros((2, 2, 2, 1), np.float32))
  with pytest.raises(DataError, match='non-empty'):
    sources.normalization(np.zeros((0, 2, 2, 1), np.uint8))


# ------------------------------------------------------------- fuzzing idx


VALID_IDX = [
    idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4)),
    idx_bytes(np.array([3, 1, 4, 1, 5], np.uint8)),
    idx_bytes(np.arange(-3, 3).reshape(2, 3), '>i2'),
    idx_bytes(np.linspace(-1, 1, 4), '>f8'),
]


@st.composite
def mutated_idx(draw):
  """A valid idx file, maybe gzipped, with a few random edits."""
  data = bytearray(draw(st.sampled_from(VALID_IDX)))
  if draw(st.booleans()):
    data = bytearray(gzip.compress(bytes(data)))
  for _ in range(draw(st.integers(1, 4))):
    edit = draw(st.sampled_from(['set', 'cut', 'insert', 'append']))
    at = draw(st.integers(0, max(0, len(data) - 1)))
    if edit == 'set' and data:
      data[at] = draw(st.integers(0, 255))
    elif edit == 'cut':
      del data[at:at + draw(st.integers(1, 16))]
    elif edit == 'insert':
      data[at:at] = draw(st.binary(min_size=1, max_size=8))
    else:
      data += draw(st.binary(min_size=1, max_size=8))
  return bytes(data)


@pytest.fixture(scope='module')
def fuzz_file(tmp_path_factory):
  return tmp_path_factory.mktemp('fuzz') / 'fuzz.idx'


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(data=st.one_of(st.binary(max_size=64), mutated_idx()))
def test_read_idx_fuzz(fuzz_file, data):
  fuzz_file.write_bytes(data)
  try:
    array = sources.read_idx(fuzz_file)
  except DataError:
    return
  # Whatever it accepts, the header and the payload must agree exactly.
  raw = gzip.decompress(data) if data[:2] == b'\x1f\x8b' else data
  assert isinstance(array, np.ndarray)
  assert raw[:2] == b'\0\0' and array.ndim == raw[3]
  assert 4 + 4 * array.ndim + array.nbytes == len(raw)


def _small_tarball_bytes() -> bytes:
  folder = pathlib.Path(tempfile.mkdtemp())
  made = make_image_folder(folder / 'small', SMALL_LAYOUT)
  return tar_folder(made, folder / 'small.tar.gz', 'small').read_bytes()


SMALL_TARBALL = _small_tarball_bytes()


@st.composite
def mutated_tarball(draw):
  """The small image-folder tarball, gzipped or not, with random edits."""
  data = SMALL_TARBALL
  if draw(st.booleans()):
    data = gzip.decompress(data)
  data = bytearray(data)
  for _ in range(draw(st.integers(1, 3))):
    at = draw(st.integers(0, len(data) - 1))
    edit = draw(st.sampled_from(['set', 'cut', 'insert']))
    if edit == 'set':
      data[at] = draw(st.integers(0, 255))
    elif edit == 'cut':
      del data[at:at + draw(st.integers(1, 600))]
    else:
      data[at:at] = draw(st.binary(min_size=1, max_size=64))
  return bytes(data)


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(data=st.one_of(st.binary(max_size=256), mutated_tarball()))
def test_image_folder_tarball_fuzz(tmp_path_factory, data):
  folder = tmp_path_factory.mktemp('tarfuzz')
  tarball = folder / 'fuzz.tar.gz'
  tarball.write_bytes(data)
  try:
    ds = sources.load_image_folder(tarball, cache_dir=folder / 'cache')
  except DataError:
    return
  # What it accepts is a well-formed data set.
  assert ds.train_images.dtype == np.uint8 and ds.train_images.ndim == 4
  assert len(ds.train_images) == len(ds.train_labels)
  assert ds.train_labels.max() < len(ds.class_names)


@hypothesis.settings(max_examples=100, deadline=None)
@hypothesis.given(data=st.binary(max_size=512))
def test_image_folder_random_image_bytes_fuzz(tmp_path_factory, data):
  folder = tmp_path_factory.mktemp('imgfuzz')
  save_image(folder / 'train' / 'a' / '0.png', pixels(0))
  save_image(folder / 'test' / 'a' / '0.png', pixels(1))
  (folder / 'train' / 'a' / '1.png').write_bytes(data)
  with pytest.raises(DataError):
    sources.load_image_folder(folder, cache_dir=folder / 'cache')


# ---------------------------------------------------------------- tfds


def fake_tfds_load(calls, train, test, names=('cat', 'dog', 'eel')):
  def load(name, **kwargs):
    calls.append((name, kwargs))
    info = types.SimpleNamespace(
        supervised_keys=('image', 'label'),
        features={'label': types.SimpleNamespace(names=list(names))})
    return (train, test), info
  return load


def test_load_tfds_converts_the_arrays(tmp_path, monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  train_x = pixels(0, (5, 4, 4, 3))
  train_y = np.array([0, 2, 1, 1, 0], np.int64)
  test_x = pixels(1, (2, 4, 4, 3))
  test_y = np.array([2, 2], np.int64)
  calls = []
  monkeypatch.setattr(tfds, 'load', fake_tfds_load(
      calls, (train_x, train_y), (test_x, test_y)))

  ds = sources.load_tfds('fake', data_dir=tmp_path)
  assert calls == [('fake', dict(split=['train', 'test'], data_dir=tmp_path,
                                 batch_size=-1, as_supervised=True,
                                 with_info=True, download=True))]
  assert ds.name == 'fake' and ds.class_names == ('cat', 'dog', 'eel')
  assert ds.train_labels.dtype == np.int32
  np.testing.assert_array_equal(ds.train_images, train_x)
  np.testing.assert_array_equal(ds.train_labels, train_y)
  np.testing.assert_array_equal(ds.test_images, test_x)
  np.testing.assert_array_equal(ds.test_labels, test_y)

  # Through the config, with a grayscale set that lacks a channel axis.
  gray = pixels(2, (5, 4, 4))
  monkeypatch.setattr(tfds, 'load', fake_tfds_load(
      calls, (gray, train_y), (gray[:2], test_y)))
  ds = sources.load(data_config(source='tfds', name='fake_gray',
                                tfds_data_dir='/data/tfds'))
  assert calls[-1][1]['data_dir'] == '/data/tfds'
  assert ds.image_shape == (4, 4, 1)
  np.testing.assert_array_equal(ds.train_images[..., 0], gray)


def test_load_tfds_rejects_bad_labels(monkeypatch):
  tfds = pytest.importorskip('tensorflow_datasets')
  images = pixels(0, (2, 4, 4, 3))
  monkeypatch.setattr(tfds, 'load', fake_tfds_load(
      [], (images, np.array([0, 3])), (images, np.array([0, 1]))))
  with pytest.raises(DataError, match='label 3 at index 1 is outside'):
    sources.load_tfds('fake')


def test_load_tfds_without_data(tmp_path):
  pytest.importorskip('tensorflow_datasets')
  with pytest.raises(DataError) as e:
    sources.load_tfds('mnist', data_dir=tmp_path, download=False)
  message = str(e.value)
  assert "'mnist'" in message and str(tmp_path) in message
  assert '`tfds build mnist --data_dir=DIR`' in message
  assert '--config.data.tfds_data_dir' in message

  with pytest.raises(DataError, match='has no data set .no_such_set_xyz.'):
    sources.load_tfds('no_such_set_xyz', data_dir=tmp_path, download=False)
