r"""Runs the SWAP comparison: each method over seeds, then a table.

  python scripts/compare_methods.py \
      --config configs/compare_fashion_mnist.py \
      --methods sgd_small,sgd_large,swa,swap --seeds 0,1,2 \
      --root runs/compare_fmnist --target 0.92

Each (method, seed) is one run of the main job in its own work directory
under --root (so an interrupted comparison resumes run by run). The table
(Markdown and JSON in --root) gives test accuracy mean and standard
deviation, wall time, images per second, the wall time to reach --target
test accuracy, and for SWAP each replica's accuracy beside the average.
"""

import json
import pathlib
import subprocess
import sys

from absl import app
from absl import flags
import numpy as np

FLAGS = flags.FLAGS


def _define_flags():
  # Defined only when run as a script, so that tests can import the table
  # beside other scripts that also take --config.
  flags.DEFINE_string('config', 'configs/compare_fashion_mnist.py',
                      'Config file taking the method as its argument.')
  flags.DEFINE_list('methods', ['sgd_small', 'sgd_large', 'swa', 'swap'],
                    'Methods, as config arguments.')
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds.')
  flags.DEFINE_string('root', 'runs/compare', 'Folder of the work dirs.')
  flags.DEFINE_float('target', 0.92, 'Test accuracy for time-to-accuracy.')
  flags.DEFINE_multi_string(
      'override', [], 'Extra --config.KEY=VALUE overrides for every run, '
      'e.g. phase1.max_epochs=2')


def _run(method: str, seed: str) -> pathlib.Path:
  workdir = pathlib.Path(FLAGS.root) / f'{method}_seed{seed}'
  if (workdir / 'summary.json').exists():
    return workdir  # finished: the trainer writes its summary last
  cmd = [sys.executable, '-m', 'jaxswap.main',
         f'--config={FLAGS.config}:{method}', f'--workdir={workdir}',
         f'--config.seed={seed}', '--config.train.progress=log']
  cmd += [f'--config.{o}' for o in FLAGS.override]
  print('+', ' '.join(cmd), flush=True)
  subprocess.run(cmd, check=True)
  return workdir


def _time_to(workdir: pathlib.Path, target: float) -> float | None:
  """Run wall time of the first test evaluation at or above `target`."""
  for line in (workdir / 'metrics.jsonl').read_text().splitlines():
    row = json.loads(line)
    if any(k.endswith('/test_accuracy') and '/replica' not in k
           and v >= target for k, v in row.items()):
      return row['wall_time']
  return None


def summarize(results: dict[str, list[dict]], target: float) -> str:
  """Markdown table of the runs."""
  lines = [
      f'| method | test accuracy (mean ± sd) | wall time (s) | images/s '
      f'| time to {target:.2%} (s) | SWAP replicas |',
      '| --- | ---: | ---: | ---: | ---: | --- |']
  for method, runs in results.items():
    acc = np.array([r['final']['test_accuracy'] for r in runs])
    secs = np.array([r['total_seconds'] for r in runs])
    ips = np.array([r['phase1']['images_per_second'] or 0 for r in runs])
    reach = [r['time_to_target'] for r in runs]
    reach_s = ('never' if all(t is None for t in reach) else
               f'{np.mean([t for t in reach if t is not None]):.0f}'
               f' ({sum(t is not None for t in reach)}/{len(reach)})')
    replicas = '; '.join(
        ' '.join(f'{a:.4f}' for a in r['phase2']['replica_test_accuracy'])
        for r in runs if r.get('phase2', {}).get('replicas', 1) > 1)
    sd = acc.std(ddof=1) if len(acc) > 1 else 0.0
    lines.append(
        f'| {method} | {acc.mean():.4f} ± {sd:.4f} | {secs.mean():.0f} '
        f'| {ips.mean():.0f} | {reach_s} | {replicas} |')
  return '\n'.join(lines)


def main(argv):
  del argv
  results = {}
  for method in FLAGS.methods:
    results[method] = []
    for seed in FLAGS.seeds:
      workdir = _run(method, seed)
      summary = json.loads((workdir / 'summary.json').read_text())
      summary['time_to_target'] = _time_to(workdir, FLAGS.target)
      summary['workdir'] = str(workdir)
      results[method].append(summary)
  table = summarize(results, FLAGS.target)
  root = pathlib.Path(FLAGS.root)
  (root / 'comparison.md').write_text(table + '\n')
  (root / 'comparison.json').write_text(json.dumps(results, indent=1))
  print(table)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
