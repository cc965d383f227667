r"""The capsule paper's routing comparison: three routings and ResNet-18.

  python scripts/routing_compare.py --datasets mnist,cifar10 \
      --models inverted,dynamic,em,resnet18 --seeds 0,1,2 \
      --iterations 1,2,3,4 --root runs/routing_compare

Every (dataset, model, seed) is one run of the main job,
`--config configs/routing_compare.py:DATASET,MODEL`, in its own work
directory under --root, so an interrupted comparison resumes run by run.
The inverted routing is also trained with each number of routing
iterations in --iterations (seed --ablation_seed; 2, the default, is the
main grid's run). The script writes `routing.md` and `routing.json` in
--root and prints the tables:

- test accuracy, mean and standard deviation over the seeds;
- parameters;
- training images per second (phase 1's steps, compilation excluded);
- peak memory: the resident set of the training process at its largest
  (os.wait4's ru_maxrss: the data, the runtime and XLA's buffers), and
  the compiled training step's own bytes as XLA plans them
  (`--dry_run`'s bytes_per_device: arguments, outputs and temporaries).

Wall-clock figures move with whatever else shares the machine; run it on
a quiet one.
"""

import json
import os
import pathlib
import subprocess
import sys

from absl import app
from absl import flags
import numpy as np

FLAGS = flags.FLAGS

_ITERATIONS_KEY = 'model.capsule.num_routing'


def _define_flags():
  # Defined only when run as a script, so that tests can import the
  # tables beside other scripts that also take --config.
  flags.DEFINE_string('config', 'configs/routing_compare.py',
                      'Config file taking DATASET,MODEL as its argument.')
  flags.DEFINE_list('datasets', ['mnist', 'cifar10'], 'Data sets.')
  flags.DEFINE_list('models', ['inverted', 'dynamic', 'em', 'resnet18'],
                    'Models: routings and the CNN baseline.')
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds of the main grid.')
  flags.DEFINE_list('iterations', ['1', '2', '3', '4'],
                    'Routing iterations of the inverted-routing ablation; '
                    'empty to skip it.')
  flags.DEFINE_string('ablation_seed', '0', 'Seed of the ablation runs.')
  flags.DEFINE_string('root', 'runs/routing_compare', 'Folder of the runs.')
  flags.DEFINE_multi_string('override', [], 'Extra --config.KEY=VALUE '
                            'overrides for every run, e.g. phase1.max_epochs=1')


def _main_job(config_arg: str, extra: list[str]) -> list[str]:
  return ([sys.executable, '-m', 'jaxswap.main',
           f'--config={FLAGS.config}:{config_arg}']
          + extra + [f'--config.{o}' for o in FLAGS.override])


def _train(workdir: pathlib.Path, config_arg: str,
           extra: list[str]) -> dict:
  """Trains (or resumes) one run; returns its summary and peak memory.

  A run with its summary and memory already written (the trainer writes
  summary.json last) is read back without starting a process.
  """
  measured = workdir / 'peak_memory.json'
  if measured.exists() and (workdir / 'summary.json').exists():
    summary = json.loads((workdir / 'summary.json').read_text())
    summary.update(json.loads(measured.read_text()))
    return summary
  cmd = _main_job(config_arg, [f'--workdir={workdir}'] + extra)
  print('+', ' '.join(cmd), flush=True)
  process = subprocess.Popen(cmd)
  _, status, usage = os.wait4(process.pid, 0)
  process.returncode = os.waitstatus_to_exitcode(status)
  if process.returncode:
    raise subprocess.CalledProcessError(process.returncode, cmd)
  summary = json.loads((workdir / 'summary.json').read_text())
  if not measured.exists():
    # A resumed run's process is not the one that trained; keep the first
    # complete measurement (ru_maxrss is in KiB on Linux).
    measured.write_text(json.dumps({'peak_rss_bytes':
                                    usage.ru_maxrss * 1024}))
  summary.update(json.loads(measured.read_text()))
  return summary


def _step_bytes(workdir: pathlib.Path, config_arg: str,
                extra: list[str]) -> int | None:
  """XLA's bytes for the compiled training step, from --dry_run.

  Kept in the run's work directory (step_bytes.json), as the peak memory
  is, so that a rerun of the script compiles nothing again.
  """
  saved = workdir / 'step_bytes.json'
  if saved.exists():
    return json.loads(saved.read_text())['bytes_per_device']
  cmd = _main_job(config_arg, ['--dry_run'] + extra)
  out = subprocess.run(cmd, check=True, capture_output=True, text=True)
  step_bytes = json.loads(out.stdout[out.stdout.index('{'):])[
      'phase1']['bytes_per_device']
  saved.write_text(json.dumps({'bytes_per_device': step_bytes}))
  return step_bytes


def _row(runs: list[dict]) -> dict:
  acc = np.array([r['final']['test_accuracy'] for r in runs])
  return {
      'seeds': len(runs),
      'test_accuracy_mean': float(acc.mean()),
      'test_accuracy_sd': float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
      'test_accuracy': acc.tolist(),
      'parameters': runs[0]['parameters'],
      'images_per_second': float(np.mean(
          [r['phase1']['images_per_second'] for r in runs])),
      'peak_rss_bytes': max(r['peak_rss_bytes'] for r in runs),
      'step_bytes': runs[0].get('step_bytes'),
      'epochs': runs[0]['phase1']['epochs'],
      'workdirs': [r['workdir'] for r in runs],
  }


def _mib(n: int | None) -> str:
  return '' if n is None else f'{n / 2**20:,.0f}'


def tables(grid: dict, ablation: dict) -> str:
  """Markdown tables of the grid and of the iterations ablation."""
  lines = ['| data | model | test accuracy (mean ± sd) | seeds | parameters '
           '| train images/s | peak RSS (MiB) | XLA step (MiB) |',
           '| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |']
  for (dataset, model), r in grid.items():
    lines.append(
        f'| {dataset} | {model} | {r["test_accuracy_mean"]:.2%} ± '
        f'{r["test_accuracy_sd"]:.2%} | {r["seeds"]} | {r["parameters"]:,} '
        f'| {r["images_per_second"]:,.0f} | {_mib(r["peak_rss_bytes"])} '
        f'| {_mib(r["step_bytes"])} |')
  if ablation:
    lines += ['', '| data | inverted routing iterations | test accuracy '
              '| train images/s | peak RSS (MiB) | XLA step (MiB) |',
              '| --- | ---: | ---: | ---: | ---: | ---: |']
    for (dataset, iterations), r in ablation.items():
      lines.append(
          f'| {dataset} | {iterations} | {r["test_accuracy_mean"]:.2%} '
          f'| {r["images_per_second"]:,.0f} | {_mib(r["peak_rss_bytes"])} '
          f'| {_mib(r["step_bytes"])} |')
  return '\n'.join(lines)


def main(argv):
  del argv
  root = pathlib.Path(FLAGS.root)
  grid, ablation = {}, {}
  for dataset in FLAGS.datasets:
    for model in FLAGS.models:
      arg = f'{dataset},{model}'
      runs = []
      for seed in FLAGS.seeds:
        workdir = root / f'{dataset}_{model}_seed{seed}'
        summary = _train(workdir, arg, [f'--config.seed={seed}'])
        summary['workdir'] = str(workdir)
        runs.append(summary)
      runs[0]['step_bytes'] = _step_bytes(
          pathlib.Path(runs[0]['workdir']), arg, [])
      grid[dataset, model] = _row(runs)
    for iterations in FLAGS.iterations:
      arg = f'{dataset},inverted'
      routing = [f'--config.{_ITERATIONS_KEY}={iterations}']
      name = f'{dataset}_inverted_it{iterations}_seed{FLAGS.ablation_seed}'
      if iterations == '2' and (dataset, 'inverted') in grid and (
          FLAGS.ablation_seed in FLAGS.seeds):
        # The config's default; the same run as the main grid's.
        name = f'{dataset}_inverted_seed{FLAGS.ablation_seed}'
      summary = _train(root / name, arg,
                       routing + [f'--config.seed={FLAGS.ablation_seed}'])
      summary['workdir'] = str(root / name)
      summary['step_bytes'] = _step_bytes(root / name, arg, routing)
      ablation[dataset, int(iterations)] = _row([summary])

  text = tables(grid, ablation)
  root.mkdir(parents=True, exist_ok=True)
  (root / 'routing.md').write_text(text + '\n')
  (root / 'routing.json').write_text(json.dumps(
      {'grid': [{'data': d, 'model': m, **r} for (d, m), r in grid.items()],
       'ablation': [{'data': d, 'iterations': i, **r}
                    for (d, i), r in ablation.items()]}, indent=1))
  print(text)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
