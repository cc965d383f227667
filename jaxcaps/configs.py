"""Model configs of the capsule networks, as ml_collections ConfigDicts.

Pass one to `jaxcaps.model.from_config(config, num_classes)`. The CIFAR
ones are the paper's official models; `mnist_small` is sized for a CPU.
"""

import ml_collections


def _conv(num_caps: int, kernel: int, stride: int) -> dict:
  return dict(type='conv', num_caps=num_caps, kernel=kernel, stride=stride)


def _fc(num_caps: int) -> dict:
  return dict(type='fc', num_caps=num_caps)


def _base(backbone: str, pose_dim: int, layers: list[dict],
          **fields) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.backbone = backbone
  config.backbone_width = 128
  config.primary_caps = 32
  config.pose_dim = pose_dim
  config.matrix_pose = True
  config.num_routing = 2  # The official README's setting.
  config.routing_mode = 'concurrent'
  config.conv_impl = 'chunked'
  config.routing = 'inverted'  # Or the baselines 'dynamic', 'em'.
  config.layers = tuple(dict(layer) for layer in layers)
  config.update(fields)
  return config


def cifar10(backbone: str = 'resnet') -> ml_collections.ConfigDict:
  """Official CIFAR-10 model: 4x4 poses, 16x16x32 -> 7x7x32 -> 5x5x32 -> 10.

  1,828,817 parameters with the resnet backbone, 492,177 with the simple
  one.
  """
  return _base(backbone, 16, [_conv(32, 3, 2), _conv(32, 3, 1), _fc(10)])


def cifar100(backbone: str = 'resnet') -> ml_collections.ConfigDict:
  """Official CIFAR-100 model: 6x6 poses, ... -> 5x5x32 -> 20 -> 100.

  The intermediate 20 capsules save parameters over going from 800 children
  straight to 100 classes. 2,799,629 parameters (resnet), 1,462,989
  (simple).
  """
  return _base(backbone, 36,
               [_conv(32, 3, 2), _conv(32, 3, 1), _fc(20), _fc(100)])


def mnist_small() -> ml_collections.ConfigDict:
  """A CPU-sized model for 28x28x1 (or 36x36x1 MultiMNIST) digits.

  Simple backbone to 14x14x64, 16 primary capsules of 4x4, one conv capsule
  layer (16 types, k3 s2) to 6x6, then 10 class capsules.
  """
  return _base('simple', 16, [_conv(16, 3, 2), _fc(10)],
               backbone_width=64, primary_caps=16)


def routing_small() -> ml_collections.ConfigDict:
  """The routing comparison's CPU-sized model, for 28x28 or 32x32 images.

  `mnist_small` with 8 rather than 16 primary and conv capsule types: the
  baselines route every layer to completion, and at 16 types their conv
  layer alone runs under 30 images/s on 2 CPU cores.
  """
  return _base('simple', 16, [_conv(8, 3, 2), _fc(10)],
               backbone_width=64, primary_caps=8)


_CONFIGS = {'cifar10': cifar10, 'cifar100': cifar100,
            'mnist_small': mnist_small, 'routing_small': routing_small}


def get_config(arg: str = 'cifar10') -> ml_collections.ConfigDict:
  """Looks a config up by 'name' or 'name:backbone', e.g. 'cifar10:simple'."""
  name, _, backbone = arg.partition(':')
  if name not in _CONFIGS:
    raise ValueError(f'Unknown capsule config {name!r}; choose one of '
                     f'{sorted(_CONFIGS)}.')
  if backbone:
    if name in ('mnist_small', 'routing_small'):
      raise ValueError(f'{name} has a fixed simple backbone; drop the '
                       f'":{backbone}" suffix.')
    return _CONFIGS[name](backbone)
  return _CONFIGS[name]()
