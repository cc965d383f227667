"""The SWAP comparison's table, from finished runs' summaries and metrics."""

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def compare():
  spec = importlib.util.spec_from_file_location(
      'compare_methods', ROOT / 'scripts' / 'compare_methods.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _workdir(tmp_path, name, rows):
  workdir = tmp_path / name
  workdir.mkdir()
  (workdir / 'metrics.jsonl').write_text(
      ''.join(json.dumps({'step': i, **row}) + '\n'
              for i, row in enumerate(rows)))
  return workdir


def test_time_to_target_reads_the_first_model_test_accuracy(compare,
                                                            tmp_path):
  workdir = _workdir(tmp_path, 'swap', [
      {'phase1/test_accuracy': 0.80, 'wall_time': 10.0},
      # A replica past the target is not the model past it.
      {'phase2/replica0/test_accuracy': 0.95, 'wall_time': 20.0},
      {'phase2/test_accuracy': 0.93, 'wall_time': 30.0},
      {'final/test_accuracy': 0.94, 'wall_time': 40.0}])
  assert compare._time_to(workdir, 0.92) == 30.0
  assert compare._time_to(workdir, 0.99) is None


def test_the_table_gives_mean_sd_time_and_each_replica(compare):
  def run(acc, secs, ips, reach, replicas=None):
    summary = {'final': {'test_accuracy': acc}, 'total_seconds': secs,
               'phase1': {'images_per_second': ips},
               'time_to_target': reach}
    if replicas:
      summary['phase2'] = {'replicas': len(replicas),
                           'replica_test_accuracy': replicas}
    return summary
  table = compare.summarize({
      'sgd_small': [run(0.93, 300.0, 1900.0, 240.0),
                    run(0.95, 320.0, 1800.0, None)],
      'swap': [run(0.92, 480.0, 2000.0, None, [0.91, 0.915])],
  }, target=0.92)
  lines = table.splitlines()
  assert 'time to 92.00% (s)' in lines[0]
  # Mean 0.94, sample sd 0.0141; the time to target over the 1 of 2 runs
  # that reached it.
  assert lines[2] == ('| sgd_small | 0.9400 ± 0.0141 | 310 | 1850 '
                      '| 240 (1/2) |  |')
  assert lines[3] == ('| swap | 0.9200 ± 0.0000 | 480 | 2000 | never '
                      '| 0.9100 0.9150 |')
