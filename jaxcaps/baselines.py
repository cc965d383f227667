"""Routing baselines: dynamic routing and EM routing between capsule layers.

The two earlier routing procedures that the inverted dot-product attention
routing of `jaxcaps.routing` is compared against, as pure functions with
the same shapes and conventions: any number of leading batch axes
(written `...`), matrix or vector poses, and weights laid out as there, so
that one capsule architecture can run any of the three.

Dynamic routing ("Dynamic Routing Between Capsules", Sabour, Frosst and
Hinton, NeurIPS 2017). Capsules are vectors whose length is the probability
that their entity is present. A child i votes u_ij = u_i W_ij for every
parent j. Coupling logits b_ij start at zero; on every iteration the
couplings c_ij are a softmax of b_ij over the parents j, a parent's input
is s_j = sum_i c_ij u_ij, its output is v_j = squash(s_j) =
|s_j|^2 / (1 + |s_j|^2) * s_j / |s_j|, and the agreement <v_j, u_ij> is
added to b_ij for the next iteration. The class scores are the class
capsules' lengths, trained with the margin loss.

EM routing ("Matrix capsules with EM routing", Hinton, Sabour and Frosst,
ICLR 2018). A capsule is a 4x4 pose matrix M_i and an activation a_i; a
child votes V_ij = M_i W_ij. Routing fits one Gaussian with diagonal
covariance per parent to the votes by expectation maximization, with
assignments R_ij (uniform at first). The M-step weighs R_ij by the child's
activation and takes the parent's mean mu_j (its pose) and variances
sigma_j^2 over the d pose numbers h; the cost of describing the votes,
(beta_u + log sigma_j^h) sum_i R_ij summed over h (here divided by N, see
below), against a learned beta_a sets the parent's activation
a_j = sigmoid(lambda (beta_a - cost_j)) at an inverse temperature lambda
that rises over the iterations. The E-step sets R_ij proportional to
a_j p_j(V_ij), the parent's Gaussian density at the vote, normalized over
the parents. The class scores are the class capsules' activations, trained
with the spread loss. Densities, assignments and activations are handled
as logarithms or logits, so no product of d small densities underflows.

Convolutional layers work as in the inverted routing: W has shape
(k, k, N, ..., M) and is shared by all positions, there is no padding, and
every entry of an output position's k x k window is a child of the parents
at that position alone.

Where this module differs from the papers (each also noted where it
happens):
- Both: a convolutional routed layer treats each window entry as a child
  of its own output position, so a child inside several overlapping
  windows hands out one unit of coupling (or assignment) per window. Sabour
  et al. route only into a fully connected class layer; Hinton et al.
  normalize a child's assignments over every parent it votes for.
- Both: poses may be matrices or vectors, as in `jaxcaps.routing`.
  Dynamic routing with matrix poses (votes p_i W_ij with sqrt(d) x sqrt(d)
  W_ij, squash over all d numbers) is our extension; so is EM routing with
  vector poses.
- Dynamic: squash and lengths use sqrt(|s|^2 + eps), so their gradients
  stay finite at s = 0. No reconstruction decoder or its loss.
- EM: a fully connected layer after a convolutional one gives every
  (position, type) child its own W, as the inverted model does, so there
  is no position-shared class layer and no coordinate addition.
- EM: the cost uses each parent's assigned mass per child, sum_i R_ij / N,
  rather than the sum: the paper's formula with lambda / N and N beta_a,
  so that one lambda suits layers of any fan-in instead of saturating the
  sigmoid of a layer with many children.
- EM: the paper gives no inverse temperature schedule; here lambda rises
  linearly to `inverse_temperature` (default 1) at the last iteration.
- EM: eps is added to every variance and to the assigned mass sum_i R_ij
  in the means, so a parent that no active child votes for stays finite.
- EM: beta_u and beta_a are one learned number per parent type, shared by
  all positions.
- EM: the spread loss takes its margin as an argument; `spread_margin` is a
  linear ramp from 0.2 to 0.9 for the trainer to feed it.
"""

from collections.abc import Callable
import functools
import math

import jax
import jax.numpy as jnp
import optax

from jaxcaps import routing as routing_lib

Array = jax.Array
# The routings one capsule architecture can run; 'inverted' is
# jaxcaps.routing.
ROUTINGS = ('inverted', 'dynamic', 'em')

# Sabour et al.'s margin loss constants.
MARGIN_PLUS, MARGIN_MINUS, ABSENT_WEIGHT = 0.9, 0.1, 0.5
# Hinton et al.'s spread loss margin, from the start to the end of training.
SPREAD_MARGIN_START, SPREAD_MARGIN_END = 0.2, 0.9


def _pose_ndim(matrix_pose: bool) -> int:
  return 2 if matrix_pose else 1


def _pose_axes(matrix_pose: bool) -> tuple[int, ...]:
  return tuple(range(-_pose_ndim(matrix_pose), 0))


def _weighted_sum_equation(matrix_pose: bool) -> str:
  """Einsum of (..., N, M) weights and (..., N, M, *P) votes over i."""
  pose = 'ad' if matrix_pose else 'd'
  return f'...nm,...nm{pose}->...m{pose}'


def _check_num_routing(num_routing: int) -> None:
  if num_routing < 1:
    raise ValueError(f'num_routing must be at least 1 (1 is the uniform '
                     f'pass alone), got {num_routing}.')


def _window_votes(child_pose: Array, weight: Array, stride: int,
                  matrix_pose: bool) -> Array:
  """(..., H', W', k * k * N, M, *P) votes, window entries as children."""
  # NOTE: all votes of the layer exist at once (batch x H' x W' x k^2 N x M
  # x d numbers); routing.py's chunked scan is not done here, so large conv
  # layers need small batches.
  votes = routing_lib.conv_votes(child_pose, weight, stride=stride,
                                 matrix_pose=matrix_pose)
  split = votes.ndim - 4 - _pose_ndim(matrix_pose)
  return votes.reshape(votes.shape[:split] + (-1,) + votes.shape[split + 3:])


def _unflatten_windows(couplings: Array, weight: Array) -> Array:
  """(..., k * k * N, M) -> (..., k, k, N, M)."""
  kernel, _, num_in = weight.shape[:3]
  return couplings.reshape(couplings.shape[:-2]
                           + (kernel, kernel, num_in, couplings.shape[-1]))


# ----------------------------------------------------------- dynamic routing


def squash(s: Array, *, matrix_pose: bool = False,
           eps: float = 1e-20) -> Array:
  """Sabour et al.'s squash, |s|^2 / (1 + |s|^2) * s / |s|, per pose.

  Args:
    s: (..., *P) capsule inputs.
    matrix_pose: whether each pose is a matrix rather than a d-vector; the
      norm runs over all d numbers either way.
    eps: added to |s|^2 under the square root (our addition), so that the
      gradient at s = 0 is finite; it changes |v| by a fraction of about
      eps / (2 |s|^2).

  Returns:
    (..., *P) outputs, each of length |s|^2 / (1 + |s|^2) < 1.
  """
  sq_norm = jnp.square(s).sum(_pose_axes(matrix_pose), keepdims=True)
  # The length factor over |s| simplifies to |s| / (1 + |s|^2).
  return s * jnp.sqrt(sq_norm + eps) / (1 + sq_norm)


def capsule_length(pose: Array, *, matrix_pose: bool = False,
                   eps: float = 1e-20) -> Array:
  """Length of each capsule, sqrt(|v|^2 + eps) (eps: finite gradients).

  Args:
    pose: (..., *P) capsule outputs.
    matrix_pose: whether P is (s, s) rather than (d,).
    eps: added under the square root.

  Returns:
    (...) lengths; for dynamic routing's class capsules, the class scores.
  """
  return jnp.sqrt(jnp.square(pose).sum(_pose_axes(matrix_pose)) + eps)


def dynamic_routing(votes: Array, num_routing: int, *,
                    matrix_pose: bool = False) -> tuple[Array, Array]:
  """Dynamic routing of given votes, `num_routing` iterations.

  Gradients flow through every iteration (the paper does not say
  otherwise).

  Args:
    votes: (..., N, M, *P) votes u_ij of N children for M parents.
    num_routing: iterations, >= 1; 1 is the uniform couplings alone, the
      paper uses 3.
    matrix_pose: whether P is (s, s) rather than (d,).

  Returns:
    (parent outputs v_j (..., M, *P), couplings c_ij (..., N, M) of the last
    iteration, each child's summing to one over the parents).
  """
  _check_num_routing(num_routing)
  pose_ndim = _pose_ndim(matrix_pose)
  logits = jnp.zeros(votes.shape[:votes.ndim - pose_ndim], votes.dtype)
  for t in range(num_routing):
    couplings = jax.nn.softmax(logits, axis=-1)
    summed = jnp.einsum(_weighted_sum_equation(matrix_pose), couplings,
                        votes)
    parent = squash(summed, matrix_pose=matrix_pose)
    if t + 1 < num_routing:
      # Unlike the inverted routing's agreement, the dot is not scaled.
      logits = logits + (votes * jnp.expand_dims(parent, -2 - pose_ndim)
                         ).sum(_pose_axes(matrix_pose))
  return parent, couplings


def dynamic_fc_routing(child_pose: Array, weight: Array, num_routing: int,
                       *, matrix_pose: bool = False) -> tuple[Array, Array]:
  """Dynamic routing of a fully connected capsule layer.

  Args:
    child_pose: (..., N, *P) child capsules (already squashed).
    weight: (N, M, d_in, d_out) or (N, M, s, s) transforms.
    num_routing: iterations, >= 1.
    matrix_pose: whether poses are matrices.

  Returns:
    (parents (..., M, *P), couplings (..., N, M)); see `dynamic_routing`.
  """
  votes = routing_lib.fc_votes(child_pose, weight, matrix_pose=matrix_pose)
  return dynamic_routing(votes, num_routing, matrix_pose=matrix_pose)


def dynamic_conv_routing(child_pose: Array, weight: Array, num_routing: int,
                         *, stride: int, matrix_pose: bool = False,
                         impl: str = 'chunked') -> tuple[Array, Array]:
  """Dynamic routing of a convolutional capsule layer (our variant).

  The logits b_ij are sums of agreements <u_ij, v_j> with every earlier
  iteration's parents, so they equal one agreement with the running sum of
  those parents. The 'chunked' implementation uses that to route one
  kernel offset at a time (`routing.conv_vote_sum`), never holding all the
  votes; 'reference' builds them all and calls `dynamic_routing`.

  Args:
    child_pose: (..., H, W, N, *P) child capsules.
    weight: (k, k, N, d_in, d_out, M) or (k, k, N, s, s, M) transforms,
      shared by all positions.
    num_routing: iterations, >= 1.
    stride: step between windows.
    matrix_pose: whether poses are matrices.
    impl: 'chunked' or 'reference', as for the inverted routing.

  Returns:
    (parents (..., H', W', M, *P), couplings (..., H', W', k, k, N, M)):
    each window entry's couplings sum to one over the parent types of its
    own output position only. The chunked path builds the couplings from
    all votes only if the caller uses them (XLA drops them otherwise).
  """
  if impl not in routing_lib.CONV_IMPLS:
    raise ValueError(f'Unknown conv capsule impl {impl!r}; choose one of '
                     f'{routing_lib.CONV_IMPLS}.')
  if impl == 'reference':
    votes = _window_votes(child_pose, weight, stride, matrix_pose)
    parent, couplings = dynamic_routing(votes, num_routing,
                                        matrix_pose=matrix_pose)
    return parent, _unflatten_windows(couplings, weight)
  _check_num_routing(num_routing)
  # routing.agreement divides by sqrt(d); dynamic routing's dot does not.
  unscale = math.sqrt(math.prod(child_pose.shape[child_pose.ndim
                                                  - _pose_ndim(matrix_pose):]))
  history = None  # sum of the earlier iterations' parents
  for t in range(num_routing):
    logit_parent = None if history is None else history * unscale
    parent = squash(routing_lib.conv_vote_sum(
        child_pose, weight, logit_parent, stride=stride,
        matrix_pose=matrix_pose), matrix_pose=matrix_pose)
    if t + 1 < num_routing:
      history = parent if history is None else history + parent
  couplings = routing_lib.conv_couplings(child_pose, weight, logit_parent,
                                         stride=stride,
                                         matrix_pose=matrix_pose)
  return parent, couplings


# ---------------------------------------------------------------- EM routing


def em_inverse_temperatures(num_routing: int,
                            final: float = 1.0) -> list[float]:
  """lambda of each M-step: a linear ramp up to `final` (our schedule)."""
  _check_num_routing(num_routing)
  return [final * (t + 1) / num_routing for t in range(num_routing)]


def _em_m_step(votes: Array, weighted: Array, beta_u: Array, beta_a: Array,
               inverse_temperature: float,
               eps: float) -> tuple[Array, Array, Array]:
  """Gaussians and activation logits of the parents.

  Args:
    votes: (..., N, M, d) flattened votes.
    weighted: (..., N, M) assignments times child activations.
    beta_u, beta_a: (M,) learned costs.
    inverse_temperature: lambda.
    eps: added to the assigned mass and to the variances.

  Returns:
    (means (..., M, d), variances (..., M, d), activation logits (..., M)).
  """
  mass = weighted.sum(-2)
  share = weighted / (mass[..., None, :] + eps)
  mean = jnp.einsum('...nm,...nmd->...md', share, votes)
  deviation = jnp.square(votes - mean[..., None, :, :])
  variance = jnp.einsum('...nm,...nmd->...md', share, deviation) + eps
  log_std = 0.5 * jnp.log(variance)
  # Mass per child, not the paper's sum: the sum grows with N (see above).
  mass_per_child = mass / votes.shape[-3]
  cost = ((beta_u[:, None] + log_std) * mass_per_child[..., None]).sum(-1)
  return mean, variance, inverse_temperature * (beta_a - cost)


def _em_e_step(votes: Array, mean: Array, variance: Array,
               activation_logit: Array) -> Array:
  """log R_ij: log a_j + log p_j(V_ij), log-normalized over the parents."""
  mean, variance = mean[..., None, :, :], variance[..., None, :, :]
  log_density = -0.5 * (jnp.log(2 * math.pi * variance)
                        + jnp.square(votes - mean) / variance).sum(-1)
  log_activation = jax.nn.log_sigmoid(activation_logit)[..., None, :]
  return jax.nn.log_softmax(log_activation + log_density, axis=-1)


def em_routing(votes: Array, child_activation: Array, beta_u: Array,
               beta_a: Array, num_routing: int, *,
               inverse_temperature: float = 1.0, matrix_pose: bool = True,
               eps: float = 1e-6) -> tuple[Array, Array, Array]:
  """EM routing of given votes: `num_routing` M-steps, E-steps between.

  Gradients flow through every iteration (the paper does not say
  otherwise).

  Args:
    votes: (..., N, M, *P) votes V_ij.
    child_activation: (..., N) child activations a_i in [0, 1].
    beta_u: (M,) cost per pose number of describing a parent's votes.
    beta_a: (M,) cost offset of activating a parent.
    num_routing: iterations, >= 1; 1 is one M-step from uniform
      assignments, the paper uses 3.
    inverse_temperature: lambda of the last M-step; earlier ones ramp up to
      it linearly (see `em_inverse_temperatures`).
    matrix_pose: whether P is (s, s) rather than (d,).
    eps: added to variances and to the assigned mass (see module notes).

  Returns:
    (parent poses mu_j (..., M, *P), parent activations a_j (..., M),
    assignments R_ij (..., N, M) used by the last M-step, each child's
    summing to one over the parents, before its activation weighs them).
  """
  pose_ndim = _pose_ndim(matrix_pose)
  pose_shape = votes.shape[votes.ndim - pose_ndim:]
  votes = votes.reshape(votes.shape[:votes.ndim - pose_ndim] + (-1,))
  num_parents = votes.shape[-2]
  assignments = jnp.full(votes.shape[:-1], 1.0 / num_parents, votes.dtype)
  temperatures = em_inverse_temperatures(num_routing, inverse_temperature)
  for t, temperature in enumerate(temperatures):
    mean, variance, logit = _em_m_step(
        votes, assignments * child_activation[..., None], beta_u, beta_a,
        temperature, eps)
    if t + 1 < num_routing:
      assignments = jnp.exp(_em_e_step(votes, mean, variance, logit))
  parent_pose = mean.reshape(mean.shape[:-1] + pose_shape)
  return parent_pose, jax.nn.sigmoid(logit), assignments


def em_fc_routing(child_pose: Array, child_activation: Array, weight: Array,
                  beta_u: Array, beta_a: Array, num_routing: int, *,
                  inverse_temperature: float = 1.0, matrix_pose: bool = True,
                  eps: float = 1e-6) -> tuple[Array, Array, Array]:
  """EM routing of a fully connected capsule layer.

  Args:
    child_pose: (..., N, *P) child poses.
    child_activation: (..., N) child activations.
    weight: (N, M, s, s) or (N, M, d_in, d_out) transforms.
    beta_u, beta_a: (M,) learned costs.
    num_routing: iterations, >= 1.
    inverse_temperature: lambda of the last M-step.
    matrix_pose: whether poses are matrices.
    eps: see `em_routing`.

  Returns:
    (poses (..., M, *P), activations (..., M), assignments (..., N, M)).
  """
  votes = routing_lib.fc_votes(child_pose, weight, matrix_pose=matrix_pose)
  return em_routing(votes, child_activation, beta_u, beta_a, num_routing,
                    inverse_temperature=inverse_temperature,
                    matrix_pose=matrix_pose, eps=eps)


def em_conv_routing(child_pose: Array, child_activation: Array,
                    weight: Array, beta_u: Array, beta_a: Array,
                    num_routing: int, *, stride: int,
                    inverse_temperature: float = 1.0,
                    matrix_pose: bool = True, eps: float = 1e-6,
                    impl: str = 'chunked') -> tuple[Array, Array, Array]:
  """EM routing of a convolutional capsule layer.

  The M-step needs the votes only through sums over the children, so the
  'chunked' implementation accumulates them one kernel offset at a time
  (`routing.conv_offset_scan`), in two passes per M-step: the assigned
  mass and the weighted vote sum (hence the means), then the weighted
  squared deviations from those means (the variances). The E-step's
  assignments are recomputed inside each pass from the previous M-step's
  Gaussians. 'reference' builds all votes and calls `em_routing`.

  Args:
    child_pose: (..., H, W, N, *P) child poses.
    child_activation: (..., H, W, N) child activations.
    weight: (k, k, N, s, s, M) or (k, k, N, d_in, d_out, M) transforms,
      shared by all positions.
    beta_u, beta_a: (M,) learned costs, shared by all positions.
    num_routing: iterations, >= 1.
    stride: step between windows.
    inverse_temperature: lambda of the last M-step.
    matrix_pose: whether poses are matrices.
    eps: see `em_routing`.
    impl: 'chunked' or 'reference', as for the inverted routing.

  Returns:
    (poses (..., H', W', M, *P), activations (..., H', W', M), assignments
    (..., H', W', k, k, N, M)). Unlike the paper, a window entry's
    assignments sum to one over its own output position's parents. The
    chunked path builds the assignments from all votes only if the caller
    uses them.
  """
  if impl not in routing_lib.CONV_IMPLS:
    raise ValueError(f'Unknown conv capsule impl {impl!r}; choose one of '
                     f'{routing_lib.CONV_IMPLS}.')
  if impl == 'reference':
    votes = _window_votes(child_pose, weight, stride, matrix_pose)
    # Activations as 1-vector poses, to cut them into the same windows.
    windows = routing_lib.conv_windows(child_activation[..., None],
                                       weight.shape[0], stride,
                                       matrix_pose=False)
    pose, parent_activation, assignments = em_routing(
        votes, windows.reshape(windows.shape[:-4] + (-1,)), beta_u, beta_a,
        num_routing, inverse_temperature=inverse_temperature,
        matrix_pose=matrix_pose, eps=eps)
    return pose, parent_activation, _unflatten_windows(assignments, weight)

  pose_ndim = _pose_ndim(matrix_pose)
  pose_shape = child_pose.shape[child_pose.ndim - pose_ndim:]
  kernel, _, num_in = weight.shape[:3]
  num_parents = weight.shape[-1]
  h_axis = child_pose.ndim - 3 - pose_ndim
  out_hw = tuple(routing_lib.conv_output_size(child_pose.shape[h_axis + i],
                                              kernel, stride)
                 for i in range(2))
  # (..., H', W', M) and (..., H', W', M, d) accumulators.
  lead = child_pose.shape[:h_axis] + out_hw + (num_parents,)
  flat = lead + (math.prod(pose_shape),)
  dtype = jnp.result_type(child_pose, weight)

  def flat_votes(pose, offset_weight):
    votes = routing_lib.fc_votes(pose, offset_weight, matrix_pose=matrix_pose)
    return votes.reshape(votes.shape[:votes.ndim - pose_ndim] + (-1,))

  def weighted_assignments(votes, activation, gaussians):
    if gaussians is None:
      return jnp.broadcast_to(activation[..., None] / num_parents,
                              votes.shape[:-1])
    return jnp.exp(_em_e_step(votes, *gaussians)) * activation[..., None]

  def first_moments(gaussians, total, offset_children, offset_weight):
    votes = flat_votes(offset_children[0], offset_weight)
    weighted = weighted_assignments(votes, offset_children[1], gaussians)
    return (total[0] + weighted.sum(-2),
            total[1] + jnp.einsum('...nm,...nmd->...md', weighted, votes))

  def second_moment(gaussians, mean, total, offset_children, offset_weight):
    votes = flat_votes(offset_children[0], offset_weight)
    weighted = weighted_assignments(votes, offset_children[1], gaussians)
    deviation = jnp.square(votes - mean[..., None, :, :])
    return total + jnp.einsum('...nm,...nmd->...md', weighted, deviation)

  def scan(body, init):
    return routing_lib.conv_offset_scan(
        body, init, (child_pose, child_activation), weight, stride=stride,
        matrix_pose=matrix_pose)

  gaussians = previous = None
  for temperature in em_inverse_temperatures(num_routing,
                                             inverse_temperature):
    mass, weighted_sum = scan(functools.partial(first_moments, gaussians),
                              (jnp.zeros(lead, dtype), jnp.zeros(flat, dtype)))
    mean = weighted_sum / (mass[..., None] + eps)
    deviations = scan(functools.partial(second_moment, gaussians, mean),
                      jnp.zeros(flat, dtype))
    variance = deviations / (mass[..., None] + eps) + eps
    # As in _em_m_step, with the mass per child rather than the sum.
    cost = ((beta_u[:, None] + 0.5 * jnp.log(variance))
            * (mass / (kernel * kernel * num_in))[..., None]).sum(-1)
    logit = temperature * (beta_a - cost)
    previous, gaussians = gaussians, (mean, variance, logit)

  # The last M-step's assignments, from all votes; dead code unless used.
  votes = _window_votes(child_pose, weight, stride, matrix_pose)
  votes = votes.reshape(votes.shape[:votes.ndim - pose_ndim] + (-1,))
  if previous is None:
    assignments = jnp.full(votes.shape[:-1], 1.0 / num_parents, votes.dtype)
  else:
    assignments = jnp.exp(_em_e_step(votes, *previous))
  return (mean.reshape(mean.shape[:-1] + pose_shape), jax.nn.sigmoid(logit),
          _unflatten_windows(assignments, weight))


# --------------------------------------------------------------------- losses


def margin_loss(lengths: Array, labels: Array, *,
                m_plus: float = MARGIN_PLUS, m_minus: float = MARGIN_MINUS,
                absent_weight: float = ABSENT_WEIGHT) -> Array:
  """Sabour et al.'s margin loss, summed over classes, mean over the batch.

  L_k = T_k max(0, m+ - |v_k|)^2 + lambda (1 - T_k) max(0, |v_k| - m-)^2,
  with T_k one for the labelled class only.

  Args:
    lengths: (B, K) class capsule lengths.
    labels: (B,) integer labels.
    m_plus: length a present class should reach.
    m_minus: length an absent class should stay under.
    absent_weight: lambda, the weight of the absent classes' terms.

  Returns:
    The scalar loss.
  """
  present = jax.nn.one_hot(labels, lengths.shape[-1], dtype=lengths.dtype)
  short = jnp.square(jax.nn.relu(m_plus - lengths))
  long = jnp.square(jax.nn.relu(lengths - m_minus))
  per_class = present * short + absent_weight * (1 - present) * long
  return per_class.sum(-1).mean()


def spread_loss(activations: Array, labels: Array,
                margin: float | Array) -> Array:
  """Hinton et al.'s spread loss, summed over classes, mean over the batch.

  L = sum over wrong classes i of max(0, m - (a_t - a_i))^2, with a_t the
  labelled class's activation.

  Args:
    activations: (B, K) class activations.
    labels: (B,) integer labels.
    margin: m, 0.2 early in training rising to 0.9 (see `spread_margin`);
      may be a traced scalar.

  Returns:
    The scalar loss.
  """
  target = jax.nn.one_hot(labels, activations.shape[-1],
                          dtype=activations.dtype)
  target_activation = (activations * target).sum(-1, keepdims=True)
  gap = jax.nn.relu(margin - (target_activation - activations))
  return ((1 - target) * jnp.square(gap)).sum(-1).mean()


def spread_margin(step: int | Array, total_steps: int,
                  start: float = SPREAD_MARGIN_START,
                  end: float = SPREAD_MARGIN_END) -> Array:
  """Spread loss margin at `step`: linear from `start` to `end`, then flat."""
  progress = jnp.clip(jnp.asarray(step, jnp.float32) / total_steps, 0, 1)
  return start + (end - start) * progress


def cross_entropy(logits: Array, labels: Array) -> Array:
  """Softmax cross-entropy with integer labels, mean over the batch."""
  return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                         labels).mean()


def loss_for(routing: str, *, margin: float | Array | None = None
             ) -> Callable[[Array, Array], Array]:
  """The loss that trains a CapsNet with the given routing.

  Args:
    routing: 'inverted' (cross-entropy on logits), 'dynamic' (margin loss
      on class capsule lengths) or 'em' (spread loss on class activations).
    margin: the spread loss margin, for 'em' only; None means the final
      0.9. Pass `spread_margin(step, total_steps)` to follow the paper.

  Returns:
    A function (model outputs (B, K), integer labels (B,)) -> scalar loss.
  """
  if routing not in ROUTINGS:
    raise ValueError(f'Unknown routing {routing!r}; choose one of '
                     f'{ROUTINGS}.')
  if margin is not None and routing != 'em':
    raise ValueError(f'Only the spread loss of em routing takes a margin; '
                     f'drop margin={margin!r} for routing {routing!r}.')
  if routing == 'inverted':
    return cross_entropy
  if routing == 'dynamic':
    return margin_loss
  margin = SPREAD_MARGIN_END if margin is None else margin
  return lambda activations, labels: spread_loss(activations, labels, margin)
