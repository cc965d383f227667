"""Model registry: a config's `model` block to a Flax module.

Every model follows one protocol: `model.apply(variables, x, train=...)`
on normalized float NHWC images returns logits, and its BatchNorm layers
take their momentum from a `bn_momentum` field (the BN recompute clones the
model with 0.0 to read plain batch statistics).
"""

import jax.numpy as jnp
import ml_collections

from jaxswap.models.resnet50 import ResNet50
from jaxswap.models.resnet9 import ResNet9
from jaxswap.models.tiny import TinyCNN

NAMES = ('resnet9', 'tiny_cnn', 'capsnet', 'resnet18', 'resnet50')


def build(config: ml_collections.ConfigDict, num_classes: int):
  """The Flax module of `config.model` for `num_classes` outputs."""
  m = config.model
  dtype = jnp.dtype(m.dtype)
  if m.name == 'resnet9':
    widths = tuple(m.widths) if m.widths else None
    return ResNet9(num_classes=num_classes, width=m.width, widths=widths,
                   bn_momentum=m.bn_momentum, dtype=dtype)
  if m.name == 'tiny_cnn':
    return TinyCNN(num_classes=num_classes, width=m.width,
                   bn_momentum=m.bn_momentum, dtype=dtype)
  if m.name == 'capsnet':
    from jaxcaps import model as capsnet
    return capsnet.from_config(m.capsule, num_classes,
                               bn_momentum=m.bn_momentum)
  if m.name == 'resnet18':
    from jaxcaps import baselines_cnn
    return baselines_cnn.ResNet18(num_classes=num_classes, width=m.width,
                                  bn_momentum=m.bn_momentum)
  if m.name == 'resnet50':
    return ResNet50(num_classes=num_classes, width=m.width,
                    bn_momentum=m.bn_momentum, dtype=dtype)
  raise ValueError(f'config.model.name={m.name!r} is unknown; choose one '
                   f'of {", ".join(NAMES)}')
