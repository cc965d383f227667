"""The comparison's methods as configs: one budget, each method's phases."""

import importlib.util
import pathlib

import pytest

from jaxswap import config as config_lib
from jaxswap import methods

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config_module(name):
  spec = importlib.util.spec_from_file_location(
      f'{name}_config', ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _epochs(c):
  """Epochs each example is seen by one model (phase 2 per replica)."""
  return c.phase1.max_epochs + (c.phase2.epochs if c.phase2.replicas else 0)


@pytest.mark.parametrize('name,arg_prefix,devices', [
    ('compare_fashion_mnist', '', 1), ('compare_cifar10', '', 1),
    ('swap_cifar', 'cifar10,', 8), ('swap_cifar', 'cifar100,', 8),
    ('swap_imagenet', '', 8), ('swap_imagenet', '', 32)])
def test_every_method_is_a_valid_config_on_one_budget(name, arg_prefix,
                                                       devices):
  module = _config_module(name)
  b = module.BUDGET
  configs = {m: module.get_config(arg_prefix + m) for m in methods.METHODS}
  for c in configs.values():
    config_lib.validate(c, num_devices=devices)
    assert _epochs(c) == b.epochs
  # Everything but the phases is shared.
  phases = ('phase1.', 'phase2.')
  shared = [{k: v for k, v in config_lib.flatten(c).items()
             if not k.startswith(phases) and k != 'phase1.warmup_epochs'}
            for c in configs.values()]
  assert all(s == shared[0] for s in shared)

  small, large, swa, swap = (configs[m] for m in methods.METHODS)
  assert (small.phase1.batch_size, small.phase1.peak_lr,
          small.phase2.replicas) == (b.small_batch, b.small_lr, 0)
  assert (large.phase1.batch_size, large.phase1.peak_lr,
          large.phase2.replicas) == (b.large_batch, b.large_lr, 0)
  assert large.phase1.stop_accuracy is None
  # SWA: small-batch SGD decaying to the flat rate of a one-replica tail
  # that averages twice an epoch.
  assert swa.phase1.batch_size == swa.phase2.batch_size == b.small_batch
  assert (swa.phase1.final_lr, swa.phase2.peak_lr,
          swa.phase2.final_lr) == (b.swa_lr,) * 3
  assert swa.phase2.replicas == 1
  assert swa.phase2.swa_every_steps == b.train_size // (2 * b.small_batch)
  # SWAP: large batch to the stopping accuracy, then W small-batch replicas.
  assert (swap.phase1.batch_size, swap.phase1.stop_accuracy) == (
      b.large_batch, b.stop_accuracy)
  assert (swap.phase2.replicas, swap.phase2.batch_size,
          swap.phase2.peak_lr, swap.phase2.swa_every_steps) == (
              b.replicas, b.small_batch, b.small_lr, 0)


def test_fashion_mnist_swa_averages_every_234_steps():
  c = _config_module('compare_fashion_mnist').get_config('swa')
  assert (c.phase1.max_epochs, c.phase2.epochs,
          c.phase2.swa_every_steps) == (8.0, 2.0, 234)


@pytest.mark.parametrize('module,arg', [
    ('compare_fashion_mnist', 'sgd'), ('compare_cifar10', 'swag'),
    ('swap_cifar', 'cifar10,sgd'), ('swap_cifar', 'imagenet,swap'),
    ('swap_cifar', 'swap')])
def test_an_unknown_method_or_data_set_names_the_choices(module, arg):
  with pytest.raises(ValueError, match='sgd_small'):
    _config_module(module).get_config(arg)
