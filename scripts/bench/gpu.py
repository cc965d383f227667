"""ResNet-9 and capsule train steps on one GPU, against the chip's peak.

A prepared run for a machine with an NVIDIA GPU, a few minutes long:

  ResNet-9   the trainer's SWAP step (on-device pipeline, phase-1 shape,
             one replica), full width, 32x32x3, batch 512, in float32
             and with bfloat16 computation (the model's `dtype`; parameters,
             BatchNorm statistics and the loss stay float32: the mixed
             precision DAWNBench-style ResNet-9 trains with);
  capsules   the official CIFAR-10 capsule network (resnet and simple
             backbones, 2 routing iterations), batch 128, one SGD step, in
             float32 (it has no dtype field; XLA:GPU runs its float32
             matmuls and convolutions in TF32 by default).

For each it prints images/s, XLA's FLOP count of the step
(`cost_analysis`), the rate reached, and that rate as a fraction of the
chip's dense peak for the precision used. Peaks (dense, no sparsity), in
TFLOP/s, bfloat16 / TF32: H100 SXM and H200 989 / 495, H100 PCIe 756 / 378,
A100 312 / 156; pass --peak_bf16_tflops and --peak_tf32_tflops for another
chip. On a machine with no GPU it says so and exits 0.

  python scripts/bench/gpu.py --out /tmp/gpu.json
"""

import argparse
import functools
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))

import common  # pylint: disable=g-import-not-at-top,wrong-import-position

# Dense peak TFLOP/s (bfloat16, TF32) by a substring of jax's device_kind.
PEAKS = (('H200', 989.0, 494.7), ('H100 PCIe', 756.0, 378.0),
         ('H100', 989.0, 494.7), ('A100', 312.0, 156.0))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--resnet_batch', type=int, default=512)
  p.add_argument('--capsule_batch', type=int, default=128)
  p.add_argument('--seconds', type=float, default=10.0,
                 help='timed seconds per measurement (after compiling)')
  p.add_argument('--peak_bf16_tflops', type=float, default=None,
                 help='default: by device kind, see the docstring')
  p.add_argument('--peak_tf32_tflops', type=float, default=None)
  p.add_argument('--force_cpu', action='store_true',
                 help='run on the CPU anyway (a smoke test, tiny sizes)')
  p.add_argument('--out', default=None)
  return p.parse_args(argv)


def peaks_for(kind: str):
  for name, bf16, tf32 in PEAKS:
    if name.lower() in kind.lower():
      return bf16, tf32
  return None, None


def timed(fn, seconds: float):
  """Calls fn() until `seconds` have passed; median seconds per call."""
  fn()  # Warm-up after compiling.
  times, start = [], time.perf_counter()
  while time.perf_counter() - start < seconds or len(times) < 3:
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return common.median(times), len(times)


def flops_of(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return (cost or {}).get('flops')


def resnet_rows(args, dtype_names):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import swap_steps  # pylint: disable=g-import-not-at-top
  rows = []
  for name in dtype_names:
    dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[name]
    start = time.perf_counter()
    step = swap_steps.PhaseStep(
        swap_steps.resnet9(1.0, dtype=dtype), 1, args.resnet_batch,
        (32, 32, 3), n_train=max(4096, 4 * args.resnet_batch),
        crop_padding=4)
    compile_s = time.perf_counter() - start
    seconds, calls = timed(step, args.seconds)
    rows.append(dict(model='ResNet-9 (width 1, 32x32x3)',
                     precision=name if name == 'bfloat16' else 'float32/TF32',
                     peak_kind='bf16' if name == 'bfloat16' else 'tf32',
                     batch=args.resnet_batch, step_s=seconds, calls=calls,
                     images_per_s=args.resnet_batch / seconds,
                     flops=flops_of(step.compiled), compile_s=compile_s,
                     loss=float(step.metrics['loss'][0])))
    print(f'  {rows[-1]["model"]} {name}: '
          f'{rows[-1]["images_per_s"]:,.0f} images/s', flush=True)
  return rows


def capsule_rows(args, backbones):
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from jaxcaps import configs  # pylint: disable=g-import-not-at-top
  from jaxcaps import model as capsnet  # pylint: disable=g-import-not-at-top
  rows = []
  for backbone in backbones:
    model = capsnet.from_config(configs.cifar10(backbone), 10)
    batch = args.capsule_batch
    key = jax.random.key(0)
    images = jax.random.normal(key, (batch, 32, 32, 3))
    labels = jax.random.randint(key, (batch,), 0, 10)
    variables = jax.jit(functools.partial(model.init, train=False))(
        key, images[:1])
    tx = optax.sgd(0.1, momentum=0.9)
    state = (variables['params'], variables.get('batch_stats', {}),
             tx.init(variables['params']))

    def step(state, images, labels):
      params, batch_stats, opt_state = state

      def loss_fn(params):
        logits, new = model.apply(
            {'params': params, 'batch_stats': batch_stats}, images,
            train=True, mutable=['batch_stats'])
        loss = optax.softmax_cross_entropy_with_integer_labels(
            logits, labels).mean()
        return loss, new.get('batch_stats', {})
      (loss, batch_stats), grads = jax.value_and_grad(
          loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), batch_stats,
              opt_state), loss

    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(
        state, images, labels).compile()
    compile_s = time.perf_counter() - start
    box = {'state': state}

    def run():
      box['state'], box['loss'] = compiled(box['state'], images, labels)
      jax.block_until_ready(box['loss'])
    seconds, calls = timed(run, args.seconds)
    rows.append(dict(model=f'capsules ({backbone}, 2 iterations)',
                     precision='float32/TF32', peak_kind='tf32',
                     batch=batch, step_s=seconds, calls=calls,
                     images_per_s=batch / seconds, flops=flops_of(compiled),
                     compile_s=compile_s, loss=float(box['loss']),
                     **common.xla_memory_mib(compiled)))
    print(f'  {rows[-1]["model"]}: {rows[-1]["images_per_s"]:,.0f} '
          'images/s', flush=True)
  return rows


def main():
  args = parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  if args.force_cpu:
    jax.config.update('jax_platforms', 'cpu')
    args.resnet_batch, args.capsule_batch, args.seconds = 16, 4, 0.5
  gpus = [] if args.force_cpu else [
      d for d in jax.devices() if d.platform == 'gpu']
  if not gpus and not args.force_cpu:
    print(f'No GPU here (JAX sees {jax.devices()[0].platform} devices); '
          'gpu.py measures nothing on this machine. Run it where '
          'jax.devices() lists a GPU (pip install "jax[cuda13]", or '
          '"jax[cuda12]").')
    return
  device = jax.devices()[0]
  kind = getattr(device, 'device_kind', device.platform)
  bf16, tf32 = peaks_for(kind)
  bf16 = args.peak_bf16_tflops or bf16
  tf32 = args.peak_tf32_tflops or tf32
  print(f'{kind}: dense peak {bf16 or "?"} TFLOP/s bfloat16, '
        f'{tf32 or "?"} TFLOP/s TF32', flush=True)

  rows = resnet_rows(args, ['float32', 'bfloat16'])
  rows += capsule_rows(args, ['simple', 'resnet'])
  for r in rows:
    peak = bf16 if r['peak_kind'] == 'bf16' else tf32
    if r['flops']:
      r['tflops'] = r['flops'] / r['step_s'] / 1e12
      r['peak_tflops'] = peak
      r['fraction_of_peak'] = r['tflops'] / peak if peak else None
  if gpus:
    stats = device.memory_stats() or {}
    peak_bytes = stats.get('peak_bytes_in_use')
    if peak_bytes:
      print(f'Peak device memory in use: {peak_bytes / 2 ** 30:.2f} GiB')

  print(f'\n### One train step on {kind}\n')
  print(common.table(rows, [
      ('model', 'model', ''), ('precision', 'precision', ''),
      ('batch', 'batch', 'd'), ('images_per_s', 'images/s', ',.0f'),
      ('step_s', 'step s', '.4f'), ('tflops', 'TFLOP/s', '.1f'),
      ('fraction_of_peak', 'of peak', '.1%'),
      ('compile_s', 'compile s', '.0f')]))
  common.write_json(args.out, {'device_kind': kind, 'machine':
                               common.machine(), 'versions':
                               common.versions(), 'args': vars(args),
                               'rows': rows})


if __name__ == '__main__':
  main()
