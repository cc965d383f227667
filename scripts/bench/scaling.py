"""Phase-1 step time against the device count and the global batch.

Phase 1 of SWAP trains one replica data-parallel over every device: the
global batch is split over the mesh's 'data' axis and XLA inserts the
gradient and BatchNorm reductions. Here the devices are fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=D, one subprocess per D)
sharing this machine's cores, so the table shows what splitting a step
costs on one host, not a speed-up. Since separate processes see different
moments of a shared machine's load, one more process with 8 fake devices
times meshes over its first 1, 2, 4 and 8 devices interleaved, for ratios
that hold under any load. For each global batch it also times the
same step fed a batch already on the device, interleaved with the
trainer's step, which gathers, crops and flips its batch from the data set
on the device: the difference is the input pipeline's share of a step.

  python scripts/bench/scaling.py --out /tmp/scaling.json
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--devices', type=int, nargs='+', default=[1, 2, 4, 8])
  p.add_argument('--batches', type=int, nargs='+', default=[128, 512],
                 help='global batch sizes')
  p.add_argument('--width', type=float, default=0.25)
  p.add_argument('--input', default='28x28x1')
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--parts', nargs='+', default=['subprocess', 'in_process'],
                 choices=['subprocess', 'in_process'])
  p.add_argument('--compiler_options', default=None,
                 help="JSON dict of XLA options for every step (default: "
                 "the trainer's; '{}' for XLA's defaults)")
  p.add_argument('--timeout', type=float, default=900)
  p.add_argument('--out', default=None)
  p.add_argument('--child', default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


def child(setting):
  import jax  # pylint: disable=g-import-not-at-top
  import swap_steps  # pylint: disable=g-import-not-at-top
  devices = setting['devices']
  assert jax.device_count() == devices, jax.devices()
  shape = tuple(int(v) for v in setting['input'].split('x'))
  model = swap_steps.resnet9(setting['width'])
  steps, info = {}, {}
  for batch in setting['batches']:
    for ready in (False, True):
      start = time.perf_counter()
      step = swap_steps.PhaseStep(
          model, 1, batch, shape, ready=ready, num_devices=devices,
          compiler_options=setting['compiler_options'])
      key = (batch, ready)
      steps[key] = step
      info[key] = dict(compile_s=time.perf_counter() - start,
                       **step.memory())
  times = common.interleave({k: v for k, v in steps.items()},
                            setting['rounds'])
  rows = []
  for batch in setting['batches']:
    piped, ready = times[(batch, False)], times[(batch, True)]
    t_pipe, t_ready = common.median(piped), common.median(ready)
    rows.append(dict(
        devices=devices, global_batch=batch,
        per_device_batch=batch // devices, step_s=t_pipe,
        images_per_s=batch / t_pipe, ready_step_s=t_ready,
        ready_images_per_s=batch / t_ready,
        pipeline_share=1 - t_ready / t_pipe,
        spread=max(common.spread(piped), common.spread(ready)),
        samples=piped, ready_samples=ready,
        **{f'pipeline_{k}': v for k, v in info[(batch, False)].items()}))
  return {'rows': rows}


def child_in_process(setting):
  """Meshes over the first D of 8 fake devices, all timed interleaved."""
  import jax  # pylint: disable=g-import-not-at-top
  import swap_steps  # pylint: disable=g-import-not-at-top
  shape = tuple(int(v) for v in setting['input'].split('x'))
  model = swap_steps.resnet9(setting['width'])
  steps = {}
  for devices in setting['devices']:
    if devices > jax.device_count():
      continue
    for batch in setting['batches']:
      steps[(devices, batch)] = swap_steps.PhaseStep(
          model, 1, batch, shape, num_devices=devices,
          compiler_options=setting['compiler_options'])
  times = common.interleave(steps, setting['rounds'])
  rows = []
  for (devices, batch), t in times.items():
    base = common.median(times[(1, batch)]) if (1, batch) in times else None
    rows.append(dict(devices=devices, global_batch=batch,
                     per_device_batch=batch // devices,
                     step_s=common.median(t),
                     images_per_s=batch / common.median(t),
                     vs_one_device=(base / common.median(t)) if base
                     else None, spread=common.spread(t), samples=t))
  return {'rows': rows}


_STEP_COLUMNS = [
    ('devices', 'devices', 'd'), ('global_batch', 'global batch', 'd'),
    ('per_device_batch', 'per device', 'd'),
    ('step_s', 'step s', '.3f'), ('images_per_s', 'images/s', ',.0f'),
    ('vs_one_device', 'vs 1 device', '.2f')]


def main():
  args = parse_args()
  if args.child:
    setting = json.loads(args.child)
    fn = child_in_process if setting.get('in_process') else child
    print(json.dumps(fn(setting)))
    return
  results = {'machine': common.machine(), 'versions': common.versions(),
             'args': vars(args), 'rows': [], 'in_process': [],
             'errors': []}
  options = (None if args.compiler_options is None
             else json.loads(args.compiler_options))
  me = os.path.abspath(__file__)
  for devices in args.devices if 'subprocess' in args.parts else []:
    env = common.fake_devices_env(devices)
    setting = dict(devices=devices, batches=args.batches, width=args.width,
                   input=args.input, rounds=args.rounds,
                   compiler_options=options)
    start = time.perf_counter()
    got = common.run_child([me, '--child', json.dumps(setting)],
                           args.timeout, env)
    if 'error' in got:
      results['errors'].append(dict(devices=devices, error=got['error']))
      print(f'[{devices} devices] {got["error"]}', flush=True)
      continue
    results['rows'].extend(got['rows'])
    print(f'[{devices} devices] ' + ', '.join(
        f'batch {r["global_batch"]}: {r["images_per_s"]:.0f} img/s '
        f'(pipeline {r["pipeline_share"]:.0%})' for r in got['rows'])
          + f' ({time.perf_counter() - start:.0f} s)', flush=True)
  if 'in_process' in args.parts:
    most = max(args.devices)
    setting = dict(in_process=True, devices=args.devices,
                   batches=args.batches, width=args.width, input=args.input,
                   rounds=args.rounds, compiler_options=options)
    env = common.fake_devices_env(most)
    got = common.run_child([me, '--child', json.dumps(setting)],
                           args.timeout, env)
    if 'error' in got:
      results['errors'].append(dict(devices=most, error=got['error']))
    else:
      results['in_process'] = got['rows']
  base = {r['global_batch']: r['images_per_s'] for r in results['rows']
          if r['devices'] == 1}
  for r in results['rows']:
    if r['global_batch'] in base:
      r['vs_one_device'] = r['images_per_s'] / base[r['global_batch']]
  print(f'\n### Phase 1, ResNet-9 width {args.width}, {args.input}, fake '
        'CPU devices\n')
  print(common.table(results['rows'], _STEP_COLUMNS + [
      ('ready_images_per_s', 'ready batch images/s', ',.0f'),
      ('pipeline_share', 'pipeline share', '.0%'),
      ('pipeline_xla_peak_mib', 'XLA peak MiB', ',.0f'),
      ('spread', 'spread', '.0%')]))
  if results['in_process']:
    print(f'\n### The same, one process with {max(args.devices)} fake '
          'devices, meshes over the first D, interleaved\n')
    print(common.table(results['in_process'],
                       _STEP_COLUMNS + [('spread', 'spread', '.0%')]))
  for e in results['errors']:
    print(f'- {e["devices"]} devices: {e["error"]}')
  common.write_json(args.out, results)


if __name__ == '__main__':
  main()
