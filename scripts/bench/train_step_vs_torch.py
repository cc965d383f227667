"""Our jitted ResNet-9 train step against a PyTorch one on the same CPU.

One full SGD step (forward, cross-entropy, backward, Nesterov momentum
update with weight decay) of the same network, float32, timed interleaved
in one process:

  ours, pipeline   `jaxswap.step.train_step` as the trainer jits it: gathers,
                   crops, flips and normalizes its batch on the device,
                   compiled with `jaxswap.step.compiler_options()` (on the
                   CPU, XLA's YNNPACK fusions kept for reductions only);
  ours, ready      the same step fed a uint8 batch already on the device;
  ... XLA defaults the same two compiled with XLA's default options
                   (YNNPACK for convolutions too);
  torch eager      `torch_resnet9.ResNet9`, channels-last, with 2 threads
                   (all cores) and with 1;
  torch.compile    the same model through torch.compile (inductor), with
                   all cores (--torch_compile_threads for others).

Then it looks into what XLA:CPU does: compiler options, NCHW against NHWC,
the pooling gradient, BatchNorm's share and bfloat16 on one setting, and the
three convolutions of each layer (forward, input gradient, weight
gradient) alone. It also checks that the torch network computes our numbers
and that the faster compiler option gives the same training trajectory.

  python scripts/bench/train_step_vs_torch.py --out /tmp/step.json
"""

import argparse
import contextlib
import functools
import os
import re
import sys
import time
import traceback

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))

import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import swap_steps  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxswap.models import resnet9  # pylint: disable=wrong-import-position

try:
  import torch  # pylint: disable=g-import-not-at-top
  import torch_resnet9  # pylint: disable=g-import-not-at-top
except ImportError:
  torch = None

COLUMNS = [('width', 'width', ''), ('input', 'input', ''),
           ('contender', 'contender', ''),
           ('images_per_s', 'images/s', ',.0f'),
           ('vs_torch', 'vs best torch eager', '.2f'),
           ('spread', 'spread', '.0%')]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--batch', type=int, default=512)
  p.add_argument('--widths', type=float, nargs='+', default=[1.0, 0.25])
  p.add_argument('--inputs', nargs='+', default=['32x32x3', '28x28x1'],
                 help='HxWxC image shapes')
  p.add_argument('--rounds', type=int, default=2,
                 help='interleaved timed rounds of every contender')
  p.add_argument('--torch_threads', type=int, nargs='+', default=None,
                 help='thread counts of torch eager (default: all cores '
                 'and 1)')
  p.add_argument('--torch_compile_threads', type=int, nargs='+',
                 default=None, help='thread counts of torch.compile '
                 '(default: all cores)')
  p.add_argument('--torch_compile_max_width', type=float, default=0.25,
                 help='torch.compile the widths up to this (-1: none); '
                 'inductor takes minutes to compile the full width here')
  p.add_argument('--xla_width', type=float, default=0.25)
  p.add_argument('--xla_input', default='28x28x1')
  p.add_argument('--xla_batch', type=int, default=256)
  p.add_argument('--xla_rounds', type=int, default=3)
  p.add_argument('--xla_variants', nargs='*', default=None,
                 help='time only the variants whose names start with one '
                 'of these (default: all)')
  p.add_argument('--conv_configs', nargs='+',
                 default=['1.0:32x32x3:64', '0.25:28x28x1:512'],
                 help='width:HxWxC:batch of the convolution timings')
  p.add_argument('--sections', nargs='+',
                 default=['matmul', 'parity', 'main', 'xla', 'convs'],
                 choices=['matmul', 'parity', 'main', 'xla', 'convs'])
  p.add_argument('--out', default=None, help='JSON file to write')
  return p.parse_args(argv)


def shape_of(text: str) -> tuple[int, int, int]:
  h, w, c = (int(v) for v in text.lower().split('x'))
  return h, w, c


# ------------------------------------------------------------ model variants


class _Conv(nn.Module):
  """A bias-free 3x3 SAME convolution on NCHW, with an HWIO kernel."""
  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (3, 3, x.shape[1], self.features))
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), 'SAME', dimension_numbers=('NCHW', 'HWIO', 'NCHW'))


_Conv.__name__ = 'Conv'  # Flax names it Conv_0, as nn.Conv in ResNet9.


class _ConvBNNCHW(nn.Module):
  features: int
  bn_momentum: float
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = _Conv(self.features)(x)
    x = nn.BatchNorm(use_running_average=not train, axis=1,
                     momentum=self.bn_momentum)(x)
    return nn.relu(x)


class ResNet9NCHW(nn.Module):
  """`ResNet9` computed in NCHW; its variables have the same names."""
  num_classes: int
  width: float = 1.0
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = [max(1, int(round(w * self.width))) for w in (64, 128, 256, 512)]
    block = functools.partial(_ConvBNNCHW, bn_momentum=self.bn_momentum)

    def pool(x):
      b, ch, h, w = x.shape
      x = x[:, :, :h // 2 * 2, :w // 2 * 2]
      return x.reshape(b, ch, h // 2, 2, w // 2, 2).max(axis=(3, 5))

    x = jnp.transpose(x, (0, 3, 1, 2))
    x = block(c[0], name='prep')(x, train)
    x = pool(block(c[1], name='layer1')(x, train))
    x = x + block(c[1], name='res1b')(block(c[1], name='res1a')(x, train),
                                      train)
    x = pool(block(c[2], name='layer2')(x, train))
    x = pool(block(c[3], name='layer3')(x, train))
    x = x + block(c[3], name='res3b')(block(c[3], name='res3a')(x, train),
                                      train)
    x = jnp.max(x, axis=(2, 3))
    return nn.Dense(self.num_classes, use_bias=False, name='head')(x) * 0.125


class _ConvAffine(nn.Module):
  """ConvBN with BatchNorm replaced by a per-channel scale and shift.

  Not the same numbers: it only shows what BatchNorm costs in the step.
  """
  features: int
  bn_momentum: float
  dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    del train
    x = nn.Conv(self.features, (3, 3), padding='SAME', use_bias=False)(x)
    scale = self.param('scale', nn.initializers.ones, (self.features,))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    return nn.relu(x * scale + bias)


@contextlib.contextmanager
def patched(**names):
  """Swaps names of `jaxswap.models.resnet9` while a step is traced."""
  saved = {k: getattr(resnet9, k) for k in names}
  for k, v in names.items():
    setattr(resnet9, k, v)
  try:
    yield
  finally:
    for k, v in saved.items():
      setattr(resnet9, k, v)


def select_and_scatter_pool(x):
  return nn.max_pool(x, (2, 2), (2, 2))


# --------------------------------------------------------------- contenders


def torch_contender(width, shape, batch, threads, channels_last=True,
                    compiled=False):
  """A callable running one torch step to completion with `threads`."""
  h, w, c = shape
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = torch_resnet9.ResNet9(c, 10, width)
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  model = model.to(memory_format=fmt)
  opt = torch_resnet9.optimizer(model)
  x = torch.randn(batch, c, h, w).contiguous(memory_format=fmt)
  y = torch.randint(0, 10, (batch,))
  forward = torch.compile(model) if compiled else model
  step = torch_resnet9.make_step(model, opt, forward=forward)

  def run():
    torch.set_num_threads(threads)
    return step(x, y).item()
  return run


def rate(times, images):
  return images / common.median(times)


def run_main(args):
  rows = []
  cores = len(os.sched_getaffinity(0))
  for width in args.widths:
    for text in args.inputs:
      shape = shape_of(text)
      model = swap_steps.resnet9(width)
      contenders = {}
      build = functools.partial(swap_steps.PhaseStep, model, 1, args.batch,
                                shape, n_train=max(4096, 4 * args.batch))
      contenders['ours, pipeline'] = build()
      contenders['ours, ready batch'] = build(ready=True)
      contenders['ours, pipeline, XLA defaults'] = build(compiler_options={})
      contenders['ours, ready batch, XLA defaults'] = build(
          ready=True, compiler_options={})
      notes = {}
      eager = []
      if torch is not None:
        for threads in args.torch_threads or sorted({cores, 1},
                                                     reverse=True):
          name = f'torch eager, {threads} thread{"s" * (threads > 1)}'
          contenders[name] = torch_contender(width, shape, args.batch,
                                             threads)
          eager.append(name)
        compile_threads = []
        if width <= args.torch_compile_max_width:
          compile_threads = args.torch_compile_threads or [cores]
        for threads in compile_threads:
          name = f'torch.compile, {threads} thread{"s" * (threads > 1)}'
          start = time.perf_counter()
          try:
            fn = torch_contender(width, shape, args.batch, threads,
                                 compiled=True)
            fn()  # Compiles, forward and backward.
            contenders[name] = fn
            notes[name] = f'compiled in {time.perf_counter() - start:.0f} s'
          except Exception as e:  # pylint: disable=broad-except
            notes[name] = f'failed: {type(e).__name__}: {str(e)[:300]}'
            rows.append(dict(width=width, input=text, contender=name,
                             note=notes[name]))
      print(f'[main] width {width} input {text}: timing '
            f'{len(contenders)} contenders x {args.rounds} rounds',
            flush=True)
      times = common.interleave(contenders, args.rounds)
      best_eager = max((rate(times[n], args.batch) for n in eager),
                       default=None)
      for name, t in times.items():
        r = rate(t, args.batch)
        rows.append(dict(width=width, input=text, contender=name,
                         images_per_s=r, seconds=common.median(t),
                         samples=t, spread=common.spread(t),
                         vs_torch=r / best_eager if best_eager else None,
                         note=notes.get(name)))
        print(f'  {name:36s} {r:8.0f} img/s', flush=True)
  return rows


def run_xla(args):
  """Compiler options and model variants, all fed a ready batch."""
  shape = shape_of(args.xla_input)
  width, batch = args.xla_width, args.xla_batch
  model = swap_steps.resnet9(width)
  bf16 = swap_steps.resnet9(width, dtype=jnp.bfloat16)
  nchw = ResNet9NCHW(10, width)
  pool = dict(max_pool_2x2=select_and_scatter_pool)
  affine = dict(ConvBN=_ConvAffine)
  no, red = swap_steps.NO_YNN, swap_steps.YNN_REDUCE
  variants = [
      ('default (YNNPACK fusions on)', {}, None, None),
      ('no YNN fusions', no, None, None),
      ('YNN for reductions only', red, None, None),
      ('xla_cpu_enable_fast_math', {'xla_cpu_enable_fast_math': True},
       None, None),
      ('xla_cpu_use_onednn', {'xla_cpu_use_onednn': True}, None, None),
      ('xla_cpu_use_xnnpack', {'xla_cpu_use_xnnpack': True}, None, None),
      ('NCHW model', {}, nchw, None),
      ('NCHW model, YNN reduce only', red, nchw, None),
      ('select-and-scatter pool', {}, None, pool),
      ('select-and-scatter pool, YNN reduce only', red, None, pool),
      ('BN -> affine (not same numbers)', {}, None, affine),
      ('BN -> affine, YNN reduce only', red, None, affine),
      ('bfloat16 compute (not same numbers)', {}, bf16, None),
      ('bfloat16 compute, YNN reduce only', red, bf16, None),
  ]
  if args.xla_variants:
    variants = [v for v in variants
                if any(v[0].startswith(p) for p in args.xla_variants)]
  contenders, info = {}, {}
  for name, options, variant, patch in variants:
    try:
      with patched(**(patch or {})):
        step = swap_steps.PhaseStep(variant or model, 1, batch, shape,
                                    ready=True, compiler_options=options)
    except Exception as e:  # pylint: disable=broad-except
      info[name] = {'note': f'failed: {str(e)[:200]}'}
      continue
    text = step.compiled.as_text()
    info[name] = {
        'options': options,
        'ynn_fusions': text.count('"kind":"__ynn_fusion"'),
        'convolutions': text.count(' convolution('),
        'select_and_scatter': text.count(' select-and-scatter('),
    }
    contenders[name] = step
  for threads, cl in ((1, True), (2, True), (1, False)) if torch else ():
    name = (f'torch eager, {"channels-last" if cl else "NCHW"}, '
            f'{threads} thread{"s" * (threads > 1)}')
    if not args.xla_variants or any(name.startswith(p)
                                    for p in args.xla_variants):
      contenders[name] = torch_contender(width, shape, batch, threads,
                                         channels_last=cl)
  print(f'[xla] width {width} input {args.xla_input} batch {batch}: timing '
        f'{len(contenders)} variants x {args.xla_rounds} rounds', flush=True)
  times = common.interleave(contenders, args.xla_rounds)
  base = rate(next(iter(times.values())), batch)
  rows = []
  for name, t in times.items():
    r = rate(t, batch)
    rows.append(dict(variant=name, images_per_s=r, vs_default=r / base,
                     spread=common.spread(t), samples=t,
                     **info.get(name, {})))
    print(f'  {name:44s} {r:8.0f} img/s  x{r / base:.2f}', flush=True)
  for name, i in info.items():
    if 'note' in i:
      rows.append(dict(variant=name, **i))
  return rows


def conv_layers(width, shape):
  """(name, spatial size, in, out, count in the net) of every 3x3 conv."""
  c = [max(1, int(round(w * width))) for w in (64, 128, 256, 512)]
  h, _, cin = shape
  return [('prep', h, cin, c[0], 1), ('layer1', h, c[0], c[1], 1),
          ('res1', h // 2, c[1], c[1], 2), ('layer2', h // 2, c[1], c[2], 1),
          ('layer3', h // 4, c[2], c[3], 1),
          ('res3', h // 8, c[3], c[3], 2)]


def run_convs(args):
  """Each layer's forward, input-gradient and weight-gradient convolution."""
  def conv(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  fwd = conv
  dx = lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0]
  dw = lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0]
  rows = []
  for spec in args.conv_configs:
    width, text, b = spec.split(':')
    width, b = float(width), int(b)
    totals = dict(layer='whole net', shape=f'width {width:g}, {text}, '
                  f'batch {b}')
    for name, s, ci, co, count in conv_layers(width, shape_of(text)):
      keys = jax.random.split(jax.random.key(0), 3)
      x = jax.random.normal(keys[0], (b, s, s, ci))
      w = jax.random.normal(keys[1], (3, 3, ci, co)) * 0.05
      dy = jax.random.normal(keys[2], (b, s, s, co))
      contenders = {}
      for part, fn, a in (('fwd', fwd, (x, w)), ('dx', dx, (x, w, dy)),
                          ('dw', dw, (x, w, dy))):
        for lib, options in (('ynn', {}), ('eigen', swap_steps.NO_YNN)):
          c = jax.jit(fn).lower(*a).compile(compiler_options=options)
          contenders[f'{lib}/{part}'] = (
              lambda c=c, a=a: jax.block_until_ready(c(*a)))
      if torch is not None:
        cl = torch.channels_last
        tx = torch.randn(b, ci, s, s).contiguous(memory_format=cl)
        tw = (torch.randn(co, ci, 3, 3) * 0.05).contiguous(memory_format=cl)
        tdy = torch.randn(b, co, s, s).contiguous(memory_format=cl)

        def t_fwd():
          torch.set_num_threads(1)
          with torch.no_grad():
            torch.nn.functional.conv2d(tx, tw, padding=1)

        def t_dx():
          torch.set_num_threads(1)
          torch.nn.grad.conv2d_input(tx.shape, tw, tdy, padding=1)

        def t_dw():
          torch.set_num_threads(1)
          torch.nn.grad.conv2d_weight(tx, tw.shape, tdy, padding=1)
        contenders.update({'torch1/fwd': t_fwd, 'torch1/dx': t_dx,
                           'torch1/dw': t_dw})
      times = common.interleave(contenders, 3, min_sample_s=0.2)
      gflop = 2 * b * s * s * 9 * ci * co / 1e9
      row = dict(layer=name, shape=f'{b}x{s}x{s}x{ci}->{co}', gflop=gflop)
      for k, t in times.items():
        key = k.replace('/', '_') + '_ms'
        row[key] = 1000 * common.median(t)
        # The first layer's input gradient is never needed in training.
        if not (name == 'prep' and k.endswith('dx')):
          totals[key] = totals.get(key, 0.0) + count * row[key]
      rows.append(row)
      print(f'[convs] {spec} {name}: ' + ' '.join(
          f'{k}={1000 * common.median(t):.1f}ms' for k, t in times.items()),
            flush=True)
    for lib in ('ynn', 'eigen', 'torch1'):
      if f'{lib}_fwd_ms' in totals:
        totals[f'{lib}_dw_over_fwd'] = (totals[f'{lib}_dw_ms']
                                        / totals[f'{lib}_fwd_ms'])
    rows.append(totals)
  return rows


def run_matmul(args):
  """What this machine gives a large float32 matmul now, both libraries."""
  del args
  n = 2048
  a = jax.random.normal(jax.random.key(0), (n, n))
  mm = jax.jit(lambda a: a @ a)
  contenders = {'jax': lambda: jax.block_until_ready(mm(a))}
  if torch is not None:
    ta = torch.randn(n, n)
    cores = len(os.sched_getaffinity(0))
    for threads in sorted({cores, 1}, reverse=True):
      def mm_torch(threads=threads):
        torch.set_num_threads(threads)
        return ta @ ta
      contenders[f'torch, {threads} thread{"s" * (threads > 1)}'] = mm_torch
  times = common.interleave(contenders, 3)
  rows = [dict(library=k, gflops=2 * n ** 3 / common.median(t) / 1e9)
          for k, t in times.items()]
  print('[matmul] ' + ', '.join(f'{r["library"]} {r["gflops"]:.0f} GFLOP/s'
                                for r in rows), flush=True)
  return rows


def run_parity(args):
  """The torch net computes our numbers; YNN_REDUCE keeps our trajectory."""
  out = {}
  shape, width, b = (32, 32, 3), 0.25, 64
  model = swap_steps.resnet9(width)
  a = swap_steps.PhaseStep(model, 1, b, shape, ready=True,
                           compiler_options={})
  z = swap_steps.PhaseStep(model, 1, b, shape, ready=True,
                           compiler_options=swap_steps.YNN_REDUCE)
  params0 = jax.device_get(jax.tree.map(lambda v: v[0], a.state.params))
  stats0 = jax.device_get(jax.tree.map(lambda v: v[0], a.state.batch_stats))
  losses_a, losses_z = [], []
  for _ in range(5):
    a()
    z()
    losses_a.append(float(a.metrics['loss'][0]))
    losses_z.append(float(z.metrics['loss'][0]))
  diff = max(float(jnp.max(jnp.abs(p - q))) for p, q in zip(
      jax.tree.leaves(a.state.params), jax.tree.leaves(z.state.params)))
  scale = max(float(jnp.max(jnp.abs(p)))
              for p in jax.tree.leaves(a.state.params))
  out['ynn_reduce_vs_default'] = dict(
      steps=5, losses_default=losses_a, losses_ynn_reduce=losses_z,
      max_abs_param_diff=diff, max_abs_param=scale)
  print(f'[parity] default vs YNN reduce only after 5 steps: max |param diff| '
        f'{diff:.2e} (max |param| {scale:.2f}); losses '
        f'{losses_a[-1]:.6f} vs {losses_z[-1]:.6f}', flush=True)

  nchw = swap_steps.PhaseStep(ResNet9NCHW(10, width), 1, b, shape,
                              ready=True, compiler_options={})
  nchw_params = jax.device_get(jax.tree.map(lambda v: v[0],
                                            nchw.state.params))
  init_diff = max(float(np.max(np.abs(p - q))) for p, q in zip(
      jax.tree.leaves(params0), jax.tree.leaves(nchw_params)))
  out['nchw_init_equals_nhwc'] = init_diff == 0.0

  if torch is None:
    return out
  # One forward and backward on the same batch, same variables.
  images = np.array(a.inputs[0][0])
  labels = np.array(a.inputs[1][0])
  x = (images.astype(np.float32) / 255.0 - 0.45) / 0.25

  def loss_fn(params):
    logits, _ = model.apply({'params': params, 'batch_stats': stats0}, x,
                            train=True, mutable=['batch_stats'])
    onehot = jax.nn.one_hot(labels, 10)
    return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1))
  loss, grads = jax.value_and_grad(loss_fn)(params0)
  net = torch_resnet9.ResNet9(3, 10, width)
  torch_resnet9.load_flax(net, params0, stats0)
  net.train()
  tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  tloss = torch.nn.functional.cross_entropy(net(tx),
                                            torch.from_numpy(labels).long())
  tloss.backward()
  g_ours = np.asarray(grads['layer1']['Conv_0']['kernel']).transpose(
      3, 2, 0, 1)
  g_torch = net.layer1[0].weight.grad.numpy()
  rel = float(np.abs(g_ours - g_torch).max() / np.abs(g_torch).max())
  out['torch_vs_ours'] = dict(loss_ours=float(loss),
                              loss_torch=float(tloss.item()),
                              layer1_grad_max_rel_diff=rel)
  print(f'[parity] torch vs ours, same variables: loss {float(loss):.6f} '
        f'vs {tloss.item():.6f}; layer1 kernel gradient max rel diff '
        f'{rel:.1e}', flush=True)
  return out


# ------------------------------------------------------------------ report


def report(results) -> str:
  parts = []
  if 'matmul' in results:
    parts.append('### 2048x2048 float32 matmul, GFLOP/s\n')
    parts.append(common.table(results['matmul'], [
        ('library', 'library', ''), ('gflops', 'GFLOP/s', ',.0f')]) + '\n')
  if 'main' in results:
    parts.append('### One SGD step, images/s (median of the rounds)\n')
    parts.append(common.table(results['main'], COLUMNS))
    notes = [f'- {r["contender"]} ({r["width"]}, {r["input"]}): {r["note"]}'
             for r in results['main'] if r.get('note')]
    if notes:
      parts.append('\n' + '\n'.join(notes))
  if 'xla' in results:
    parts.append('\n### XLA:CPU options and model variants '
                 '(ready batch)\n')
    parts.append(common.table(results['xla'], [
        ('variant', 'variant', ''), ('images_per_s', 'images/s', ',.0f'),
        ('vs_default', 'vs default', '.2f'),
        ('ynn_fusions', 'YNN fusions', 'd'),
        ('convolutions', 'convs', 'd'),
        ('select_and_scatter', 'sel.-scatter', 'd'),
        ('spread', 'spread', '.0%'), ('note', 'note', '')]))
  if 'convs' in results:
    parts.append('\n### One convolution, ms (ynn: XLA default, eigen: '
                 'XLA without YNN, torch1: PyTorch 1 thread)\n')
    cols = [('layer', 'layer', ''), ('shape', 'shape', '')]
    for part in ('fwd', 'dx', 'dw'):
      for lib in ('ynn', 'eigen', 'torch1'):
        cols.append((f'{lib}_{part}_ms', f'{lib} {part}', '.1f'))
    for lib in ('ynn', 'eigen', 'torch1'):
      cols.append((f'{lib}_dw_over_fwd', f'{lib} dw/fwd', '.1f'))
    parts.append(common.table(results['convs'], cols))
  if 'parity' in results:
    p = results['parity']
    parts.append('\n### Same numbers\n')
    if 'torch_vs_ours' in p:
      t = p['torch_vs_ours']
      parts.append(f'- torch vs ours, same variables and batch: loss '
                   f'{t["loss_ours"]:.6f} vs {t["loss_torch"]:.6f}, '
                   f'layer1 kernel gradient max relative difference '
                   f'{t["layer1_grad_max_rel_diff"]:.1e}')
    n = p['ynn_reduce_vs_default']
    parts.append(f'- default vs YNN reduce only, {n["steps"]} steps from '
                 'the same '
                 f'state: max |param difference| '
                 f'{n["max_abs_param_diff"]:.1e} (largest |param| '
                 f'{n["max_abs_param"]:.2f}); last loss '
                 f'{n["losses_default"][-1]:.6f} vs '
                 f'{n["losses_ynn_reduce"][-1]:.6f}')
    parts.append(f'- NCHW model initializes to the same variables: '
                 f'{p["nchw_init_equals_nhwc"]}')
  return '\n'.join(parts)


def main():
  args = parse_args()
  if torch is not None:
    torch.set_num_threads(len(os.sched_getaffinity(0)))
  results = {'machine': common.machine(), 'versions': common.versions(),
             'args': vars(args)}
  if torch is None:
    print('torch is not installed (pip install torch, or the bench extra);'
          ' timing our step alone.')
  runners = {'matmul': run_matmul, 'parity': run_parity, 'main': run_main,
             'xla': run_xla,
             'convs': run_convs}
  for section in args.sections:
    start = time.perf_counter()
    try:
      results[section] = runners[section](args)
      common.write_json(args.out, results)  # What is done so far.
    except Exception:  # pylint: disable=broad-except
      results[section + '_error'] = traceback.format_exc()
      print(f'[{section}] failed:\n{traceback.format_exc()}', flush=True)
    print(f'[{section}] {time.perf_counter() - start:.0f} s', flush=True)
  print(report(results))
  common.write_json(args.out, results)


if __name__ == '__main__':
  main()
