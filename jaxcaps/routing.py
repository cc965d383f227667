"""Inverted dot-product attention routing between capsule layers.

Implements the routing of "Capsules with Inverted Dot-Product Attention
Routing" (Tsai, Srivastava, Goh and Salakhutdinov, ICLR 2020). A child
capsule i with pose p_i casts a vote v_ij = p_i W_ij for every parent j. On
the first routing iteration each child splits itself evenly among the M
parents (r_ij = 1/M); on later ones the parents compete for the children:
the agreement a_ij = <p_j, v_ij> / sqrt(d) between a vote and the parent's
pose from the previous iteration goes through a softmax over the parents j,
so every child still hands out one unit of coupling. A parent's pose is the
layer normalization of sum_i r_ij v_ij over its d numbers.

A pose is either a sqrt(d) x sqrt(d) matrix (`matrix_pose=True`, the vote
is a matrix product with a sqrt(d) x sqrt(d) W_ij) or a d-vector
(`matrix_pose=False`, W_ij is a d_in x d_out matrix). Every function takes
any number of leading batch axes, written `...` below, so that jax.vmap
can add or remove them freely.

Shapes, with P the pose shape, (s, s) or (d,):
  fully connected: children (..., N, *P), weight (N, M, s, s) or
    (N, M, d_in, d_out), parents (..., M, *P);
  convolutional: children (..., H, W, N, *P), weight
    (k, k, N, s, s, M) or (k, k, N, d_in, d_out, M), parents
    (..., H', W', M, *P) with H' = (H - k) // stride + 1 (no padding).
"""

from collections.abc import Callable, Sequence
import math
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

Array = jax.Array
# A routing step of one layer: (children, parents or None) -> new parents.
LayerStep = Callable[[Array, Array | None], Array]

ROUTING_MODES = ('concurrent', 'sequential')
CONV_IMPLS = ('chunked', 'reference')


def _pose_ndim(matrix_pose: bool) -> int:
  return 2 if matrix_pose else 1


def _vote_equations(matrix_pose: bool) -> tuple[str, str]:
  """Einsum equations for the votes and for their uniform sum over i."""
  if matrix_pose:
    return '...nax,nmxd->...nmad', '...nax,nmxd->...mad'
  return '...na,nmad->...nmd', '...na,nmad->...md'


def capsule_init_scale(num_children: int, num_parents: int, pose_dim: int,
                       kernel: int = 1, matrix_pose: bool = True) -> float:
  """Standard deviation of the routing weights at initialization.

  The weights are N(0, 1) * sqrt(M / (f * N * k * k)), where f is the
  fan-in of one vote number: sqrt(d) for matrix poses (as the paper's code
  has it) and d for vector poses (our extension of the same rule).

  Args:
    num_children: N, child capsule types (for a fully connected layer after
      a convolutional one, all positions times types).
    num_parents: M, parent capsule types.
    pose_dim: d, numbers in a child's pose.
    kernel: k for a convolutional layer, 1 for a fully connected one.
    matrix_pose: whether poses are matrices.

  Returns:
    The scale to multiply standard normal samples with.
  """
  fan_in = math.isqrt(pose_dim) if matrix_pose else pose_dim
  return math.sqrt(num_parents / (fan_in * num_children * kernel * kernel))


def pose_layer_norm(pose: Array, scale: Array, bias: Array, *,
                    matrix_pose: bool = True, eps: float = 1e-5) -> Array:
  """Layer normalization over each pose's d numbers.

  Args:
    pose: (..., *P) poses.
    scale: (d,) learned scale.
    bias: (d,) learned shift.
    matrix_pose: whether P is (s, s) rather than (d,).
    eps: added to the variance, as in torch.nn.LayerNorm.

  Returns:
    Normalized poses, same shape as `pose`.
  """
  pose_ndim = _pose_ndim(matrix_pose)
  flat = pose.reshape(pose.shape[:pose.ndim - pose_ndim] + (-1,))
  mean = flat.mean(-1, keepdims=True)
  var = jnp.square(flat - mean).mean(-1, keepdims=True)
  flat = (flat - mean) * lax.rsqrt(var + eps) * scale + bias
  return flat.reshape(pose.shape)


# ------------------------------------------------------------ fully connected


def fc_votes(child_pose: Array, weight: Array, *,
             matrix_pose: bool = True) -> Array:
  """Votes v_ij = p_i W_ij of N children for M parents.

  Args:
    child_pose: (..., N, *P) child poses.
    weight: (N, M, s, s) or (N, M, d_in, d_out) transforms.
    matrix_pose: whether poses are matrices.

  Returns:
    (..., N, M, *P) votes.
  """
  votes_eq, _ = _vote_equations(matrix_pose)
  return jnp.einsum(votes_eq, child_pose, weight)


def agreement(votes: Array, parent_pose: Array, *,
              matrix_pose: bool = True) -> Array:
  """Scaled dot products a_ij = <p_j, v_ij> / sqrt(d).

  Args:
    votes: (..., N, M, *P) votes.
    parent_pose: (..., M, *P) parent poses of the previous iteration.
    matrix_pose: whether poses are matrices.

  Returns:
    (..., N, M) agreement logits.
  """
  pose_ndim = _pose_ndim(matrix_pose)
  pose_axes = tuple(range(-pose_ndim, 0))
  pose_dim = math.prod(parent_pose.shape[-pose_ndim:])
  dots = (votes * jnp.expand_dims(parent_pose, -2 - pose_ndim)).sum(pose_axes)
  return dots / math.sqrt(pose_dim)


def fc_couplings(child_pose: Array, weight: Array,
                 parent_pose: Array | None = None, *,
                 matrix_pose: bool = True) -> Array:
  """Couplings r_ij, a softmax over parents j for every child i.

  Args:
    child_pose: (..., N, *P) child poses.
    weight: (N, M, ...) transforms.
    parent_pose: (..., M, *P) parent poses of the previous iteration, or
      None on the first iteration.
    matrix_pose: whether poses are matrices.

  Returns:
    (..., N, M) couplings; all 1/M when `parent_pose` is None.
  """
  pose_ndim = _pose_ndim(matrix_pose)
  num_children, num_parents = weight.shape[:2]
  batch_shape = child_pose.shape[:child_pose.ndim - 1 - pose_ndim]
  if parent_pose is None:
    return jnp.full(batch_shape + (num_children, num_parents),
                    1.0 / num_parents, child_pose.dtype)
  votes = fc_votes(child_pose, weight, matrix_pose=matrix_pose)
  logits = agreement(votes, parent_pose, matrix_pose=matrix_pose)
  return jax.nn.softmax(logits, axis=-1)


def _vote_sum(child_pose: Array, weight: Array, parent_pose: Array | None,
              matrix_pose: bool) -> Array:
  """sum_i r_ij v_ij, before the layer normalization."""
  votes_eq, uniform_eq = _vote_equations(matrix_pose)
  if parent_pose is None:
    # Equal couplings factor out of the sum, so one matrix product over
    # (i, pose row) does the job without building the votes.
    return jnp.einsum(uniform_eq, child_pose, weight) / weight.shape[1]
  votes = jnp.einsum(votes_eq, child_pose, weight)
  logits = agreement(votes, parent_pose, matrix_pose=matrix_pose)
  couplings = jax.nn.softmax(logits, axis=-1)
  pose_letters = 'ad' if matrix_pose else 'd'
  return jnp.einsum(f'...nm,...nm{pose_letters}->...m{pose_letters}',
                    couplings, votes)


def fc_routing_step(child_pose: Array, weight: Array, scale: Array,
                    bias: Array, parent_pose: Array | None = None, *,
                    matrix_pose: bool = True) -> Array:
  """One routing iteration of a fully connected capsule layer.

  The votes (batch times the size of `weight`) are built once per
  iteration and serve both the agreement and the weighted sum.

  Args:
    child_pose: (..., N, *P) child poses.
    weight: (N, M, ...) transforms.
    scale: (d,) layer-norm scale.
    bias: (d,) layer-norm shift.
    parent_pose: (..., M, *P) parent poses of the previous iteration, or
      None for the uniform first iteration.
    matrix_pose: whether poses are matrices.

  Returns:
    (..., M, *P) new parent poses.
  """
  summed = _vote_sum(child_pose, weight, parent_pose, matrix_pose)
  return pose_layer_norm(summed, scale, bias, matrix_pose=matrix_pose)


# -------------------------------------------------------------- convolutional


def conv_output_size(size: int, kernel: int, stride: int) -> int:
  """Output positions along one axis of an unpadded convolution."""
  if size < kernel:
    raise ValueError(f'A capsule convolution with kernel {kernel} needs at '
                     f'least {kernel} input positions, got {size}; use a '
                     'smaller kernel or a larger input.')
  return (size - kernel) // stride + 1


def _spatial_axis(child_pose: Array, matrix_pose: bool) -> int:
  """Index of the height axis of (..., H, W, N, *P) child poses."""
  return child_pose.ndim - 3 - _pose_ndim(matrix_pose)


def conv_windows(child_pose: Array, kernel: int, stride: int, *,
                 matrix_pose: bool = True) -> Array:
  """Children of every output position, window entry by window entry.

  Args:
    child_pose: (..., H, W, N, *P) child poses.
    kernel: k, the window size.
    stride: s, the step between windows.
    matrix_pose: whether poses are matrices.

  Returns:
    (..., H', W', k, k, N, *P): entry [..., y, x, u, v, n] is the child of
    type n at input position (s * y + u, s * x + v).
  """
  h_axis = _spatial_axis(child_pose, matrix_pose)
  out_h = conv_output_size(child_pose.shape[h_axis], kernel, stride)
  out_w = conv_output_size(child_pose.shape[h_axis + 1], kernel, stride)
  rows = []
  for u in range(kernel):
    row = []
    for v in range(kernel):
      window = lax.slice_in_dim(child_pose, u, u + stride * (out_h - 1) + 1,
                                stride, axis=h_axis)
      window = lax.slice_in_dim(window, v, v + stride * (out_w - 1) + 1,
                                stride, axis=h_axis + 1)
      row.append(window)
    rows.append(jnp.stack(row, axis=h_axis + 2))
  return jnp.stack(rows, axis=h_axis + 2)


def conv_votes(child_pose: Array, weight: Array, *, stride: int,
               matrix_pose: bool = True) -> Array:
  """All votes of a convolutional capsule layer (for tests and reference).

  Args:
    child_pose: (..., H, W, N, *P) child poses.
    weight: (k, k, N, s, s, M) or (k, k, N, d_in, d_out, M) transforms.
    stride: s, the step between windows.
    matrix_pose: whether poses are matrices.

  Returns:
    (..., H', W', k, k, N, M, *P) votes of each window entry for each
    parent type at that output position.
  """
  kernel, _, num_in = weight.shape[:3]
  windows = conv_windows(child_pose, kernel, stride, matrix_pose=matrix_pose)
  children = _flatten_windows(windows, matrix_pose)
  votes = fc_votes(children, _conv_to_fc_weight(weight),
                   matrix_pose=matrix_pose)
  split = votes.ndim - 2 - _pose_ndim(matrix_pose)
  return votes.reshape(votes.shape[:split] + (kernel, kernel, num_in)
                       + votes.shape[split + 1:])


def _conv_to_fc_weight(weight: Array) -> Array:
  """(k, k, N, a, b, M) -> (k * k * N, M, a, b), children in window order."""
  kernel, _, num_in = weight.shape[:3]
  weight = jnp.moveaxis(weight, -1, 3)
  return weight.reshape((kernel * kernel * num_in,) + weight.shape[3:])


def _flatten_windows(windows: Array, matrix_pose: bool) -> Array:
  """(..., k, k, N, *P) -> (..., k * k * N, *P)."""
  pose_ndim = _pose_ndim(matrix_pose)
  lead = windows.shape[:windows.ndim - 3 - pose_ndim]
  return windows.reshape(lead + (-1,) + windows.shape[-pose_ndim:])


def conv_couplings(child_pose: Array, weight: Array,
                   parent_pose: Array | None = None, *, stride: int,
                   matrix_pose: bool = True) -> Array:
  """Couplings of every window entry with the parents at its position.

  A child inside several overlapping windows gets a separate softmax over
  the parent types of each output position.

  Args:
    child_pose: (..., H, W, N, *P) child poses.
    weight: (k, k, N, ..., M) transforms.
    parent_pose: (..., H', W', M, *P) parent poses of the previous
      iteration, or None on the first iteration.
    stride: s, the step between windows.
    matrix_pose: whether poses are matrices.

  Returns:
    (..., H', W', k, k, N, M) couplings.
  """
  kernel, _, num_in = weight.shape[:3]
  windows = conv_windows(child_pose, kernel, stride, matrix_pose=matrix_pose)
  couplings = fc_couplings(_flatten_windows(windows, matrix_pose),
                           _conv_to_fc_weight(weight), parent_pose,
                           matrix_pose=matrix_pose)
  return couplings.reshape(couplings.shape[:-2]
                           + (kernel, kernel, num_in, weight.shape[-1]))


def conv_offset_scan(body: Callable[..., Any], init: Any,
                     children: Sequence[Array], weight: Array, *,
                     stride: int, matrix_pose: bool = True) -> Any:
  """Folds `body` over the k * k kernel offsets of a conv capsule layer.

  A window entry (u, v) of every output position is a strided slice of the
  input, so a conv layer is k * k fully connected layers, one per offset,
  whose children are those slices. `body(total, offset_children,
  offset_weight)` sees one offset at a time: `offset_children` holds the
  slice of each array in `children` (the child poses first, then any other
  per-child arrays such as activations, all laid out (..., H, W, N, ...)),
  each (..., H', W', N, ...), and `offset_weight` is that offset's (N, M, a,
  b) FC-shaped transform. The scan is rematerialized, so only one offset's
  votes are alive at a time, in the backward pass too.

  Every pairwise order of a (child, weight, parent) einsum over all
  offsets leaves a votes-sized intermediate; this bounds memory to 1 / k^2
  of it. On a 2-core CPU it is also faster than building all votes (0.9 s
  vs 4.1 s forward, 3.0 s vs 6.5 s with gradients, for the official first
  conv capsule layer at batch 32 and 2 iterations).

  Args:
    body: (total, tuple of offset children, offset weight) -> total.
    init: the initial total (any pytree).
    children: arrays whose axes from the height one on are (H, W, N, ...).
    weight: (k, k, N, a, b, M) transforms.
    stride: the step between windows.
    matrix_pose: whether poses are matrices (locates H in children[0]).

  Returns:
    The total after the last offset.
  """
  kernel, _, num_in = weight.shape[:3]
  h_axis = _spatial_axis(children[0], matrix_pose)
  out_h = conv_output_size(children[0].shape[h_axis], kernel, stride)
  out_w = conv_output_size(children[0].shape[h_axis + 1], kernel, stride)
  span_h, span_w = stride * (out_h - 1) + 1, stride * (out_w - 1) + 1
  # (k * k, N, M, a, b): one FC-shaped weight per offset.
  fc_weight = _conv_to_fc_weight(weight)
  offset_weights = fc_weight.reshape((kernel * kernel, num_in)
                                     + fc_weight.shape[1:])

  def cut(x, u, v):
    x = lax.dynamic_slice_in_dim(x, u, span_h, axis=h_axis)
    x = lax.dynamic_slice_in_dim(x, v, span_w, axis=h_axis + 1)
    x = lax.slice_in_dim(x, 0, span_h, stride, axis=h_axis)
    return lax.slice_in_dim(x, 0, span_w, stride, axis=h_axis + 1)

  def step(total, inputs):
    offset, offset_weight = inputs
    u, v = offset // kernel, offset % kernel
    return body(total, tuple(cut(x, u, v) for x in children),
                offset_weight), None

  total, _ = lax.scan(jax.checkpoint(step, prevent_cse=False), init,
                      (jnp.arange(kernel * kernel), offset_weights))
  return total


def conv_vote_sum(child_pose: Array, weight: Array,
                  parent_pose: Array | None, *, stride: int,
                  matrix_pose: bool = True,
                  impl: str = 'chunked') -> Array:
  """sum_i r_ij v_ij of a conv layer, r_ij from the agreement with parents.

  Args:
    child_pose: (..., H, W, N, *P) child poses.
    weight: (k, k, N, s, s, M) or (k, k, N, d_in, d_out, M) transforms.
    parent_pose: (..., H', W', M, *P) parent poses of the previous
      iteration, or None for uniform couplings.
    stride: the step between windows.
    matrix_pose: whether poses are matrices.
    impl: 'chunked' (one kernel offset at a time, `conv_offset_scan`) or
      'reference' (all votes at once).

  Returns:
    (..., H', W', M, *P) weighted vote sums, before any normalization.
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f'Unknown conv capsule impl {impl!r}; choose one of '
                     f'{CONV_IMPLS}.')
  if impl == 'reference' or parent_pose is None:
    # The uniform pass builds no votes (see _vote_sum), only the windows,
    # 1 / M of their size; one product beats a scan there.
    windows = conv_windows(child_pose, weight.shape[0], stride,
                           matrix_pose=matrix_pose)
    return _vote_sum(_flatten_windows(windows, matrix_pose),
                     _conv_to_fc_weight(weight), parent_pose, matrix_pose)

  def body(total, offset_children, offset_weight):
    return total + _vote_sum(offset_children[0], offset_weight, parent_pose,
                             matrix_pose)

  return conv_offset_scan(body, jnp.zeros_like(parent_pose), (child_pose,),
                          weight, stride=stride, matrix_pose=matrix_pose)


def conv_routing_step(child_pose: Array, weight: Array, scale: Array,
                      bias: Array, parent_pose: Array | None = None, *,
                      stride: int, matrix_pose: bool = True,
                      impl: str = 'chunked') -> Array:
  """One routing iteration of a convolutional capsule layer.

  Args:
    child_pose: (..., H, W, N, *P) child poses.
    weight: (k, k, N, s, s, M) or (k, k, N, d_in, d_out, M) transforms,
      shared by all positions.
    scale: (d,) layer-norm scale.
    bias: (d,) layer-norm shift.
    parent_pose: (..., H', W', M, *P) parent poses of the previous
      iteration, or None for the uniform first iteration.
    stride: s, the step between windows.
    matrix_pose: whether poses are matrices.
    impl: 'chunked' (bounded memory, the default) or 'reference' (builds
      all votes at once; simple, for tests).

  Returns:
    (..., H', W', M, *P) new parent poses.
  """
  summed = conv_vote_sum(child_pose, weight, parent_pose, stride=stride,
                         matrix_pose=matrix_pose, impl=impl)
  return pose_layer_norm(summed, scale, bias, matrix_pose=matrix_pose)


# ---------------------------------------------------------------- scheduling


def route(layers: Sequence[LayerStep], primary_pose: Array, num_routing: int,
          *, mode: str = 'concurrent') -> list[Array]:
  """Runs the routing iterations of a stack of capsule layers.

  Each layer is a function (children, parents or None) -> new parents that
  performs one routing iteration; None asks for the uniform first pass.

  Concurrent routing (the paper's default) first does the uniform pass
  through the whole stack, then on each later iteration recomputes every
  layer at once from the previous iteration's children and parents, so a
  layer sees its children's update one iteration late. Sequential routing
  finishes all iterations of one layer before the next layer starts. With a
  single layer the two coincide.

  NOTE: under concurrent routing, iteration t of layer l (of L) reaches the
  top only if t <= num_routing - (L - l); with the official 2 iterations
  and 3 capsule layers, only the class layer routes by agreement (XLA drops
  the unused updates, so they cost nothing under jit).

  Args:
    layers: the layer steps, bottom to top.
    primary_pose: poses of the lowest capsules (children of layers[0]).
    num_routing: routing iterations per layer, >= 1; 1 is the uniform pass
      alone.
    mode: 'concurrent' or 'sequential'.

  Returns:
    The poses of every level: [primary_pose, layers[0] output, ...].
  """
  if num_routing < 1:
    raise ValueError(f'num_routing must be at least 1 (1 is the uniform '
                     f'pass alone), got {num_routing}.')
  if mode == 'concurrent':
    poses = [primary_pose]
    for layer in layers:
      poses.append(layer(poses[-1], None))
    for _ in range(num_routing - 1):
      poses = [primary_pose] + [
          layer(poses[i], poses[i + 1]) for i, layer in enumerate(layers)]
    return poses
  if mode == 'sequential':
    poses = [primary_pose]
    for layer in layers:
      parent = layer(poses[-1], None)
      for _ in range(num_routing - 1):
        parent = layer(poses[-1], parent)
      poses.append(parent)
    return poses
  raise ValueError(f'Unknown routing mode {mode!r}; choose one of '
                   f'{ROUTING_MODES}.')
