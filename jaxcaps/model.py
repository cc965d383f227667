"""Capsule network with inverted dot-product attention routing (Flax linen).

The network of Tsai et al. (ICLR 2020): a convolutional backbone, primary
capsules from a 1x1 convolution, a stack of convolutional and fully
connected capsule layers routed by `jaxcaps.routing`, and one linear map,
shared by all class capsules, from a class capsule's pose to its logit.

The same architecture also runs the baselines of `jaxcaps.baselines`
(`routing='dynamic'` or `'em'`), whose scores are class capsule lengths or
activations rather than logits; `baselines.loss_for(routing)` is the loss
that goes with each.

Protocol expected by the trainer: `model.apply(variables, x, train=...)`
with x float32 NHWC, already normalized, returns (B, num_classes) scores;
BatchNorm statistics live in the 'batch_stats' collection (the "simple"
backbone has none) and follow the `bn_momentum` field.
"""

from collections.abc import Mapping, Sequence
import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcaps import baselines
from jaxcaps import routing

Array = jax.Array
BACKBONES = ('resnet', 'simple')
LAYER_TYPES = ('conv', 'fc')

# Matches torch's default BatchNorm2d and LayerNorm epsilon.
_BN_EPS = 1e-5
_PAD1 = ((1, 1), (1, 1))  # torch's padding=1; 'SAME' pads stride 2 unevenly


class CapsuleLayerSpec(NamedTuple):
  """One capsule layer of the stack; hashable, so the model stays static."""
  type: str
  num_caps: int
  kernel: int = 1
  stride: int = 1


# ------------------------------------------------------------------ backbones


class BasicBlock(nn.Module):
  """ResNet basic block: two 3x3 convolutions and an identity shortcut."""
  features: int
  stride: int = 1
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    def norm(name):
      return nn.BatchNorm(use_running_average=not train,
                          momentum=self.bn_momentum, epsilon=_BN_EPS,
                          name=name)

    def conv(stride, name):
      return nn.Conv(self.features, (3, 3), (stride, stride), padding=_PAD1,
                     use_bias=False, kernel_init=nn.initializers.he_normal(),
                     name=name)

    y = nn.relu(norm('bn1')(conv(self.stride, 'conv1')(x)))
    y = norm('bn2')(conv(1, 'conv2')(y))
    if self.stride != 1 or x.shape[-1] != self.features:
      # A 1x1 projection where the shape changes, as in ResNet's option B.
      x = nn.Conv(self.features, (1, 1), (self.stride, self.stride),
                  use_bias=False, kernel_init=nn.initializers.he_normal(),
                  name='shortcut_conv')(x)
      x = norm('shortcut_bn')(x)
    return nn.relu(x + y)


def resnet_stem(x: Array, features: int, bn_momentum: float,
                train: bool) -> Array:
  """3x3 conv, BatchNorm, ReLU: call inside a compact module's __call__."""
  x = nn.Conv(features, (3, 3), padding=_PAD1, use_bias=False,
              kernel_init=nn.initializers.he_normal(), name='stem_conv')(x)
  x = nn.BatchNorm(use_running_average=not train, momentum=bn_momentum,
                   epsilon=_BN_EPS, name='stem_bn')(x)
  return nn.relu(x)


class ResNetBackbone(nn.Module):
  """3x3 conv stem (64), 3 blocks at 64, 4 at 128 (the first strided)."""
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    x = resnet_stem(x, 64, self.bn_momentum, train)
    for i in range(3):
      x = BasicBlock(64, 1, self.bn_momentum, name=f'block1_{i}')(x, train)
    for i in range(4):
      x = BasicBlock(128, 2 if i == 0 else 1, self.bn_momentum,
                     name=f'block2_{i}')(x, train)
    return x


class SimpleBackbone(nn.Module):
  """One 3x3 stride-2 convolution (with bias) and a ReLU."""
  features: int = 128

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    del train  # No BatchNorm or dropout.
    x = nn.Conv(self.features, (3, 3), (2, 2), padding=_PAD1,
                name='conv')(x)
    return nn.relu(x)


# ------------------------------------------------------------------- capsules


def _pose_shape(pose_dim: int, matrix_pose: bool) -> tuple[int, ...]:
  if not matrix_pose:
    return (pose_dim,)
  side = math.isqrt(pose_dim)
  if side * side != pose_dim:
    raise ValueError(f'Matrix poses need a square pose_dim, got {pose_dim}; '
                     'use 16 (4x4) or 36 (6x6), or set matrix_pose=False.')
  return (side, side)


class PoseLayerNorm(nn.Module):
  """Layer normalization over a pose's d numbers, scale and shift (d,)."""
  pose_dim: int
  matrix_pose: bool = True

  @nn.compact
  def __call__(self, pose: Array) -> Array:
    scale = self.param('scale', nn.initializers.ones, (self.pose_dim,))
    bias = self.param('bias', nn.initializers.zeros, (self.pose_dim,))
    return routing.pose_layer_norm(pose, scale, bias,
                                   matrix_pose=self.matrix_pose)


class PrimaryCapsules(nn.Module):
  """1x1 convolution (no bias) to num_caps poses per position, then LN."""
  num_caps: int
  pose_dim: int
  matrix_pose: bool = True

  @nn.compact
  def __call__(self, features: Array) -> Array:
    x = nn.Conv(self.num_caps * self.pose_dim, (1, 1), use_bias=False,
                name='conv')(features)
    pose_shape = _pose_shape(self.pose_dim, self.matrix_pose)
    pose = x.reshape(x.shape[:-1] + (self.num_caps,) + pose_shape)
    return PoseLayerNorm(self.pose_dim, self.matrix_pose, name='norm')(pose)


class ConvCapsules(nn.Module):
  """Convolutional capsule layer; call once per routing iteration."""
  num_caps: int
  kernel: int
  stride: int
  pose_dim: int
  matrix_pose: bool = True
  impl: str = 'chunked'

  @nn.compact
  def __call__(self, child_pose: Array,
               parent_pose: Array | None = None) -> Array:
    pose_shape = _pose_shape(self.pose_dim, self.matrix_pose)
    num_in = child_pose.shape[-1 - len(pose_shape)]
    child_dim = child_pose.shape[-1]
    std = routing.capsule_init_scale(num_in, self.num_caps, self.pose_dim,
                                     self.kernel, self.matrix_pose)
    shape = (self.kernel, self.kernel, num_in, child_dim, pose_shape[-1],
             self.num_caps)
    weight = self.param('kernel', nn.initializers.normal(std), shape)
    scale = self.param('scale', nn.initializers.ones, (self.pose_dim,))
    bias = self.param('bias', nn.initializers.zeros, (self.pose_dim,))
    return routing.conv_routing_step(
        child_pose, weight, scale, bias, parent_pose, stride=self.stride,
        matrix_pose=self.matrix_pose, impl=self.impl)


class FCCapsules(nn.Module):
  """Fully connected capsule layer; spatial children are flattened.

  After a convolutional layer, every (position, type) pair is a separate
  child with its own transforms.
  """
  num_caps: int
  pose_dim: int
  matrix_pose: bool = True

  @nn.compact
  def __call__(self, child_pose: Array,
               parent_pose: Array | None = None) -> Array:
    pose_shape = _pose_shape(self.pose_dim, self.matrix_pose)
    # Children arrive as (B, N, *P) or (B, H, W, N, *P).
    child_pose = child_pose.reshape(
        (child_pose.shape[0], -1) + child_pose.shape[-len(pose_shape):])
    num_in, child_dim = child_pose.shape[1], child_pose.shape[-1]
    std = routing.capsule_init_scale(num_in, self.num_caps, self.pose_dim,
                                     1, self.matrix_pose)
    weight = self.param('kernel', nn.initializers.normal(std),
                        (num_in, self.num_caps, child_dim, pose_shape[-1]))
    scale = self.param('scale', nn.initializers.ones, (self.pose_dim,))
    bias = self.param('bias', nn.initializers.zeros, (self.pose_dim,))
    return routing.fc_routing_step(child_pose, weight, scale, bias,
                                   parent_pose, matrix_pose=self.matrix_pose)


# ------------------------------------------------------- baseline capsules


class SquashPrimaryCapsules(nn.Module):
  """Dynamic routing's primary capsules: a 1x1 convolution, then squash.

  Sabour et al. use a 9x9 stride-2 convolution here; the 1x1 one keeps the
  inverted model's backbone and primary layer, with squash for its LN.
  """
  num_caps: int
  pose_dim: int
  matrix_pose: bool = True

  @nn.compact
  def __call__(self, features: Array) -> Array:
    x = nn.Conv(self.num_caps * self.pose_dim, (1, 1), use_bias=False,
                name='conv')(features)
    pose_shape = _pose_shape(self.pose_dim, self.matrix_pose)
    pose = x.reshape(x.shape[:-1] + (self.num_caps,) + pose_shape)
    return baselines.squash(pose, matrix_pose=self.matrix_pose)


class MatrixPrimaryCapsules(nn.Module):
  """EM routing's primary capsules: linear poses, sigmoid activations.

  Both come from 1x1 convolutions of the features at each position.
  """
  num_caps: int
  pose_dim: int
  matrix_pose: bool = True

  @nn.compact
  def __call__(self, features: Array) -> tuple[Array, Array]:
    x = nn.Conv(self.num_caps * self.pose_dim, (1, 1), use_bias=False,
                name='conv')(features)
    pose_shape = _pose_shape(self.pose_dim, self.matrix_pose)
    pose = x.reshape(x.shape[:-1] + (self.num_caps,) + pose_shape)
    logit = nn.Conv(self.num_caps, (1, 1), name='activation')(features)
    return pose, jax.nn.sigmoid(logit)


def _routing_kernel(module: nn.Module, spec: CapsuleLayerSpec, num_in: int,
                    child_dim: int, pose_dim: int,
                    matrix_pose: bool) -> Array:
  """Transforms of a baseline layer, shaped as the inverted layer's.

  Their init is sqrt(M) times the inverted layer's, so that a uniform
  coupling's sum of votes keeps the children's scale, E|s_j|^2 = E|u_i|^2:
  with no LayerNorm to restore it, the smaller init leaves dynamic
  routing's class capsules near zero length (squash maps short vectors to
  |s|^2) and EM routing's votes so tight that the log-variance costs
  saturate every activation near one.
  """
  pose_shape = _pose_shape(pose_dim, matrix_pose)
  kernel = spec.kernel if spec.type == 'conv' else 1
  std = math.sqrt(spec.num_caps) * routing.capsule_init_scale(
      num_in, spec.num_caps, pose_dim, kernel, matrix_pose)
  if spec.type == 'conv':
    shape = (kernel, kernel, num_in, child_dim, pose_shape[-1],
             spec.num_caps)
  else:
    shape = (num_in, spec.num_caps, child_dim, pose_shape[-1])
  return module.param('kernel', nn.initializers.normal(std), shape)


def _flatten_children(child_pose: Array, pose_ndim: int) -> Array:
  """(B, H, W, N, *P) or (B, N, *P) -> (B, H * W * N or N, *P)."""
  return child_pose.reshape((child_pose.shape[0], -1)
                            + child_pose.shape[child_pose.ndim - pose_ndim:])


class DynamicCapsules(nn.Module):
  """A conv or fc capsule layer routed by dynamic routing to completion."""
  spec: CapsuleLayerSpec
  pose_dim: int
  matrix_pose: bool = True
  num_routing: int = 3
  conv_impl: str = 'chunked'

  @nn.compact
  def __call__(self, child_pose: Array) -> Array:
    pose_ndim = len(_pose_shape(self.pose_dim, self.matrix_pose))
    if self.spec.type == 'fc':
      child_pose = _flatten_children(child_pose, pose_ndim)
    weight = _routing_kernel(self, self.spec,
                             child_pose.shape[-1 - pose_ndim],
                             child_pose.shape[-1], self.pose_dim,
                             self.matrix_pose)
    if self.spec.type == 'conv':
      return baselines.dynamic_conv_routing(
          child_pose, weight, self.num_routing, stride=self.spec.stride,
          matrix_pose=self.matrix_pose, impl=self.conv_impl)[0]
    return baselines.dynamic_fc_routing(child_pose, weight, self.num_routing,
                                        matrix_pose=self.matrix_pose)[0]


class EMCapsules(nn.Module):
  """A conv or fc capsule layer routed by EM routing to completion."""
  spec: CapsuleLayerSpec
  pose_dim: int
  matrix_pose: bool = True
  num_routing: int = 3
  conv_impl: str = 'chunked'

  @nn.compact
  def __call__(self, child_pose: Array,
               child_activation: Array) -> tuple[Array, Array]:
    pose_ndim = len(_pose_shape(self.pose_dim, self.matrix_pose))
    if self.spec.type == 'fc':
      child_pose = _flatten_children(child_pose, pose_ndim)
      child_activation = child_activation.reshape(
          child_activation.shape[0], -1)
    weight = _routing_kernel(self, self.spec,
                             child_pose.shape[-1 - pose_ndim],
                             child_pose.shape[-1], self.pose_dim,
                             self.matrix_pose)
    beta_u = self.param('beta_u', nn.initializers.zeros,
                        (self.spec.num_caps,))
    beta_a = self.param('beta_a', nn.initializers.zeros,
                        (self.spec.num_caps,))
    if self.spec.type == 'conv':
      pose, activation, _ = baselines.em_conv_routing(
          child_pose, child_activation, weight, beta_u, beta_a,
          self.num_routing, stride=self.spec.stride,
          matrix_pose=self.matrix_pose, impl=self.conv_impl)
    else:
      pose, activation, _ = baselines.em_fc_routing(
          child_pose, child_activation, weight, beta_u, beta_a,
          self.num_routing, matrix_pose=self.matrix_pose)
    return pose, activation


# ------------------------------------------------------------------- network


class CapsNet(nn.Module):
  """Backbone, primary capsules, routed capsule layers and class scores.

  Attributes:
    num_classes: classes; the last capsule layer must have this many types.
    layers: capsule layers after the primary capsules, bottom to top.
    backbone: 'resnet' or 'simple'.
    backbone_width: output channels of the simple backbone.
    primary_caps: capsule types of the primary layer.
    pose_dim: d, numbers per pose (the same on every capsule layer).
    matrix_pose: sqrt(d) x sqrt(d) matrix poses rather than d-vectors.
    num_routing: routing iterations, >= 1 (1 is the uniform pass alone).
    routing_mode: 'concurrent' (the paper's default) or 'sequential'.
    conv_impl: 'chunked' (bounded memory) or 'reference' (all votes).
    bn_momentum: BatchNorm running-average decay, flax's convention.
    routing: 'inverted' (this paper; logits from a shared linear map),
      'dynamic' (Sabour et al. 2017; class capsule lengths) or 'em'
      (Hinton et al. 2018; class activations). The baselines route each
      layer to completion before the next, as their papers do, so
      routing_mode does not apply to them; dynamic routing
      has the paper's vector capsules with matrix_pose=False only.
  """
  num_classes: int
  layers: Sequence[CapsuleLayerSpec]
  backbone: str = 'resnet'
  backbone_width: int = 128
  primary_caps: int = 32
  pose_dim: int = 16
  matrix_pose: bool = True
  num_routing: int = 2
  routing_mode: str = 'concurrent'
  conv_impl: str = 'chunked'
  bn_momentum: float = 0.9
  routing: str = 'inverted'

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    if self.routing not in baselines.ROUTINGS:
      raise ValueError(f'Unknown routing {self.routing!r}; choose one of '
                       f'{baselines.ROUTINGS}.')
    if self.backbone == 'resnet':
      features = ResNetBackbone(self.bn_momentum, name='backbone')(x, train)
    elif self.backbone == 'simple':
      features = SimpleBackbone(self.backbone_width, name='backbone')(
          x, train)
    else:
      raise ValueError(f'Unknown backbone {self.backbone!r}; choose one of '
                       f'{BACKBONES}.')
    if self.routing == 'dynamic':
      return self._dynamic_lengths(features)
    if self.routing == 'em':
      return self._em_activations(features)
    pose = PrimaryCapsules(self.primary_caps, self.pose_dim,
                           self.matrix_pose, name='primary_caps')(features)

    specs = layer_specs(self.layers)
    _check_num_classes(specs, self.num_classes)
    steps = []
    for i, spec in enumerate(specs):
      if spec.type == 'conv':
        steps.append(ConvCapsules(
            spec.num_caps, spec.kernel, spec.stride, self.pose_dim,
            self.matrix_pose, self.conv_impl, name=f'caps_{i}'))
      else:
        steps.append(FCCapsules(spec.num_caps, self.pose_dim,
                                self.matrix_pose, name=f'caps_{i}'))
    class_pose = routing.route(steps, pose, self.num_routing,
                               mode=self.routing_mode)[-1]

    class_pose = class_pose.reshape(class_pose.shape[:2] + (-1,))
    return nn.Dense(1, name='logits')(class_pose)[..., 0]

  def _dynamic_lengths(self, features: Array) -> Array:
    pose = SquashPrimaryCapsules(self.primary_caps, self.pose_dim,
                                 self.matrix_pose, name='primary_caps')(
                                     features)
    specs = layer_specs(self.layers)
    _check_num_classes(specs, self.num_classes)
    for i, spec in enumerate(specs):
      pose = DynamicCapsules(spec, self.pose_dim, self.matrix_pose,
                             self.num_routing, self.conv_impl,
                             name=f'caps_{i}')(pose)
    return baselines.capsule_length(pose, matrix_pose=self.matrix_pose)

  def _em_activations(self, features: Array) -> Array:
    pose, activation = MatrixPrimaryCapsules(
        self.primary_caps, self.pose_dim, self.matrix_pose,
        name='primary_caps')(features)
    specs = layer_specs(self.layers)
    _check_num_classes(specs, self.num_classes)
    for i, spec in enumerate(specs):
      pose, activation = EMCapsules(spec, self.pose_dim, self.matrix_pose,
                                    self.num_routing, self.conv_impl,
                                    name=f'caps_{i}')(pose, activation)
    return activation


# ------------------------------------------------------- construction, size


def _get(spec: Any, key: str, default: Any = None) -> Any:
  """Reads a key of a dict or ConfigDict."""
  if isinstance(spec, Mapping):
    return spec.get(key, default)
  return getattr(spec, key, default)


def layer_specs(layers: Sequence[Any]) -> tuple[CapsuleLayerSpec, ...]:
  """Turns dicts or ConfigDicts like {type: 'conv', num_caps: 32, kernel: 3,
  stride: 2} into hashable layer specs, checking them."""
  specs = []
  for i, layer in enumerate(layers):
    kind, num_caps = _get(layer, 'type'), _get(layer, 'num_caps')
    if kind not in LAYER_TYPES:
      raise ValueError(f'Capsule layer {i} ({layer!r}) has type '
                       f'{kind!r}; choose one of {LAYER_TYPES}.')
    if not isinstance(num_caps, int) or num_caps < 1:
      raise ValueError(f'Capsule layer {i} needs a positive integer '
                       f'num_caps, got {num_caps!r}.')
    if kind == 'conv':
      specs.append(CapsuleLayerSpec('conv', num_caps,
                                    int(_get(layer, 'kernel', 3)),
                                    int(_get(layer, 'stride', 1))))
    else:
      specs.append(CapsuleLayerSpec('fc', num_caps))
  if not specs or specs[-1].type != 'fc':
    raise ValueError('The capsule stack must end with an fc layer of class '
                     f'capsules, got {specs}.')
  return tuple(specs)


def _check_num_classes(specs: Sequence[CapsuleLayerSpec],
                       num_classes: int) -> None:
  if specs[-1].num_caps != num_classes:
    raise ValueError(f'The last capsule layer has {specs[-1].num_caps} '
                     f'capsules but the dataset has {num_classes} classes; '
                     'set its num_caps to the number of classes.')


def from_config(config: Any, num_classes: int, **overrides: Any) -> CapsNet:
  """Builds a CapsNet from a model ConfigDict (see `jaxcaps.configs`).

  Args:
    config: ConfigDict or dict with `layers` and optionally backbone,
      backbone_width, primary_caps, pose_dim, matrix_pose, num_routing,
      routing_mode, conv_impl, bn_momentum, routing.
    num_classes: classes of the dataset; must equal the num_caps of the
      last layer.
    **overrides: fields to set instead of the config's.

  Returns:
    The (unbound) module.
  """
  specs = layer_specs(_get(config, 'layers', ()))
  _check_num_classes(specs, num_classes)
  kwargs = {}
  for field in dataclasses.fields(CapsNet):
    if field.name in ('num_classes', 'layers', 'parent', 'name'):
      continue
    value = _get(config, field.name)
    if value is not None:
      kwargs[field.name] = value
  kwargs.update(overrides)
  return CapsNet(num_classes=num_classes, layers=specs, **kwargs)


def parameter_summary(params: Any) -> tuple[int, str]:
  """Counts parameters, in total and per layer.

  Args:
    params: the 'params' collection (arrays or jax.ShapeDtypeStructs, e.g.
      from jax.eval_shape).

  Returns:
    (total count, printable table with one row per top-level module and,
    outside the backbone, one per array).
  """
  def order(name):
    # Input to output: backbone, primary capsules, capsule layers, logits.
    if name.startswith('caps_') and name[5:].isdigit():
      return (2, int(name[5:]), name)
    rank = {'backbone': 0, 'primary_caps': 1, 'logits': 3}
    return (rank.get(name, 4), 0, name)

  rows = []
  total = 0
  for name in sorted(params, key=order):
    sub = params[name]
    leaves = jax.tree_util.tree_leaves_with_path(sub)
    count = sum(math.prod(leaf.shape) for _, leaf in leaves)
    total += count
    rows.append((name, count, f'{len(leaves)} arrays'))
    if name != 'backbone':
      for path, leaf in leaves:
        key = '/'.join(str(getattr(k, 'key', k)) for k in path)
        rows.append((f'  {key}', math.prod(leaf.shape), str(tuple(leaf.shape))))
  rows.append(('total', total, ''))
  width = max(len(r[0]) for r in rows)
  lines = [f'{n:<{width}}  {c:>11,}  {s}' for n, c, s in rows]
  return total, '\n'.join(lines)


def count_params(model: CapsNet, input_shape: Sequence[int]) -> int:
  """Parameter count of `model` for inputs of `input_shape`, no compute."""
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False),
      jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
  return parameter_summary(variables['params'])[0]
