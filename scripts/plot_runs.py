r"""Figures of SWAP runs from their metrics.jsonl files (matplotlib, PNG).

  # Learning rate and test accuracy against wall time, per phase-2 replica
  # and for the average (the paper's figure of the workers' schedules):
  python scripts/plot_runs.py replicas --workdir runs/swap --out fig1.png

  # Test accuracy against wall time for several runs on one axis:
  python scripts/plot_runs.py methods --out fig3.png \
      runs/compare/sgd_small_seed0 runs/compare/swap_seed0 ...

Test accuracy during training needs `config.eval.every_epochs` > 0.
"""

import json
import pathlib
import sys

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position


def read_metrics(workdir: pathlib.Path) -> list[dict]:
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  return [json.loads(l) for l in path.read_text().splitlines()
          if l.startswith('{"step"')]


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
  """(wall times, values) of the rows that have `key`."""
  pairs = [(r['wall_time'], r[key]) for r in rows
           if key in r and 'wall_time' in r]
  return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_replicas(workdir: pathlib.Path, out: str) -> None:
  """Figure 1: each phase-2 replica's rate and test accuracy over time."""
  rows = read_metrics(workdir)
  keys = sorted({k for r in rows for k in r
                 if k.startswith('phase2/replica') and k.endswith('/lr')})
  fig, (ax_lr, ax_acc) = plt.subplots(2, 1, sharex=True, figsize=(7, 6))
  ax_lr.plot(*series(rows, 'phase1/lr'), color='k', label='phase 1')
  ax_acc.plot(*series(rows, 'phase1/test_accuracy'), 'k.-',
              label='phase 1')
  for key in keys:
    name = key.split('/')[1]
    ax_lr.plot(*series(rows, key), label=name, alpha=0.7)
    ax_acc.plot(*series(rows, f'phase2/{name}/test_accuracy'), '.-',
                label=name, alpha=0.7)
  t, acc = series(rows, 'final/test_accuracy')
  ax_acc.plot(t, acc, 'r*', markersize=14, label='average')
  ax_lr.set_ylabel('learning rate')
  ax_acc.set_ylabel('test accuracy')
  ax_acc.set_xlabel('wall time (s)')
  ax_lr.legend(fontsize=7)
  ax_acc.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=120)


def plot_methods(workdirs: list[str], out: str) -> None:
  """Figure 3: test accuracy against wall time for several runs."""
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for workdir in workdirs:
    rows = read_metrics(pathlib.Path(workdir))
    times, accs = [], []
    for r in rows:
      acc = [v for k, v in r.items() if k.endswith('/test_accuracy')
             and '/replica' not in k]
      if acc and 'wall_time' in r:
        times.append(r['wall_time'])
        accs.append(acc[0])
    ax.plot(times, accs, '.-', label=pathlib.Path(workdir).name)
  ax.set_xlabel('wall time (s)')
  ax.set_ylabel('test accuracy')
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out, dpi=120)


def main(argv: list[str]) -> int:
  if len(argv) < 2 or argv[1] not in ('replicas', 'methods'):
    print(__doc__)
    return 2
  args = argv[2:]
  out = args[args.index('--out') + 1] if '--out' in args else 'figure.png'
  if argv[1] == 'replicas':
    plot_replicas(pathlib.Path(args[args.index('--workdir') + 1]), out)
  else:
    rest = [a for i, a in enumerate(args)
            if a != '--out' and (i == 0 or args[i - 1] != '--out')]
    plot_methods(rest, out)
  print(f'wrote {out}')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
