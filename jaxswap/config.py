"""The configuration schema of a run, and its validation.

Every config file in `configs/` starts from `base_config()` and edits it, so
that a reader can diff two experiments and so that a misspelt key (in a file
or on the command line) is caught before anything compiles.
"""

import difflib
import json
import math
from typing import Any

import ml_collections
from ml_collections import config_dict

from jaxcaps import configs as capsule_configs


class ConfigError(ValueError):
  """A config value that cannot work; the message names it and the fix."""


def base_config() -> ml_collections.ConfigDict:
  """Every key a run understands, with defaults for a small SWAP run."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  # 'idx' | 'image_folder' | 'tfds' (all three read into memory), or
  # 'tfds_stream': read per host with tf.data, for ImageNet-sized sets.
  c.data.source = 'idx'
  c.data.name = 'fashion_mnist'
  c.data.path = config_dict.placeholder(str)
  c.data.cache_dir = config_dict.placeholder(str)
  c.data.tfds_data_dir = config_dict.placeholder(str)
  # Per-channel mean and std in [0, 1] pixel units; computed from the
  # training split when left unset.
  c.data.mean = config_dict.placeholder(tuple)
  c.data.std = config_dict.placeholder(tuple)
  c.data.crop_padding = 2          # random crop after zero padding; 0: off
  c.data.flip = True               # random horizontal flip
  c.data.validation_size = 0       # held out of train, for model selection
  # 'tfds_stream' only: the splits, the side images are resized to
  # (Inception-style random crops and flips for training, a centre crop to
  # test; crop_padding and flip above are for the in-memory sources), and
  # the shuffle buffer of each replica on each host, in encoded examples
  # (about 110 kB each for ImageNet).
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'
  c.data.image_size = 224
  c.data.shuffle_buffer = 10_000

  c.model = ml_collections.ConfigDict()
  # 'resnet9' | 'tiny_cnn' | 'capsnet' | 'resnet18' (the capsule
  # paper's CNN baseline; `width` scales both ResNets)
  c.model.name = 'resnet9'
  c.model.width = 0.25
  c.model.widths = config_dict.placeholder(tuple)  # ResNet-9's 4, or width
  c.model.bn_momentum = 0.9
  c.model.dtype = 'float32'
  # Capsule network layout, used when name == 'capsnet': the official
  # CIFAR-10 model by default; see jaxcaps.configs for the others.
  c.model.capsule = capsule_configs.cifar10('resnet')

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 5e-4
  c.optimizer.label_smoothing = 0.0

  # Phase 1: one model, large global batch, data parallel over every device.
  c.phase1 = ml_collections.ConfigDict()
  c.phase1.batch_size = 512        # global
  c.phase1.peak_lr = 0.4
  c.phase1.warmup_epochs = 1.0
  c.phase1.max_epochs = 10.0       # epoch cap; the schedule decays to it
  c.phase1.final_lr = 0.0
  c.phase1.lr_milestones = ()      # epochs at which to cut the rate...
  c.phase1.lr_cut = 0.1            # ...by this factor (instead of linear)
  # Stop at this training accuracy (mean over the last window of steps);
  # None trains to the epoch cap.
  c.phase1.stop_accuracy = config_dict.placeholder(float)
  c.phase1.stop_window_steps = 50

  # Phase 2: W independent replicas from the phase-1 weights, small batches.
  # replicas = 0 skips phases 2 and 3 (plain SGD).
  c.phase2 = ml_collections.ConfigDict()
  c.phase2.replicas = 4
  c.phase2.batch_size = 128        # per replica
  c.phase2.epochs = 2.0
  c.phase2.peak_lr = 0.1
  c.phase2.warmup_epochs = 0.0
  c.phase2.final_lr = 0.0
  # Sequential SWA (Izmailov et al. 2018) inside each replica: average its
  # weights every this many steps from `swa_start_epochs` of the phase on;
  # 0 keeps only each replica's final weights.
  c.phase2.swa_every_steps = 0
  c.phase2.swa_start_epochs = 0.0

  # Phase 3: average the replicas, recompute BN statistics.
  c.phase3 = ml_collections.ConfigDict()
  c.phase3.bn_batches = 20
  c.phase3.bn_batch_size = 512
  c.phase3.skip_nonfinite = False  # drop a diverged replica from the average

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 1000
  c.eval.every_epochs = 0.0        # test accuracy during training; 0: off

  c.train = ml_collections.ConfigDict()
  c.train.log_every = 50
  c.train.checkpoint_every = 500   # steps
  c.train.keep_checkpoints = 2
  c.train.progress = 'auto'        # 'auto' | 'bar' | 'log'
  # How a device runs its replicas: 'vmap' (one batched computation),
  # 'unroll' (W copies in one program; faster on XLA's CPU backend), or
  # 'auto': unroll on the CPU, vmap elsewhere.
  c.train.replica_map = 'auto'
  return c


# Keys that may change between a run and its resumption.
RESUMABLE_KEYS = ('train.log_every', 'train.progress',
                  'train.checkpoint_every', 'train.keep_checkpoints')

_CHOICES = {
    'data.source': ('idx', 'image_folder', 'tfds', 'tfds_stream'),
    'model.name': ('resnet9', 'tiny_cnn', 'capsnet', 'resnet18',
                   'resnet50'),
    'model.dtype': ('float32', 'bfloat16'),
    'model.capsule.backbone': ('resnet', 'simple'),
    'model.capsule.routing_mode': ('concurrent', 'sequential'),
    'model.capsule.conv_impl': ('chunked', 'reference'),
    'model.capsule.routing': ('inverted', 'dynamic', 'em'),
    'train.progress': ('auto', 'bar', 'log'),
    'train.replica_map': ('auto', 'vmap', 'unroll'),
}
_POSITIVE = ('phase1.batch_size', 'phase1.max_epochs', 'phase1.peak_lr',
             'phase1.stop_window_steps', 'phase2.batch_size',
             'phase2.epochs', 'phase2.peak_lr', 'phase3.bn_batches',
             'phase3.bn_batch_size', 'eval.batch_size', 'train.log_every',
             'train.checkpoint_every', 'train.keep_checkpoints',
             'model.width', 'model.capsule.num_routing', 'data.image_size',
             'data.shuffle_buffer',
             'model.capsule.pose_dim', 'model.capsule.primary_caps')
_NON_NEGATIVE = ('phase1.warmup_epochs', 'phase1.final_lr',
                 'phase2.replicas', 'phase2.warmup_epochs',
                 'phase2.final_lr', 'phase2.swa_every_steps',
                 'phase2.swa_start_epochs',
                 'optimizer.weight_decay', 'optimizer.momentum',
                 'data.crop_padding', 'data.validation_size',
                 'eval.every_epochs', 'optimizer.label_smoothing',
                 'model.bn_momentum')


def flatten(config: ml_collections.ConfigDict, prefix: str = ''
            ) -> dict[str, Any]:
  """{'a.b.c': value} for every leaf of a ConfigDict."""
  out = {}
  for key, value in config.items():
    name = f'{prefix}{key}'
    if isinstance(value, ml_collections.ConfigDict):
      out.update(flatten(value, name + '.'))
    else:
      out[name] = value
  return out


def _get(config, name):
  value = config
  for part in name.split('.'):
    value = value[part]
  return value


def check_keys(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError on a key the schema does not know."""
  known = flatten(base_config())
  for name in flatten(config):
    if name not in known:
      close = difflib.get_close_matches(name, known, n=1)
      hint = f"; did you mean '{close[0]}'?" if close else ''
      raise ConfigError(f"unknown config key '{name}'{hint}")


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Checks a config against the schema and the devices, before compiling.

  Args:
    config: the run's config.
    num_devices: devices the mesh will span.

  Raises:
    ConfigError: naming the first bad value and the fix.
  """
  check_keys(config)
  known = flatten(base_config())
  flat = flatten(config)
  for name, default in known.items():
    value = flat[name]
    if value is None or default is None:
      continue
    if isinstance(default, bool) != isinstance(value, bool) or (
        isinstance(default, (int, float)) and not isinstance(default, bool)
        and not isinstance(value, (int, float))) or (
            isinstance(default, str) and not isinstance(value, str)):
      raise ConfigError(
          f'config.{name}={value!r} has type {type(value).__name__}, '
          f'expected {type(default).__name__} like the default {default!r}')
    if isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(f'config.{name}={value} must be finite')
  for name, choices in _CHOICES.items():
    if flat[name] not in choices:
      raise ConfigError(f'config.{name}={flat[name]!r} is unknown; '
                        f'choose one of {", ".join(choices)}')
  for name in _POSITIVE:
    if not flat[name] > 0:
      raise ConfigError(f'config.{name}={flat[name]} must be > 0')
  for name in _NON_NEGATIVE:
    if not flat[name] >= 0:
      raise ConfigError(f'config.{name}={flat[name]} must be >= 0')
  for name in ('optimizer.momentum', 'model.bn_momentum'):
    if not 0 <= flat[name] <= 1:
      raise ConfigError(f'config.{name}={flat[name]} must be in [0, 1]')
  stop = flat['phase1.stop_accuracy']
  if stop is not None and not 0 <= stop <= 1:
    raise ConfigError(
        f'config.phase1.stop_accuracy={stop} is a training accuracy and '
        'must be in [0, 1] (or None to train to phase1.max_epochs)')

  if flat['data.source'] == 'tfds_stream':
    _validate_stream(flat)

  b = flat['phase1.batch_size']
  if b % num_devices:
    raise ConfigError(
        f'config.phase1.batch_size={b} is not divisible by the {num_devices}'
        f' devices of the data axis; use a multiple of {num_devices}')
  w = flat['phase2.replicas']
  if w:
    rep, dat = mesh_shape(w, num_devices)
    b2 = flat['phase2.batch_size']
    if b2 % dat:
      raise ConfigError(
          f'config.phase2.batch_size={b2} is not divisible by the {dat} '
          f'devices each of the {w} replicas is split over; use a multiple '
          f'of {dat}')
  for name in ('phase3.bn_batch_size', 'eval.batch_size'):
    if flat[name] % num_devices:
      raise ConfigError(
          f'config.{name}={flat[name]} is not divisible by the '
          f'{num_devices} devices; use a multiple of {num_devices}')


def _validate_stream(flat: dict[str, Any]) -> None:
  """The checks of a 'tfds_stream' data config."""
  for name in ('data.mean', 'data.std'):
    value = flat[name]
    if value is None or len(value) != 3:
      raise ConfigError(
          f'config.{name}={value!r}: a streamed data set needs the mean '
          'and std of its three channels (it is not read whole to compute '
          'them); for ImageNet, mean=(0.485, 0.456, 0.406) and '
          'std=(0.229, 0.224, 0.225)')
  v = flat['data.validation_size']
  if v:
    split = flat['data.train_split']
    raise ConfigError(
        f'config.data.validation_size={v}: a streamed data set holds no '
        f'examples out itself; set data.train_split={split + f"[{v}:]"!r} '
        f'and data.eval_split={split + f"[:{v}]"!r} instead, or 0')


def mesh_shape(replicas: int, num_devices: int) -> tuple[int, int]:
  """(replica, data) mesh axis sizes for W replicas on D devices.

  W >= D puts W/D replicas on each device; W < D splits each replica
  data-parallel over D/W devices. Anything else would leave devices idle or
  unevenly loaded, so it is refused.
  """
  if replicas >= num_devices:
    if replicas % num_devices:
      raise ConfigError(
          f'config.phase2.replicas={replicas} does not fit {num_devices} '
          f'devices: use a multiple of {num_devices}, or a divisor of it')
    return num_devices, 1
  if num_devices % replicas:
    raise ConfigError(
        f'config.phase2.replicas={replicas} does not fit {num_devices} '
        f'devices: use a divisor of {num_devices}, or a multiple of it')
  return replicas, num_devices // replicas


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(flatten(config), indent=1, sort_keys=True, default=str)


def from_json(text: str) -> ml_collections.ConfigDict:
  """The config a work directory's config.json was written from."""
  flat = json.loads(text)
  config = base_config()
  for name, value in flat.items():
    *parents, leaf = name.split('.')
    node = config
    for part in parents:
      node = node[part]
    if isinstance(value, list):
      value = tuple(value)
    with node.ignore_type():
      node[leaf] = value
  return config


def differences(saved: dict[str, Any], config: ml_collections.ConfigDict
                ) -> list[str]:
  """Keys whose values differ between a saved flat config and this one."""
  now = json.loads(to_json(config))
  # A key newer than the saved run, left at its default, changes nothing.
  defaults = json.loads(to_json(base_config()))
  keys = sorted(set(saved) | set(now))
  return [k for k in keys
          if k not in RESUMABLE_KEYS and saved.get(k) != now.get(k)
          and not (k not in saved and now.get(k) == defaults.get(k))]
