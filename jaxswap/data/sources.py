"""Data sets on disk, read into memory as uint8 image arrays.

Three kinds of source give the same `ArrayDataset`:

* idx files, the format of MNIST and Fashion-MNIST (`load_idx`);
* an image folder `split/class/file`, or a tarball of one, such as the
  JPEG copy of CIFAR-10 (`load_image_folder`), decoded once and cached;
* tensorflow-datasets by name (`load_tfds`).

`load` picks one from the `data` part of the config, and `normalization`
gives the per-channel mean and standard deviation of the training images.
Every problem with the data raises `DataError` with the path and the fix.
"""

import bz2
import concurrent.futures
import dataclasses
import gzip
import hashlib
import io
import lzma
import math
import multiprocessing
import os
import pathlib
import re
import struct
import tarfile
import tempfile
import time
from typing import Any
import zipfile
import zlib

from absl import logging
import numpy as np
from PIL import Image

from jaxswap.data.errors import DataError

PathLike = str | os.PathLike

SPLITS = ('train', 'test')

CLASS_NAMES = {
    'mnist': tuple('0123456789'),
    'fashion_mnist': ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                      'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot'),
}

# idx type codes (third byte of the magic number); multi-byte types are
# stored big-endian.
_IDX_DTYPES = {
    0x08: np.dtype('u1'),
    0x09: np.dtype('i1'),
    0x0B: np.dtype('>i2'),
    0x0C: np.dtype('>i4'),
    0x0D: np.dtype('>f4'),
    0x0E: np.dtype('>f8'),
}

# split -> (images, labels) file names, without the optional '.gz'.
_IDX_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}

# Where `load` looks when config.path is None. Relative paths are taken
# from the current directory, which is meant to be the project root.
_DEFAULT_PATHS = {
    ('idx', 'mnist'): '../shared/data/mnist',
    ('idx', 'fashion_mnist'): '/usr/share/datasets/fashion-mnist',
    ('image_folder', 'cifar10'): '../shared/data/cifar10-jpeg.tar.gz',
}

_MISSING_PATH_FIXES = {
    ('idx', 'mnist'): 'run from the project root so that ../shared/data/mnist '
                      'exists, or set --config.data.path to a folder with '
                      'the four MNIST idx files',
    ('idx', 'fashion_mnist'): 'install it with `apt-get install '
                              'dataset-fashion-mnist`, or set '
                              '--config.data.path to a folder with the four '
                              'Fashion-MNIST idx files',
    ('image_folder', 'cifar10'): 'run from the project root so that '
                                 '../shared/data/cifar10-jpeg.tar.gz exists, '
                                 'or set --config.data.path to it',
}

_SOURCES = ('idx', 'image_folder', 'tfds')

_GRAY_MODES = ('1', 'L', 'LA')
_DECODE_CHUNK = 1000  # images per task sent to a decoding process
_CACHE_VERSION = 1  # bump when the cache layout or the decoding changes


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class ArrayDataset:
  """An image classification data set held in memory.

  Equality is identity: comparing the arrays element-wise belongs to the
  caller (`np.array_equal`), not to `==` on the whole data set.

  Attributes:
    name: what the data set is called in logs and configs.
    train_images: uint8, (N, H, W, C).
    train_labels: int32, (N,), in [0, num_classes).
    test_images: uint8, (M, H, W, C).
    test_labels: int32, (M,), in [0, num_classes).
    class_names: one name per label, label i naming class_names[i].
  """
  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  class_names: tuple[str, ...]

  def __post_init__(self):
    num_classes = len(self.class_names)
    for split in SPLITS:
      images = getattr(self, f'{split}_images')
      labels = getattr(self, f'{split}_labels')
      if images.dtype != np.uint8 or images.ndim != 4:
        raise DataError(
            f'{self.name}: {split}_images are {images.dtype} of shape '
            f'{images.shape}; convert them to uint8 (N, H, W, C)')
      if labels.dtype != np.int32 or labels.ndim != 1:
        raise DataError(
            f'{self.name}: {split}_labels are {labels.dtype} of shape '
            f'{labels.shape}; convert them to int32 (N,)')
      if len(images) != len(labels):
        raise DataError(
            f'{self.name}: {len(images)} {split} images but {len(labels)} '
            f'labels; give one label per image')
      _check_label_range(labels, num_classes, f'{self.name} {split}_labels')
    if self.test_images.shape[1:] != self.train_images.shape[1:]:
      raise DataError(
          f'{self.name}: test images are {self.test_images.shape[1:]} but '
          f'train images {self.train_images.shape[1:]}; both splits need '
          f'one image shape')

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train_images.shape[1:])

  def __repr__(self):
    return (f'ArrayDataset(name={self.name!r}, '
            f'train={len(self.train_images)}, test={len(self.test_images)}, '
            f'image_shape={self.image_shape}, '
            f'num_classes={self.num_classes})')


def _check_label_range(labels: np.ndarray, num_classes: int, where: str):
  bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
  if bad.size:
    raise DataError(
        f'{where}: label {labels[bad[0]]} at index {bad[0]} is outside '
        f'[0, {num_classes}) ({bad.size} such labels); the labels are '
        f'corrupt or belong to another data set')


# ---------------------------------------------------------------- idx files


def _read_bytes(path: str) -> bytes:
  """Returns the contents of `path`, gunzipped if it starts as gzip does."""
  try:
    with open(path, 'rb') as f:
      raw = f.read()
  except OSError as e:
    raise DataError(f'cannot read {path}: {e.strerror}; check the path and '
                    f'its permissions') from e
  if raw[:2] != b'\x1f\x8b':
    return raw
  try:
    return gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(f'{path}: broken gzip data ({e}); the file is truncated '
                    f'or corrupt, download it again') from e


def read_idx(path: PathLike) -> np.ndarray:
  """Reads an idx file, gzipped or raw, into an array.

  The idx format: two zero bytes, a type code byte, a byte with the number
  of dimensions, that many big-endian uint32 sizes, then the values in C
  order, big-endian.

  Args:
    path: the file. Gzip is recognised by its leading bytes, not by name.

  Returns:
    The values, in native byte order, of the shape the header gives.

  Raises:
    DataError: the file is unreadable, its magic number is not idx, or the
      payload is not exactly the size the header implies.
  """
  path = os.fspath(path)
  raw = _read_bytes(path)
  if len(raw) < 4:
    raise DataError(f'{path}: {len(raw)} bytes, too short for the 4-byte idx '
                    f'magic number; the file is truncated or not idx')
  code, ndim = raw[2], raw[3]
  if raw[:2] != b'\0\0' or code not in _IDX_DTYPES or ndim == 0:
    codes = ', '.join(f'0x{c:02X}' for c in _IDX_DTYPES)
    raise DataError(f'{path}: magic number 0x{raw[:4].hex()} is not idx '
                    f'(0x0000, a type code in {codes}, then at least one '
                    f'dimension); check that this is an idx file')
  header_size = 4 + 4 * ndim
  if len(raw) < header_size:
    raise DataError(f'{path}: header of {ndim} dimensions needs '
                    f'{header_size} bytes but the file has {len(raw)}; the '
                    f'file is truncated, download it again')
  shape = struct.unpack(f'>{ndim}I', raw[4:header_size])
  dtype = _IDX_DTYPES[code]
  count = math.prod(shape)
  expected = count * dtype.itemsize
  actual = len(raw) - header_size
  if actual != expected:
    what = 'truncated' if actual < expected else 'followed by extra bytes'
    raise DataError(f'{path}: a {dtype.name} array of shape {shape} needs '
                    f'{expected} payload bytes but the file has {actual}; '
                    f'the file is {what}, download it again')
  values = np.frombuffer(raw, dtype, count=count, offset=header_size)
  try:
    values = values.reshape(shape)
  except ValueError as e:  # a zero dimension beside huge ones, or > 64 dims
    raise DataError(f'{path}: the header\'s shape {shape} is not a valid '
                    f'array shape ({e}); the header is corrupt') from e
  # astype copies, which also makes the result writable.
  return values.astype(dtype.newbyteorder('='))


def _find_idx_file(data_dir: str, base: str) -> str:
  for candidate in (base + '.gz', base):
    path = os.path.join(data_dir, candidate)
    if os.path.isfile(path):
      return path
  expected = ', '.join(f'{b}[.gz]' for pair in _IDX_FILES.values()
                       for b in pair)
  raise DataError(f'{data_dir}: neither {base}.gz nor {base} is there; the '
                  f'folder needs the four idx files {expected}')


def _read_idx_split(data_dir: str, split: str,
                    num_classes: int | None) -> tuple[np.ndarray, np.ndarray]:
  """Reads and checks one split's images (with a channel axis) and labels."""
  images_path, labels_path = (_find_idx_file(data_dir, base)
                              for base in _IDX_FILES[split])
  images = read_idx(images_path)
  labels = read_idx(labels_path)
  if images.dtype != np.uint8 or images.ndim not in (3, 4):
    raise DataError(f'{images_path}: holds {images.dtype} of shape '
                    f'{images.shape}, not uint8 images (N, H, W); check that '
                    f'the file names are not swapped')
  if labels.dtype.kind not in 'iu' or labels.ndim != 1:
    raise DataError(f'{labels_path}: holds {labels.dtype} of shape '
                    f'{labels.shape}, not integer labels (N,); check that '
                    f'the file names are not swapped')
  if len(images) != len(labels):
    raise DataError(f'{images_path} has {len(images)} images but '
                    f'{labels_path} has {len(labels)} labels; the files come '
                    f'from different releases, download both again')
  if num_classes is not None:
    _check_label_range(labels, num_classes, labels_path)
  if images.ndim == 3:
    images = images[..., None]
  return images, labels.astype(np.int32)


def load_idx(data_dir: PathLike, name: str = 'mnist') -> ArrayDataset:
  """Loads the four standard idx files of MNIST or a data set like it.

  Args:
    data_dir: folder with train-images-idx3-ubyte, train-labels-idx1-ubyte,
      t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte, each optionally
      gzipped ('.gz').
    name: 'mnist' or 'fashion_mnist' give the classes their names; any
      other name numbers them '0', '1', ... up to the largest train label.

  Returns:
    The data set, images (N, H, W, 1).

  Raises:
    DataError: a file is missing or malformed, the counts of images and
      labels differ, or a label is out of range.
  """
  data_dir = os.fspath(data_dir)
  if not os.path.isdir(data_dir):
    raise DataError(f'idx folder {data_dir} for {name} does not exist; give '
                    f'the folder that holds its four idx files')
  class_names = CLASS_NAMES.get(name)
  num_classes = None if class_names is None else len(class_names)
  train_images, train_labels = _read_idx_split(data_dir, 'train', num_classes)
  if class_names is None:
    if train_labels.size and train_labels.min() < 0:
      raise DataError(f'{data_dir}: negative train label '
                      f'{train_labels.min()}; labels must count from 0')
    top = int(train_labels.max()) + 1 if train_labels.size else 0
    class_names = tuple(str(i) for i in range(top))
  test_images, test_labels = _read_idx_split(data_dir, 'test',
                                             len(class_names))
  return ArrayDataset(name, train_images, train_labels, test_images,
                      test_labels, class_names)


# ------------------------------------------------------------ image folders


@dataclasses.dataclass
class _Folder:
  """The file tree of an image folder, as relative path parts.

  Attributes:
    files: parts -> file contents (bytes, from a tarball) or file path.
    dirs: parts of every folder seen, including empty ones.
    source: the folder or tarball, for messages.
    in_tarball: whether the parts name tarball members.
  """
  files: dict[tuple[str, ...], bytes | str]
  dirs: set[tuple[str, ...]]
  source: str
  in_tarball: bool

  def describe(self, parts: tuple[str, ...]) -> str:
    if self.in_tarball:
      return f'{"/".join(parts)} in {self.source}'
    return os.path.join(self.source, *parts)


def _skipped(parts: tuple[str, ...]) -> bool:
  # Hidden files and macOS resource forks are never images of the set.
  return any(p.startswith('.') or p == '__MACOSX' for p in parts)


def _scan_directory(path: str) -> _Folder:
  folder = _Folder({}, set(), path, in_tarball=False)
  for dirpath, dirnames, filenames in os.walk(path):
    rel = pathlib.PurePath(os.path.relpath(dirpath, path)).parts
    rel = tuple(p for p in rel if p != '.')
    if _skipped(rel):
      dirnames.clear()
      continue
    folder.dirs.update(rel + (d,) for d in dirnames if not _skipped((d,)))
    for filename in filenames:
      if not _skipped((filename,)):
        folder.files[rel + (filename,)] = os.path.join(dirpath, filename)
  return folder


_COMPRESSED = ((b'\x1f\x8b', gzip.open), (b'BZh', bz2.open),
               (b'\xfd7zXZ\x00', lzma.open))


def _scan_tarball(path: str) -> _Folder:
  """Reads every file of a tarball into memory, in one sequential pass.

  `tarfile` takes a stream that ends early at a member boundary for a
  complete archive, so the end is checked here: a compressed stream must
  reach its end-of-stream marker (and checksum), a plain tar its zero block.
  """
  folder = _Folder({}, set(), path, in_tarball=True)
  try:
    with open(path, 'rb') as raw:
      magic = raw.read(6)
      raw.seek(0)
      opener = next((o for m, o in _COMPRESSED if magic.startswith(m)), None)
      stream = opener(raw, 'rb') if opener else raw
      # Stream mode: a compressed file cannot seek cheaply, and we read it all.
      with tarfile.open(fileobj=stream, mode='r|') as tar:
        for member in tar:
          parts = pathlib.PurePosixPath(member.name).parts
          parts = tuple(p for p in parts if p not in ('.', '/'))
          if not parts or _skipped(parts):
            continue
          if member.isdir():
            folder.dirs.add(parts)
          elif member.isfile():
            folder.files[parts] = tar.extractfile(member).read()
          else:
            raise DataError(f'{member.name} in {path} is a link or device, '
                            f'not a file; pack the images as plain files')
        end = tar.offset
      if opener:
        while stream.read(1 << 20):  # EOFError if the stream is cut short.
          pass
      else:
        raw.seek(end)
        if raw.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
          raise EOFError('no end-of-archive block')
  except (tarfile.TarError, OSError, EOFError, zlib.error,
          lzma.LZMAError) as e:
    raise DataError(f'cannot read tarball {path} ({e}); it is truncated or '
                    f'corrupt, download it again') from e
  return folder


def _root(folder: _Folder) -> tuple[str, ...]:
  """Finds the folder holding train/ and test/: the top or one level down."""
  entries = list(folder.files) + list(folder.dirs)
  top = {parts[0] for parts in entries}
  if 'train' in top:
    return ()
  if len(top) == 1:
    (only,) = top
    if any(parts[:2] == (only, 'train') for parts in entries):
      return (only,)
  found = ', '.join(sorted(top)[:5]) or 'nothing'
  raise DataError(f'{folder.source}: expected folders train/ and test/ at '
                  f'the top or inside one top-level folder, found {found}; '
                  f'lay the images out as split/class/file')


def _index_image_folder(folder: _Folder) -> tuple[
    tuple[str, ...], dict[str, list[tuple[str, Any, int]]]]:
  """Orders the images and gives their labels.

  Args:
    folder: the scanned tree.

  Returns:
    The class names (sorted train class folders) and, per split, a list of
    (description, contents or path, label), sorted by class then file name.
  """
  root = _root(folder)
  n = len(root)
  classes = {split: {} for split in SPLITS}  # split -> class -> [parts]
  for parts in folder.dirs:
    if parts[:n] == root and len(parts) == n + 2 and parts[n] in classes:
      classes[parts[n]].setdefault(parts[n + 1], [])
  ignored = 0
  for parts in folder.files:
    rel = parts[n:]
    if parts[:n] != root or not rel or rel[0] not in classes:
      ignored += 1  # a README, or a split we do not use, such as 'valid'
      continue
    if len(rel) != 3:
      raise DataError(f'{folder.describe(parts)} is not at split/class/file; '
                      f'move it into a class folder or remove it')
    classes[rel[0]].setdefault(rel[1], []).append(parts)
  if ignored:
    logging.warning('%s: ignored %d files outside train/ and test/.',
                    folder.source, ignored)

  for split in SPLITS:
    if not classes[split]:
      raise DataError(f'{folder.source}: no {split}/ folder with class '
                      f'folders in it; both train/ and test/ are needed')
    for name, members in sorted(classes[split].items()):
      if not members:
        where = folder.describe(root + (split, name))
        raise DataError(f'class folder {where} is empty; add its images or '
                        f'remove the folder')
  class_names = tuple(sorted(classes['train']))
  unknown = sorted(set(classes['test']) - set(class_names))
  if unknown:
    raise DataError(f'{folder.source}: test classes {unknown} have no train '
                    f'folder; add train/{unknown[0]}/ or remove the test '
                    f'folder')

  items = {}
  for split in SPLITS:
    items[split] = [
        (folder.describe(parts), folder.files[parts], label)
        for label, name in enumerate(class_names)
        for parts in sorted(classes[split].get(name, []))]
  return class_names, items


def _decode_image(description: str, contents: bytes | str) -> np.ndarray:
  """Decodes to (H, W) if the image is grayscale, else (H, W, 3) RGB."""
  try:
    source = io.BytesIO(contents) if isinstance(contents, bytes) else contents
    with Image.open(source) as image:
      mode = 'L' if image.mode in _GRAY_MODES else 'RGB'
      return np.asarray(image if image.mode == mode else image.convert(mode))
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(f'cannot decode {description} ({e}); replace or remove '
                    f'the file') from e


def _size_error(description: str, image: np.ndarray, first: str,
                first_hw: tuple[int, int]) -> DataError:
  h, w = image.shape[:2]
  return DataError(f'{description} is {w}x{h} pixels but {first} is '
                   f'{first_hw[1]}x{first_hw[0]}; resize the images to one '
                   f'size')


def _decode_chunk(items: list[tuple[str, bytes | str]], first: str,
                  first_hw: tuple[int, int]) -> np.ndarray:
  """Decodes images of one size: (n, H, W) if all are grayscale, else RGB."""
  images = []
  for description, contents in items:
    image = _decode_image(description, contents)
    if image.shape[:2] != first_hw:
      raise _size_error(description, image, first, first_hw)
    images.append(image)
  if all(image.ndim == 2 for image in images):
    return np.stack(images)
  return np.stack([_gray_to_rgb(image) if image.ndim == 2 else image
                   for image in images])


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
  """Repeats the gray level in R, G and B, as Pillow's 'L' to 'RGB' does."""
  return np.repeat(gray[..., None], 3, axis=-1)


def _num_cpus() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def _decode_in_processes(chunks, first: str, first_hw: tuple[int, int],
                         workers: int) -> list[np.ndarray]:
  """Runs `_decode_chunk` over `chunks` in `workers` processes, in order."""
  # Not 'fork': the parent may run JAX's threads, and forking them can
  # deadlock. The workers re-import the main script, hence the need for a
  # `if __name__ == '__main__'` guard there.
  methods = multiprocessing.get_all_start_methods()
  context = multiprocessing.get_context(
      'forkserver' if 'forkserver' in methods else 'spawn')
  with concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=context) as pool:
    futures = [pool.submit(_decode_chunk, chunk, first, first_hw)
               for chunk in chunks]
    try:
      return [future.result() for future in futures]
    except BaseException:
      pool.shutdown(wait=False, cancel_futures=True)
      raise


def _decode_images(items: list[tuple[str, bytes | str]]) -> np.ndarray:
  """Decodes all images to (N, H, W, 1) grayscale or (N, H, W, 3) RGB.

  Uses one process per CPU: Pillow holds the GIL while it parses the small
  files, so threads run no faster than one core.

  Args:
    items: (description, contents or path) per image, in output order.

  Returns:
    The images, uint8.
  """
  first, first_contents = items[0]
  first_hw = _decode_image(first, first_contents).shape[:2]
  chunks = [items[i:i + _DECODE_CHUNK]
            for i in range(0, len(items), _DECODE_CHUNK)]
  workers = min(_num_cpus(), len(chunks))
  decoded = None
  if workers > 1:
    try:
      decoded = _decode_in_processes(chunks, first, first_hw, workers)
    except concurrent.futures.process.BrokenProcessPool as e:
      # The workers import the main script: one read from stdin cannot be,
      # and one without a __main__ guard starts workers of its own.
      logging.warning('Decoding processes died (%s); decoding in this '
                      'process instead, which is slower. Guard the main '
                      "script with `if __name__ == '__main__':` to decode in "
                      'parallel.', e)
  if decoded is None:
    decoded = [_decode_chunk(chunk, first, first_hw) for chunk in chunks]
  if all(chunk.ndim == 3 for chunk in decoded):
    return np.concatenate(decoded)[..., None]
  return np.concatenate([_gray_to_rgb(chunk) if chunk.ndim == 3 else chunk
                         for chunk in decoded])


def _default_cache_dir() -> str:
  return os.environ.get('JAXSWAP_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'jaxswap')


def _fingerprint(path: str) -> str:
  """Identifies a source's contents by its path, size and mtime.

  For a folder the size is the sum over its files and the mtime the
  newest of its files' and folders' (folders change on a rename).

  Args:
    path: an absolute path to a tarball or folder.

  Returns:
    A string that changes when the source does.
  """
  stat = os.stat(path)
  if not os.path.isdir(path):
    return f'{path}|{stat.st_size}|{stat.st_mtime_ns}|v{_CACHE_VERSION}'
  count, size, mtime = 0, 0, stat.st_mtime_ns
  for dirpath, dirnames, filenames in os.walk(path):
    for entries, is_file in ((dirnames, False), (filenames, True)):
      for entry in entries:
        entry_stat = os.stat(os.path.join(dirpath, entry))
        count += 1
        size += entry_stat.st_size if is_file else 0
        mtime = max(mtime, entry_stat.st_mtime_ns)
  return f'{path}|{count}|{size}|{mtime}|v{_CACHE_VERSION}'


def _cache_path(cache_dir: str, source: str, fingerprint: str) -> str:
  stem = re.sub(r'[^A-Za-z0-9_.-]+', '_', os.path.basename(source))
  digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
  return os.path.join(cache_dir, f'{stem}-{digest}.npz')


def _read_cache(cache_file: str, fingerprint: str,
                name: str) -> ArrayDataset | None:
  try:
    with np.load(cache_file, allow_pickle=False) as npz:
      if str(npz['fingerprint']) != fingerprint:
        return None  # a digest collision, or an older layout
      return ArrayDataset(
          name=name,
          train_images=npz['train_images'],
          train_labels=npz['train_labels'],
          test_images=npz['test_images'],
          test_labels=npz['test_labels'],
          class_names=tuple(str(c) for c in npz['class_names']))
  except FileNotFoundError:
    return None
  except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as e:
    logging.warning('Ignoring unreadable cache %s (%s); decoding again.',
                    cache_file, e)
    return None


def _write_cache(cache_file: str, fingerprint: str, ds: ArrayDataset):
  """Writes the cache atomically, so readers never see half a file."""
  cache_dir = os.path.dirname(cache_file)
  tmp = None
  try:
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix='.tmp',
                               prefix='.' + os.path.basename(cache_file))
    with os.fdopen(fd, 'wb') as f:
      # Uncompressed: zlib shrinks decoded CIFAR-10 by under 10% but makes
      # each load about 9x slower.
      np.savez(f, fingerprint=np.array(fingerprint),
               train_images=ds.train_images, train_labels=ds.train_labels,
               test_images=ds.test_images, test_labels=ds.test_labels,
               class_names=np.array(ds.class_names))
    os.chmod(tmp, 0o644)
    os.replace(tmp, cache_file)
  except OSError as e:
    # The decoded data is still good; only the next load pays again.
    logging.warning('Could not write the cache %s (%s); set cache_dir or '
                    '$JAXSWAP_CACHE to a writable folder.', cache_file, e)
  finally:
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)


def _strip_archive_suffix(filename: str) -> str:
  for suffix in ('.tar.gz', '.tgz', '.tar'):
    if filename.endswith(suffix):
      return filename[:-len(suffix)]
  return filename


def load_image_folder(path: PathLike, cache_dir: PathLike | None = None,
                      name: str | None = None) -> ArrayDataset:
  """Loads images laid out as split/class/file, decoding them once.

  Labels number the train class folders in sorted order; images are in
  class order, then file-name order. Images decode to RGB, or to one gray
  channel when every image is grayscale. The arrays are cached as an .npz
  keyed by the source's path, size and mtime; later loads read that.

  Decoding runs in worker processes, so a script that calls this at import
  time must guard its entry point with `if __name__ == '__main__'`.

  Args:
    path: a folder with train/ and test/ (at its top or inside its one
      top-level folder), or a .tar.gz, .tgz or .tar of such a folder.
    cache_dir: where the .npz goes; defaults to $JAXSWAP_CACHE, else
      ~/.cache/jaxswap.
    name: the data set's name; defaults to the file name of `path` less
      its archive suffix.

  Returns:
    The data set, images (N, H, W, 3) or (N, H, W, 1), uint8.

  Raises:
    DataError: the path is missing, the layout is wrong, a class folder is
      empty, a test class has no train folder, an image does not decode, or
      images differ in size.
  """
  path = os.path.abspath(os.fspath(path))
  if name is None:
    name = _strip_archive_suffix(os.path.basename(path.rstrip(os.sep)))
  if not os.path.exists(path):
    raise DataError(f'image folder or tarball {path} does not exist; check '
                    f'the path')
  cache_dir = os.fspath(cache_dir) if cache_dir else _default_cache_dir()

  fingerprint = _fingerprint(path)
  cache_file = _cache_path(cache_dir, path, fingerprint)
  start = time.perf_counter()
  ds = _read_cache(cache_file, fingerprint, name)
  if ds is not None:
    logging.info('Read %s from the cache %s in %.2f s.', name, cache_file,
                 time.perf_counter() - start)
    return ds

  logging.info('Decoding %s from %s once; later loads use %s.', name, path,
               cache_file)
  is_dir = os.path.isdir(path)
  folder = _scan_directory(path) if is_dir else _scan_tarball(path)
  class_names, items = _index_image_folder(folder)
  everything = [(d, c) for split in SPLITS for d, c, _ in items[split]]
  images = _decode_images(everything)
  num_train = len(items['train'])
  labels = {split: np.array([label for _, _, label in items[split]],
                            np.int32) for split in SPLITS}
  ds = ArrayDataset(name, images[:num_train], labels['train'],
                    images[num_train:], labels['test'], class_names)
  seconds = time.perf_counter() - start
  logging.info('Decoded %d images of %s in %.1f s (%.0f images/s).',
               len(images), ds.image_shape, seconds, len(images) / seconds)
  _write_cache(cache_file, fingerprint, ds)
  return ds


# ------------------------------------------------------ tensorflow-datasets


def load_tfds(name: str, data_dir: PathLike | None = None, *,
              download: bool = True) -> ArrayDataset:
  """Loads the train and test splits of a tensorflow-datasets data set.

  Args:
    name: a tfds name with image and label features, such as 'cifar10',
      'cifar100', 'mnist' or 'fashion_mnist'.
    data_dir: tfds's data folder; None means $TFDS_DATA_DIR, else
      ~/tensorflow_datasets.
    download: whether tfds may download and prepare missing data.

  Returns:
    The data set, with tfds's class names.

  Raises:
    DataError: tfds has no such data set, or its data is not in `data_dir`
      and could not be downloaded.
  """
  # tensorflow_datasets pulls in TensorFlow, seconds of import; only this
  # source needs it.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  where = (os.fspath(data_dir) if data_dir is not None
           else 'the default ($TFDS_DATA_DIR or ~/tensorflow_datasets)')
  try:
    (train, test), info = tfds.load(
        name, split=list(SPLITS), data_dir=data_dir, batch_size=-1,
        as_supervised=True, with_info=True, download=download)
  except tfds.core.DatasetNotFoundError as e:
    raise DataError(f'tensorflow-datasets has no data set {name!r}; use one '
                    f'of tfds.list_builders(), such as cifar10, cifar100, '
                    f'mnist or fashion_mnist') from e
  # tfds signals missing prepared data with an AssertionError, and a failed
  # download with DownloadError or an OSError (no network).
  except (AssertionError, OSError, tfds.download.DownloadError) as e:
    why = type(e).__name__ if download else 'download=False'
    raise DataError(
        f'tfds data set {name!r} is not in data_dir {where} and could not '
        f'be downloaded ({why}); on a machine with network run `tfds build '
        f'{name} --data_dir=DIR`, copy DIR here and pass it as data_dir '
        f'(--config.data.tfds_data_dir)') from e

  label_key = (info.supervised_keys or (None, 'label'))[1]
  class_names = getattr(info.features[label_key], 'names', None)
  if not class_names:
    raise DataError(f'tfds data set {name!r}: its label {label_key!r} is '
                    f'not a class label; use an image classification set')
  arrays = {}
  for split, (images, labels) in zip(SPLITS, (train, test)):
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim == 3:
      images = images[..., None]
    if images.dtype != np.uint8 or images.ndim != 4:
      raise DataError(f'tfds data set {name!r}: {split} images are '
                      f'{images.dtype} of shape {images.shape}, not uint8 '
                      f'(N, H, W, C); use a data set of encoded images')
    _check_label_range(labels, len(class_names), f'tfds {name} {split}')
    arrays[split] = images, labels.astype(np.int32)
  return ArrayDataset(name, *arrays['train'], *arrays['test'],
                      tuple(class_names))


# ------------------------------------------------------------------ config


def load(config) -> ArrayDataset:
  """Loads the data set that the `data` part of a config names.

  Args:
    config: a ConfigDict (or dict) with `source` ('idx', 'image_folder' or
      'tfds'), `name`, and optionally `path`, `cache_dir` and
      `tfds_data_dir`. A None `path` means the default place for the name:
      idx mnist at ../shared/data/mnist and image_folder cifar10 at
      ../shared/data/cifar10-jpeg.tar.gz (both relative to the current
      directory), idx fashion_mnist at /usr/share/datasets/fashion-mnist.

  Returns:
    The data set.

  Raises:
    DataError: the source or name is unknown, the path is missing, or the
      loader found the data bad.
  """
  source, name = config.get('source'), config.get('name')
  if source not in _SOURCES:
    raise DataError(f'unknown data source {source!r}; set '
                    f'--config.data.source to one of {", ".join(_SOURCES)}')
  if not isinstance(name, str) or not name:
    raise DataError(f'data name {name!r} is not a name; set '
                    f'--config.data.name, e.g. to fashion_mnist')
  if source == 'tfds':
    return load_tfds(name, data_dir=config.get('tfds_data_dir'))
  if source == 'idx' and name not in CLASS_NAMES:
    raise DataError(f'unknown idx data set {name!r}; set --config.data.name '
                    f'to one of {", ".join(CLASS_NAMES)}')

  path = config.get('path') or _DEFAULT_PATHS.get((source, name))
  if path is None:
    known = ', '.join(n for s, n in _DEFAULT_PATHS if s == source)
    raise DataError(f'no default path for {source} data set {name!r} (only '
                    f'for {known}); set --config.data.path')
  if not os.path.exists(path):
    fix = _MISSING_PATH_FIXES.get((source, name), 'set --config.data.path')
    if config.get('path'):
      fix = 'check --config.data.path'
    raise DataError(f'{name} data not found at {path} '
                    f'({os.path.abspath(path)}); {fix}')
  if source == 'idx':
    return load_idx(path, name)
  return load_image_folder(path, cache_dir=config.get('cache_dir'),
                           name=name)


# ----------------------------------------------------------- normalization


def normalization(images_uint8: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and standard deviation, in [0, 1] pixel units.

  Counts how often each of the 256 levels occurs per channel, a chunk of
  images at a time, so no float copy of the set is ever made. The sums of
  levels and squared levels follow exactly from the counts (as integers);
  mean and variance are then divided out once in float64.

  Args:
    images_uint8: uint8 (N, H, W, C), usually the training split.

  Returns:
    (mean, std), each float32 of shape (C,); std is the population one.

  Raises:
    DataError: the images are not uint8 (N, H, W, C) or are empty.
  """
  images = np.asarray(images_uint8)
  if images.dtype != np.uint8 or images.ndim != 4 or images.size == 0:
    raise DataError(f'normalization needs non-empty uint8 images (N, H, W, '
                    f'C), got {images.dtype} of shape {images.shape}')
  channels = images.shape[-1]
  step = max(1, (1 << 22) // math.prod(images.shape[1:]))  # ~4M pixels
  counts = np.zeros((channels, 256), np.int64)
  for start in range(0, len(images), step):
    chunk = images[start:start + step].reshape(-1, channels)
    for c in range(channels):
      counts[c] += np.bincount(chunk[:, c], minlength=256)
  mean, std = [], []
  for histogram in counts.tolist():
    n = sum(histogram)
    total = sum(k * level for level, k in enumerate(histogram))
    total_sq = sum(k * level * level for level, k in enumerate(histogram))
    # n**2 * variance = n * total_sq - total**2, exact in integers.
    mean.append(total / n / 255)
    std.append(math.sqrt((n * total_sq - total * total) / (n * n)) / 255)
  return np.array(mean, np.float32), np.array(std, np.float32)
