"""CNN baselines of the capsule networks: a matched CNN and ResNet-18.

The overlaid-digits experiment of Tsai et al. (ICLR 2020) compares the
capsule network with a convolutional network that has as many layers and
as many neurons per layer. `MatchedCNN` is that network, built from the
same model config as `jaxcaps.model.CapsNet`. Reading the capsule network
bottom to top, with d = pose_dim:

  | capsule layer                  | MatchedCNN layer                       |
  | ------------------------------ | -------------------------------------- |
  | backbone                       | the same backbone module               |
  | primary capsules, C types      | 1x1 conv, C * d channels, ReLU         |
  | conv capsules, M types, k, s   | k x k conv, stride s, no padding,      |
  |                                | M * d channels, ReLU                   |
  | fc capsules, M types           | flatten, dense of M * d units, ReLU    |
  | class logits, one shared d->1  | dense of num_classes units             |

A neuron is one number of a layer's output for one example: a capsule
layer with M types at H x W positions has H * W * M * d of them (its
poses), and the matching convolution has H * W output positions of M * d
channels, the same count (`neurons_per_layer` measures both). What the CNN
does not share is the way a layer's numbers are computed: a capsule layer
routes votes and layer-normalizes each pose, where the CNN layer is a
plain convolution or dense map with a bias and a ReLU. So the parameter
counts differ, by a lot: a conv capsule layer holds one sqrt(d) x sqrt(d)
matrix per (window position, child type, parent type), where the matching
convolution holds a full (C_in * d) x (M * d) map per window position.
"""

from collections.abc import Sequence
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcaps import model as capsnet

Array = jax.Array

RESNET18_WIDTHS = (64, 128, 256, 512)


class MatchedCNN(nn.Module):
  """Backbone, then one conv or dense layer per capsule layer, then logits.

  Attributes:
    num_classes: units of the final dense classifier.
    layers: the capsule layers after the primary capsules, bottom to top;
      each becomes a layer of num_caps * pose_dim channels or units.
    backbone: 'resnet' or 'simple', the capsule network's backbone.
    backbone_width: output channels of the simple backbone.
    primary_caps: capsule types of the primary layer.
    pose_dim: d, numbers per capsule pose.
    bn_momentum: BatchNorm running-average decay of the resnet backbone.
  """
  num_classes: int
  layers: Sequence[capsnet.CapsuleLayerSpec]
  backbone: str = 'resnet'
  backbone_width: int = 128
  primary_caps: int = 32
  pose_dim: int = 16
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    if self.backbone == 'resnet':
      x = capsnet.ResNetBackbone(self.bn_momentum, name='backbone')(x, train)
    elif self.backbone == 'simple':
      x = capsnet.SimpleBackbone(self.backbone_width, name='backbone')(
          x, train)
    else:
      raise ValueError(f'Unknown backbone {self.backbone!r}; choose one of '
                       f'{capsnet.BACKBONES}.')
    x = nn.relu(nn.Conv(self.primary_caps * self.pose_dim, (1, 1),
                        name='primary')(x))

    for i, spec in enumerate(capsnet.layer_specs(self.layers)):
      width = spec.num_caps * self.pose_dim
      if spec.type == 'conv':
        # 'VALID', as the capsule convolution does not pad either.
        x = nn.Conv(width, (spec.kernel, spec.kernel),
                    (spec.stride, spec.stride), padding='VALID',
                    name=f'layer_{i}')(x)
      else:
        x = nn.Dense(width, name=f'layer_{i}')(x.reshape(x.shape[0], -1))
      x = nn.relu(x)

    return nn.Dense(self.num_classes, name='logits')(
        x.reshape(x.shape[0], -1))


def matched_cnn_from_config(config: Any, num_classes: int) -> MatchedCNN:
  """Builds the MatchedCNN of a capsule model config.

  Args:
    config: ConfigDict or dict as for `jaxcaps.model.from_config`; its
      routing and pose-shape fields have no counterpart and are ignored.
    num_classes: classes of the dataset; must equal the num_caps of the
      last capsule layer, as for the capsule network.

  Returns:
    The (unbound) module.
  """
  # Going through the capsule constructor applies the same checks and
  # defaults, so the two networks cannot drift apart on a config.
  caps = capsnet.from_config(config, num_classes)
  return MatchedCNN(num_classes=num_classes, layers=caps.layers,
                    backbone=caps.backbone,
                    backbone_width=caps.backbone_width,
                    primary_caps=caps.primary_caps, pose_dim=caps.pose_dim,
                    bn_momentum=caps.bn_momentum)


def matched_layer_names(config: Any) -> list[tuple[str, str]]:
  """(CapsNet module, MatchedCNN module) names, input to output."""
  num_layers = len(capsnet.layer_specs(config['layers']))
  return ([('backbone', 'backbone'), ('primary_caps', 'primary')]
          + [(f'caps_{i}', f'layer_{i}') for i in range(num_layers)]
          + [('logits', 'logits')])


def neurons_per_layer(model: nn.Module, input_shape: Sequence[int],
                      names: Sequence[str]) -> dict[str, int]:
  """Output numbers per example of each named top-level module.

  Shapes only (jax.eval_shape): nothing is computed.

  Args:
    model: a CapsNet or MatchedCNN.
    input_shape: (batch, height, width, channels) of the input.
    names: top-level module names to report, e.g. one side of
      `matched_layer_names`.

  Returns:
    name -> neurons, in the order of `names`. A capsule layer called once
    per routing iteration reports the size of one call's output.
  """
  def forward(x):
    variables = model.init(jax.random.key(0), x, train=False)
    _, state = model.apply(variables, x, train=False,
                           capture_intermediates=True,
                           mutable=['intermediates'])
    return state['intermediates']

  intermediates = jax.eval_shape(
      forward, jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
  counts = {}
  for name in names:
    if name not in intermediates:
      raise KeyError(f'{type(model).__name__} has no top-level module '
                     f'{name!r}; it has {sorted(intermediates)}.')
    output = intermediates[name]['__call__'][0]
    counts[name] = math.prod(output.shape[1:])
  return counts


class ResNet18(nn.Module):
  """ResNet-18 for small images, the capsule paper's CNN baseline.

  The CIFAR variant of He et al. (2016) that the paper's code trains: a
  3x3 stem (no max pool), four stages of two basic blocks at 64, 128, 256
  and 512 channels (times `width`; the last three stages start with stride
  2), global average pooling and a dense classifier. It uses the capsule
  network's `BasicBlock`, so it shares the resnet backbone's blocks.
  11,173,962 parameters at width 1 on 32x32x3 images with 10 classes.

  Attributes:
    num_classes: units of the classifier.
    width: multiplier of the stage widths (rounded, at least 1 channel).
    bn_momentum: BatchNorm running-average decay, flax's convention.
  """
  num_classes: int
  width: float = 1.0
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    widths = [max(1, round(w * self.width)) for w in RESNET18_WIDTHS]
    x = capsnet.resnet_stem(x, widths[0], self.bn_momentum, train)
    for stage, features in enumerate(widths):
      for i in range(2):
        stride = 2 if stage > 0 and i == 0 else 1
        x = capsnet.BasicBlock(features, stride, self.bn_momentum,
                               name=f'stage{stage + 1}_{i}')(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name='logits')(x)
