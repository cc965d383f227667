"""Phase 2 of SWAP: W replicas as one computation against W separate runs.

For W in --replicas, on 1 device and on 8 fake CPU devices (each device
count in its own subprocess, since XLA fixes it when it starts), it times
one phase-2 step of all W replicas, interleaved, three ways:

  vmap      `over_replicas` vmapped: one batched computation (what the
            trainer uses on accelerators, and on the CPU when the replicas
            are one per device);
  unroll    W copies of the step traced into one computation (what the
            trainer uses on the CPU otherwise);
  separate  one replica's step, called W times one after another.

and reports images/s per replica (W * batch / time, divided by W), XLA's
compiled peak memory, the peak resident memory of the process that timed
all modes of a W, and (for --rss_devices) that of a process that only
compiles and runs one mode.

  python scripts/bench/replicas.py --out /tmp/replicas.json
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # pylint: disable=g-import-not-at-top,wrong-import-position

MODES = ('vmap', 'unroll', 'separate')


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--replicas', type=int, nargs='+', default=[1, 2, 4, 8])
  p.add_argument('--devices', type=int, nargs='+', default=[1, 8])
  p.add_argument('--batch', type=int, default=128,
                 help='examples per replica per step (the phase-2 batch)')
  p.add_argument('--width', type=float, default=0.25)
  p.add_argument('--input', default='28x28x1')
  p.add_argument('--rounds', type=int, default=2)
  p.add_argument('--rss_devices', type=int, nargs='*', default=[1],
                 help='device counts whose settings each get a process of '
                 'their own for their peak RSS (each compiles again)')
  p.add_argument('--timeout', type=float, default=900)
  p.add_argument('--out', default=None)
  p.add_argument('--child', default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


# ------------------------------------------------------- in the subprocess


def build(mode, replicas, setting):
  import swap_steps  # pylint: disable=g-import-not-at-top
  shape = tuple(int(v) for v in setting['input'].split('x'))
  model = swap_steps.resnet9(setting['width'])
  w = 1 if mode == 'separate' else replicas
  return swap_steps.PhaseStep(model, w, setting['batch'], shape,
                              unroll=(mode == 'unroll') if w > 1 else True,
                              num_devices=setting['devices'])


def child_time(setting):
  """Every mode of one (devices, W), timed interleaved."""
  import jax  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == setting['devices'], jax.devices()
  w = setting['replicas']
  steps, rows = {}, {}
  for mode in MODES:
    if w == 1 and mode != 'separate':
      continue  # One replica: vmap, unroll and separate are one program.
    start = time.perf_counter()
    steps[mode] = build(mode, w, setting)
    rows[mode] = dict(compile_s=time.perf_counter() - start,
                      **steps[mode].memory())

  def runner(mode):
    step = steps[mode]
    calls = w if mode == 'separate' else 1

    def run():
      for _ in range(calls):
        step()
    return run
  times = common.interleave({m: runner(m) for m in steps},
                            setting['rounds'])
  out = []
  for mode, t in times.items():
    seconds = common.median(t)
    out.append(dict(devices=setting['devices'], replicas=w, mode=mode,
                    batch=setting['batch'], step_s=seconds,
                    images_per_s_per_replica=setting['batch'] / seconds,
                    images_per_s=w * setting['batch'] / seconds,
                    spread=common.spread(t), samples=t,
                    mesh=str(dict(steps[mode].mesh.shape)),
                    unroll=steps[mode].cfg.unroll, **rows[mode]))
  return {'rows': out, 'maxrss_all_modes_mib': common.maxrss_mib()}


def child_rss(setting):
  """Peak RSS of one mode alone: compile, then two steps."""
  step = build(setting['mode'], setting['replicas'], setting)
  calls = setting['replicas'] if setting['mode'] == 'separate' else 1
  for _ in range(2 * calls):
    step()
  return {'maxrss_mib': common.maxrss_mib()}


# ------------------------------------------------------------ the parent


def main():
  args = parse_args()
  if args.child:
    setting = json.loads(args.child)
    fn = child_rss if 'mode' in setting else child_time
    print(json.dumps(fn(setting)))
    return

  results = {'machine': common.machine(), 'versions': common.versions(),
             'args': vars(args), 'rows': [], 'errors': []}
  me = os.path.abspath(__file__)
  for devices in args.devices:
    env = common.fake_devices_env(devices)
    for w in args.replicas:
      base = dict(devices=devices, replicas=w, batch=args.batch,
                  width=args.width, input=args.input, rounds=args.rounds)
      start = time.perf_counter()
      got = common.run_child([me, '--child', json.dumps(base)],
                             args.timeout, env)
      if 'error' in got:
        results['errors'].append(dict(base, error=got['error']))
        print(f'[{devices} devices, W={w}] {got["error"]}', flush=True)
        continue
      rows = got['rows']
      for row in rows:
        row['maxrss_all_modes_mib'] = got['maxrss_all_modes_mib']
        if devices in args.rss_devices:
          rss = common.run_child(
              [me, '--child', json.dumps(dict(base, mode=row['mode']))],
              args.timeout, env)
          row['maxrss_mib'] = rss.get('maxrss_mib')
      sep = {r['mode']: r for r in rows}.get('separate')
      for row in rows:
        if sep:
          row['vs_separate'] = (row['images_per_s_per_replica']
                                / sep['images_per_s_per_replica'])
      results['rows'].extend(rows)
      print(f'[{devices} devices, W={w}] ' + ', '.join(
          f'{r["mode"]} {r["images_per_s_per_replica"]:.0f} img/s/replica'
          for r in rows) + f' ({time.perf_counter() - start:.0f} s)',
            flush=True)
      common.write_json(args.out, results)

  print(f'\n### Phase 2, ResNet-9 width {args.width}, {args.input}, batch '
        f'{args.batch} per replica\n')
  print(common.table(results['rows'], [
      ('devices', 'devices', 'd'), ('replicas', 'W', 'd'),
      ('mode', 'mode', ''), ('mesh', 'mesh', ''),
      ('images_per_s_per_replica', 'images/s per replica', ',.0f'),
      ('vs_separate', 'vs separate', '.2f'),
      ('xla_peak_mib', 'XLA peak MiB', ',.0f'),
      ('maxrss_mib', 'maxrss MiB (alone)', ',.0f'),
      ('maxrss_all_modes_mib', 'maxrss MiB (all modes)', ',.0f'),
      ('compile_s', 'compile s', '.0f'), ('spread', 'spread', '.0%')]))
  for e in results['errors']:
    print(f'- {e["devices"]} devices, W={e["replicas"]}: {e["error"]}')
  common.write_json(args.out, results)


if __name__ == '__main__':
  main()
