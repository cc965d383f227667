"""Learning-rate schedules of the two training phases, in steps."""

from typing import Callable, Sequence

import jax.numpy as jnp

Schedule = Callable[[jnp.ndarray], jnp.ndarray]


def warmup_then_decay(peak: float, warmup_steps: int, total_steps: int,
                      final: float = 0.0,
                      milestones: Sequence[int] = (),
                      cut: float = 0.1) -> Schedule:
  """Linear warm-up from 0 to `peak`, then a decay.

  The decay is linear to `final` at `total_steps` (the DAWNBench recipe),
  or, when `milestones` are given, piecewise constant: the rate is
  multiplied by `cut` at each milestone step (the capsule paper's recipe).

  Args:
    peak: the rate at the end of the warm-up.
    warmup_steps: steps of the warm-up; 0 starts at `peak`.
    total_steps: the step at which the linear decay reaches `final`.
    final: the rate at `total_steps`.
    milestones: steps at which to cut the rate, instead of a linear decay.
    cut: the factor of each cut.

  Returns:
    A function from a step (int array) to the rate (float32).
  """
  milestones = jnp.asarray(tuple(milestones), jnp.float32)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * (step + 1) / max(warmup_steps, 1)
    if milestones.size:
      after = peak * cut ** jnp.sum(step >= milestones)
    else:
      frac = jnp.clip((step - warmup_steps)
                      / max(total_steps - warmup_steps, 1), 0.0, 1.0)
      after = peak + (final - peak) * frac
    return jnp.where(step < warmup_steps, warm, after)

  return schedule
