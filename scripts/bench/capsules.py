"""Speed and memory of the official CIFAR-10 capsule network, and targets.

The model is `jaxcaps.configs.cifar10(backbone)` (inverted dot-product
attention routing, 2 concurrent iterations by default). For every (backbone,
step, batch size, conv impl) a fresh subprocess compiles one step, reads
XLA's memory analysis of it, times a few calls after a warm-up and reports
its own peak resident memory (getrusage maxrss), so that settings do not
inflate each other's peaks. The train step is SGD with momentum 0.9 on the
softmax cross-entropy (BN statistics updated, state donated); the eval step
is the forward pass in inference mode with the count of correct labels.

Next to each timing, a 1024x1024 matmul's GFLOP/s (before it) gauges how
much of a shared machine the process got. The table ends with the targets
against the official PyTorch code on this
kind of machine (2 cores): 5x its training throughput with the simple
backbone and 3x with the resnet one, at a quarter of its peak memory or
less.

  python scripts/bench/capsules.py --out /tmp/capsules.json
  python scripts/bench/capsules.py --batch-sizes 32 --steps train \\
      --conv-impls chunked reference --compile-only
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # pylint: disable=g-import-not-at-top,wrong-import-position

STEPS = ('train', 'eval')
MIB = 2 ** 20

# The official PyTorch code on 2 cores (measured by others here):
# images/s and peak GiB of a training step at a batch size, and of eval.
OFFICIAL = {('train', 32): (7.0, 5.4), ('train', 128): (6.0, 20.0),
            ('eval', 100): (9.0, None)}
SPEEDUP_TARGET = {'simple': 5.0, 'resnet': 3.0}
MEMORY_TARGET = 0.25


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--backbones', nargs='+', default=['simple', 'resnet'])
  p.add_argument('--batch-sizes', nargs='+', type=int, default=[32, 128],
                 help='of both steps')
  p.add_argument('--eval-batch-sizes', nargs='*', type=int, default=[100],
                 help='more eval batch sizes (100 is the official one)')
  p.add_argument('--steps', nargs='+', choices=STEPS, default=list(STEPS))
  p.add_argument('--conv-impls', nargs='+', default=['chunked'],
                 help="'chunked' (bounded memory) and/or 'reference'")
  p.add_argument('--num-routing', type=int, default=2)
  p.add_argument('--routing-mode', default='concurrent',
                 choices=['concurrent', 'sequential'])
  p.add_argument('--iters', type=int, default=2,
                 help='timed calls after one warm-up call')
  p.add_argument('--compile-only', action='store_true',
                 help='memory analysis only, no timing')
  p.add_argument('--xla-defaults', action='store_true',
                 help="compile with XLA's default options instead of the "
                 "trainer's (jaxswap.step.compiler_options)")
  p.add_argument('--timeout', type=float, default=900,
                 help='seconds allowed to one setting')
  p.add_argument('--out', default=None, help='JSON file to write')
  p.add_argument('--breakdown', default='on', choices=['on', 'off'],
                 help='also time the whole train step against its '
                 'backbone alone, interleaved (batch 32)')
  p.add_argument('--child', default=None, help=argparse.SUPPRESS)
  return p.parse_args(argv)


# ------------------------------------------------- one setting (subprocess)


def run_setting(setting):
  """Compiles, measures and times one setting; returns a dict of results."""
  # Imported here so that the parent process never starts JAX.
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from jaxcaps import configs  # pylint: disable=g-import-not-at-top
  from jaxcaps import model as capsnet  # pylint: disable=g-import-not-at-top
  from jaxswap import step as step_lib  # pylint: disable=g-import-not-at-top

  model = capsnet.from_config(configs.cifar10(setting['backbone']), 10,
                              num_routing=setting['num_routing'],
                              routing_mode=setting['routing_mode'],
                              conv_impl=setting['conv_impl'])
  batch = setting['batch']
  key = jax.random.key(0)
  images = jax.random.normal(key, (batch, 32, 32, 3), jnp.float32)
  labels = jax.random.randint(key, (batch,), 0, 10)
  variables = jax.jit(model.init, static_argnames='train')(
      key, images[:1], train=False)
  params = variables['params']
  batch_stats = variables.get('batch_stats', {})
  tx = optax.sgd(0.1, momentum=0.9)
  opt_state = tx.init(params)

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
    updates, opt_state = tx.update(grads, opt_state, params)
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
  # As the trainer compiles it (jaxswap.step.compiler_options), unless
  # --xla_defaults.
  options = {} if setting['xla_defaults'] else step_lib.compiler_options()
  compiled = fn.lower(*args).compile(compiler_options=options)
  result = dict(setting, compile_s=time.perf_counter() - start,
                **common.xla_memory_mib(compiled))

  if not setting['compile_only']:
    def call(args):
      out = compiled(*args)
      jax.block_until_ready(out)
      if setting['step'] == 'train':
        return out[:3] + args[3:]  # Donated state comes back updated.
      return args

    args = call(args)  # Warm-up.
    result['matmul_gflops_before'] = common.matmul_gflops()
    times = []
    for _ in range(setting['iters']):
      start = time.perf_counter()
      args = call(args)
      times.append(time.perf_counter() - start)
    result['matmul_gflops_after'] = common.matmul_gflops()
    result['step_s'] = common.median(times)
    result['samples'] = times
    result['images_per_s'] = batch / result['step_s']
  result['maxrss_mib'] = common.maxrss_mib()
  result['device'] = jax.devices()[0].platform
  return result


def run_breakdown(setting):
  """Where a train step's time goes: whole model against its backbone.

  Times, interleaved in one process: the whole train step; the same with
  XLA:CPU's YNNPACK fusions kept for reductions only, with the conv
  capsules' 'reference' implementation (all votes at once), and with one
  routing iteration (the uniform pass alone); and the train step of the
  backbone alone under a global average pool and a linear head.
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from jaxcaps import configs  # pylint: disable=g-import-not-at-top
  from jaxcaps import model as capsnet  # pylint: disable=g-import-not-at-top
  from jaxswap import step as step_lib  # pylint: disable=g-import-not-at-top

  class BackboneOnly(nn.Module):
    backbone: str

    @nn.compact
    def __call__(self, x, train):
      if self.backbone == 'resnet':
        x = capsnet.ResNetBackbone(name='backbone')(x, train)
      else:
        x = capsnet.SimpleBackbone(name='backbone')(x, train)
      return nn.Dense(10)(x.mean(axis=(1, 2)))

  batch = setting['batch']
  key = jax.random.key(0)
  images = jax.random.normal(key, (batch, 32, 32, 3), jnp.float32)
  labels = jax.random.randint(key, (batch,), 0, 10)
  tx = optax.sgd(0.1, momentum=0.9)
  whole = capsnet.from_config(configs.cifar10(setting['backbone']), 10)
  models = {'whole model': (whole, {}),
            'whole model, YNN reduce only': (whole, step_lib.CPU_OPTIONS),
            'whole model, conv_impl=reference': (capsnet.from_config(
                configs.cifar10(setting['backbone']), 10,
                conv_impl='reference'), {}),
            'whole model, 1 routing iteration': (capsnet.from_config(
                configs.cifar10(setting['backbone']), 10, num_routing=1),
                                                 {}),
            'backbone alone': (BackboneOnly(setting['backbone']), {})}
  steps = {}
  for name, (model, options) in models.items():
    variables = model.init(key, images[:1], train=False)
    state = [variables['params'], variables.get('batch_stats', {}),
             tx.init(variables['params'])]

    def step(state, model=model):
      params, batch_stats, opt_state = state

      def loss_fn(params):
        logits, new = model.apply(
            {'params': params, 'batch_stats': batch_stats}, images,
            train=True, mutable=['batch_stats'])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, labels).mean(), new.get('batch_stats', {})
      (_, batch_stats), grads = jax.value_and_grad(
          loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return [optax.apply_updates(params, updates), batch_stats, opt_state]
    compiled = jax.jit(step, donate_argnums=0).lower(state).compile(
        compiler_options=options)
    box = [state]

    def run(compiled=compiled, box=box):
      box[0] = compiled(box[0])
      jax.block_until_ready(box[0])
    steps[name] = run
  times = common.interleave(steps, setting['iters'])
  return {'rows': [dict(backbone=setting['backbone'], batch=batch, part=k,
                        step_s=common.median(t),
                        images_per_s=batch / common.median(t),
                        spread=common.spread(t))
                   for k, t in times.items()],
          'matmul_gflops': common.matmul_gflops()}


# --------------------------------------------------------------- the sweep


def verdicts(results):
  """Each measured setting with an official figure, against the targets."""
  rows = []
  for r in results:
    ref = OFFICIAL.get((r['step'], r['batch']))
    if not ref or 'images_per_s' not in r or r['conv_impl'] != 'chunked':
      continue
    ref_rate, ref_gib = ref
    speedup = r['images_per_s'] / ref_rate
    row = dict(backbone=r['backbone'], step=r['step'], batch=r['batch'],
               images_per_s=r['images_per_s'], official_images_per_s=ref_rate,
               speedup=speedup, maxrss_gib=r['maxrss_mib'] / 1024,
               xla_peak_gib=r['xla_peak_mib'] / 1024, official_gib=ref_gib)
    if r['step'] == 'train':
      target = SPEEDUP_TARGET[r['backbone']]
      row['memory_ratio'] = row['maxrss_gib'] / ref_gib
      met_speed = speedup >= target
      met_memory = row['memory_ratio'] <= MEMORY_TARGET
      row['target'] = f'{target:g}x, <= {MEMORY_TARGET:.0%} memory'
      row['met'] = ('met' if met_speed and met_memory else
                    'not met (' + ', '.join(
                        w for w, ok in (('speed', met_speed),
                                        ('memory', met_memory))
                        if not ok) + ')')
    rows.append(row)
  return rows


def report(results) -> str:
  parts = ['### Capsule network, CIFAR-10 official model\n',
           common.table(results, [
               ('backbone', 'backbone', ''), ('conv_impl', 'conv impl', ''),
               ('step', 'step', ''), ('batch', 'batch', 'd'),
               ('images_per_s', 'images/s', '.1f'),
               ('step_s', 'step s', '.2f'),
               ('xla_peak_mib', 'XLA peak MiB', ',.0f'),
               ('maxrss_mib', 'maxrss MiB', ',.0f'),
               ('compile_s', 'compile s', '.0f'),
               ('matmul_gflops_before', 'gauge GFLOP/s', '.0f'),
               ('error', 'error', '')])]
  v = verdicts(results)
  if v:
    parts += ['\n### Against the official PyTorch code (2 cores)\n',
              common.table(v, [
                  ('backbone', 'backbone', ''), ('step', 'step', ''),
                  ('batch', 'batch', 'd'),
                  ('images_per_s', 'ours images/s', '.1f'),
                  ('official_images_per_s', 'official images/s', '.0f'),
                  ('speedup', 'speed-up', '.1f'),
                  ('maxrss_gib', 'ours maxrss GiB', '.2f'),
                  ('official_gib', 'official GiB', '.1f'),
                  ('memory_ratio', 'memory ratio', '.2f'),
                  ('target', 'target', ''), ('met', 'verdict', '')])]
  return '\n'.join(parts)


def main():
  args = parse_args()
  if args.child is not None:
    setting = json.loads(args.child)
    fn = run_breakdown if setting.get('breakdown') else run_setting
    print(json.dumps(fn(setting)))
    return

  base = dict(num_routing=args.num_routing, routing_mode=args.routing_mode,
              iters=args.iters, compile_only=args.compile_only,
              xla_defaults=args.xla_defaults)
  settings = []
  for b in args.backbones:
    for c in args.conv_impls:
      for s in args.steps:
        sizes = list(args.batch_sizes)
        if s == 'eval':
          sizes += [n for n in args.eval_batch_sizes if n not in sizes]
        for n in sorted(sizes):
          settings.append(dict(base, backbone=b, conv_impl=c, step=s,
                               batch=n))
  print(f'Benchmarking {len(settings)} settings of the CIFAR-10 capsule '
        f'network ({args.num_routing} {args.routing_mode} routing '
        'iterations), one subprocess each.', flush=True)
  results = []
  me = os.path.abspath(__file__)
  for i, setting in enumerate(settings):
    start = time.perf_counter()
    got = common.run_child([me, '--child', json.dumps(setting)],
                           args.timeout)
    result = dict(setting, **got)
    results.append(result)
    status = result.get('error') or (
        f"{result.get('images_per_s', float('nan')):.1f} images/s, "
        f"XLA peak {result['xla_peak_mib']:.0f} MiB, "
        f"maxrss {result['maxrss_mib']:.0f} MiB")
    print(f'[{i + 1}/{len(settings)}] {setting["backbone"]} '
          f'{setting["conv_impl"]} {setting["step"]} batch {setting["batch"]}'
          f': {status} ({time.perf_counter() - start:.0f} s)', flush=True)
  breakdown = []
  if args.breakdown == 'on':
    for b in args.backbones:
      got = common.run_child([me, '--child', json.dumps(dict(
          breakdown=True, backbone=b, batch=32, iters=max(2, args.iters)))],
                             args.timeout)
      if 'error' in got:
        print(f'[breakdown {b}] {got["error"]}', flush=True)
        continue
      breakdown += got['rows']
      print(f'[breakdown {b}] ' + ', '.join(
          f'{r["part"]} {r["images_per_s"]:.1f} img/s' for r in got['rows'])
            + f' (gauge {got["matmul_gflops"]:.0f} GFLOP/s)', flush=True)
  print(report(results))
  if breakdown:
    print('\n### Train step at batch 32: whole model against its backbone '
          '(interleaved)\n')
    print(common.table(breakdown, [
        ('backbone', 'backbone', ''), ('part', 'part', ''),
        ('images_per_s', 'images/s', '.1f'), ('step_s', 'step s', '.2f'),
        ('spread', 'spread', '.0%')]))
  common.write_json(args.out, {'machine': common.machine(),
                               'versions': common.versions(),
                               'args': vars(args), 'rows': results,
                               'verdicts': verdicts(results),
                               'breakdown': breakdown})


if __name__ == '__main__':
  main()
