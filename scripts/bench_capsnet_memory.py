"""Memory and throughput of the official CIFAR-10 capsule network.

For every (backbone, batch size, step, conv impl) setting, a fresh
subprocess compiles one step, reads XLA's memory analysis of the compiled
step, times a few calls and reports its own peak resident memory
(getrusage maxrss), so that settings do not inflate each other's peaks.
The train step is SGD with momentum on the softmax cross-entropy (BN
statistics updated); the eval step is the forward pass in inference mode.

  python scripts/bench_capsnet_memory.py --batch-sizes 32 --out bench.json
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

STEPS = ('train', 'eval')
MIB = 2 ** 20


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--backbones', nargs='+', default=['resnet', 'simple'])
  parser.add_argument('--batch-sizes', nargs='+', type=int,
                      default=[32, 128])
  parser.add_argument('--steps', nargs='+', choices=STEPS, default=STEPS)
  parser.add_argument('--conv-impls', nargs='+', default=['chunked'],
                      help="'chunked' (bounded memory) and/or 'reference'")
  parser.add_argument('--num-routing', type=int, default=2)
  parser.add_argument('--routing-mode', default='concurrent',
                      choices=['concurrent', 'sequential'])
  parser.add_argument('--iters', type=int, default=3,
                      help='timed calls after one warm-up call')
  parser.add_argument('--compile-only', action='store_true',
                      help='memory analysis only, no timing')
  parser.add_argument('--timeout', type=float, default=900,
                      help='seconds allowed to one setting')
  parser.add_argument('--out', default=None, help='JSON file to write')
  parser.add_argument('--child', default=None, help=argparse.SUPPRESS)
  return parser.parse_args(argv)


# ------------------------------------------------- one setting (subprocess)


def run_setting(setting):
  """Compiles, measures and times one setting; returns a dict of results."""
  # Imported here so that the parent process never starts JAX.
  import jax
  import jax.numpy as jnp
  import optax

  sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
  from jaxcaps import configs
  from jaxcaps import model as capsnet

  config = configs.cifar10(setting['backbone'])
  model = capsnet.from_config(config, 10,
                              num_routing=setting['num_routing'],
                              routing_mode=setting['routing_mode'],
                              conv_impl=setting['conv_impl'])
  batch = setting['batch']
  rng = jax.random.key(0)
  images = jax.random.normal(rng, (batch, 32, 32, 3), jnp.float32)
  labels = jax.random.randint(rng, (batch,), 0, 10)
  variables = jax.jit(model.init, static_argnames='train')(
      rng, images[:1], train=False)
  params = variables['params']
  batch_stats = variables.get('batch_stats', {})
  optimizer = optax.sgd(0.1, momentum=0.9)
  opt_state = optimizer.init(params)

  def train_step(params, batch_stats, opt_state, images, labels):
    def loss_fn(params):
      logits, state = model.apply(
          {'params': params, 'batch_stats': batch_stats}, images,
          train=True, mutable=['batch_stats'])
      loss = optax.softmax_cross_entropy_with_integer_labels(
          logits, labels).mean()
      return loss, state.get('batch_stats', {})
    (loss, batch_stats), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  def eval_step(params, batch_stats, images, labels):
    logits = model.apply({'params': params, 'batch_stats': batch_stats},
                         images, train=False)
    return (logits.argmax(-1) == labels).sum()

  if setting['step'] == 'train':
    fn = jax.jit(train_step, donate_argnums=(0, 1, 2))
    args = (params, batch_stats, opt_state, images, labels)
  else:
    fn = jax.jit(eval_step)
    args = (params, batch_stats, images, labels)

  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - start
  stats = compiled.memory_analysis()
  result = dict(setting)
  result['compile_s'] = compile_s
  result['xla_argument_mib'] = stats.argument_size_in_bytes / MIB
  result['xla_output_mib'] = stats.output_size_in_bytes / MIB
  result['xla_alias_mib'] = stats.alias_size_in_bytes / MIB
  result['xla_temp_mib'] = stats.temp_size_in_bytes / MIB
  # Live at once: inputs, outputs not aliased to inputs, and temporaries.
  result['xla_peak_mib'] = (stats.argument_size_in_bytes
                            + stats.output_size_in_bytes
                            - stats.alias_size_in_bytes
                            + stats.temp_size_in_bytes) / MIB

  if not setting['compile_only']:
    def call(args):
      out = compiled(*args)
      jax.block_until_ready(out)
      if setting['step'] == 'train':
        return out[:3] + args[3:]  # Donated state comes back updated.
      return args

    args = call(args)  # Warm-up.
    start = time.perf_counter()
    for _ in range(setting['iters']):
      args = call(args)
    seconds = (time.perf_counter() - start) / setting['iters']
    result['step_s'] = seconds
    result['images_per_s'] = batch / seconds

  # ru_maxrss is in KiB on Linux.
  result['maxrss_mib'] = resource.getrusage(
      resource.RUSAGE_SELF).ru_maxrss / 1024
  result['device'] = str(jax.devices()[0].platform)
  return result


# --------------------------------------------------------------- the sweep


def run_in_subprocess(setting, timeout):
  command = [sys.executable, os.path.abspath(__file__), '--child',
             json.dumps(setting)]
  try:
    proc = subprocess.run(command, capture_output=True, text=True,
                          timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return dict(setting, error=f'timed out after {timeout:.0f} s')
  if proc.returncode != 0:
    tail = proc.stderr.strip().splitlines()[-3:]
    return dict(setting, error=f'exit {proc.returncode}: {" | ".join(tail)}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(results):
  """One row per setting; memory in MiB, '-' where not measured."""
  columns = [('backbone', 8, None), ('conv_impl', 9, None),
             ('step', 5, None), ('batch', 5, 'd'),
             ('xla_peak_mib', 12, '.1f'), ('xla_temp_mib', 12, '.1f'),
             ('maxrss_mib', 10, '.1f'), ('compile_s', 9, '.1f'),
             ('step_s', 7, '.2f'), ('images_per_s', 12, '.1f')]
  lines = ['  '.join(f'{name:>{width}}' for name, width, _ in columns)]
  for r in results:
    cells = []
    for name, width, fmt in columns:
      value = r.get(name)
      if value is None:
        cells.append(f'{"-":>{width}}')
      elif fmt is None:
        cells.append(f'{value:>{width}}')
      else:
        cells.append(f'{value:>{width}{fmt}}')
    if 'error' in r:
      cells = cells[:4] + [r['error']]
    lines.append('  '.join(cells))
  return '\n'.join(lines)


def main():
  args = parse_args()
  if args.child is not None:
    print(json.dumps(run_setting(json.loads(args.child))))
    return

  settings = [dict(backbone=b, batch=n, step=s, conv_impl=c,
                   num_routing=args.num_routing,
                   routing_mode=args.routing_mode, iters=args.iters,
                   compile_only=args.compile_only)
              for b in args.backbones for c in args.conv_impls
              for n in args.batch_sizes for s in args.steps]
  print(f'Benchmarking {len(settings)} settings of the CIFAR-10 capsule '
        f'network ({args.num_routing} {args.routing_mode} routing '
        'iterations), one subprocess each.', flush=True)
  results = []
  for i, setting in enumerate(settings):
    start = time.perf_counter()
    result = run_in_subprocess(setting, args.timeout)
    results.append(result)
    status = result.get('error') or (
        f"{result.get('images_per_s', float('nan')):.1f} images/s, "
        f"XLA peak {result['xla_peak_mib']:.0f} MiB, "
        f"maxrss {result['maxrss_mib']:.0f} MiB")
    print(f'[{i + 1}/{len(settings)}] {setting["backbone"]} '
          f'{setting["conv_impl"]} {setting["step"]} batch {setting["batch"]}'
          f': {status} ({time.perf_counter() - start:.0f} s)', flush=True)
  print(format_table(results))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=2)
    print(f'Wrote {args.out}')


if __name__ == '__main__':
  main()
