"""The routing comparison's configs and its tables."""

import importlib.util
import pathlib

import pytest

from jaxswap import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(path, name):
  spec = importlib.util.spec_from_file_location(name, ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='module')
def configs():
  return _load('configs/routing_compare.py', 'routing_compare_config')


@pytest.fixture(scope='module')
def script():
  return _load('scripts/routing_compare.py', 'routing_compare_script')


def test_every_cell_of_the_grid_is_a_valid_config_with_one_budget(configs):
  budgets = set()
  for dataset in configs.DATASETS:
    for model in configs.MODELS:
      c = configs.get_config(f'{dataset},{model}')
      config_lib.check_keys(c)
      config_lib.validate(c, num_devices=1)
      assert c.data.name == dataset
      if model == 'resnet18':
        assert c.model.name == 'resnet18'
      else:
        assert (c.model.name, c.model.capsule.routing) == ('capsnet', model)
      budgets.add((c.phase1.batch_size, c.phase1.max_epochs,
                   c.phase1.peak_lr, c.optimizer.weight_decay))
  assert len(budgets) == 1


@pytest.mark.parametrize('arg', ['mnist', 'mnist,vgg', 'svhn,em', ''])
def test_a_bad_config_arg_names_the_choices(configs, arg):
  with pytest.raises(ValueError, match='DATASET,MODEL'):
    configs.get_config(arg)


def _row(accs, ips, rss, step):
  return {'seeds': len(accs),
          'test_accuracy_mean': sum(accs) / len(accs),
          'test_accuracy_sd': 0.01, 'parameters': 64241,
          'images_per_second': ips, 'peak_rss_bytes': rss,
          'step_bytes': step}


def test_tables_show_every_cell_and_the_ablation(script):
  grid = {('mnist', 'inverted'): _row([0.9, 0.92], 812.4, 3 * 2**30, None),
          ('cifar10', 'em'): _row([0.3], 90.0, 2**30, 150 * 2**20)}
  ablation = {('mnist', 1): _row([0.85], 1500.0, 2**31, 2**20)}
  text = script.tables(grid, ablation)
  lines = text.splitlines()
  assert lines[2] == ('| mnist | inverted | 91.00% ± 1.00% | 2 | 64,241 '
                      '| 812 | 3,072 |  |')
  assert lines[3] == ('| cifar10 | em | 30.00% ± 1.00% | 1 | 64,241 | 90 '
                      '| 1,024 | 150 |')
  assert lines[-1] == '| mnist | 1 | 85.00% | 1,500 | 2,048 | 1 |'
  assert script.tables(grid, {}).count('\n') == 3


def test_a_finished_run_is_read_back_without_training_or_compiling(
    script, tmp_path):
  (tmp_path / 'summary.json').write_text('{"final": {"test_accuracy": 0.5}}')
  (tmp_path / 'peak_memory.json').write_text('{"peak_rss_bytes": 7}')
  (tmp_path / 'step_bytes.json').write_text('{"bytes_per_device": 9}')
  # Were a process started, --config would be read from the unparsed
  # flags and fail.
  summary = script._train(tmp_path, 'mnist,em', [])
  assert summary == {'final': {'test_accuracy': 0.5}, 'peak_rss_bytes': 7}
  assert script._step_bytes(tmp_path, 'mnist,em', []) == 9
