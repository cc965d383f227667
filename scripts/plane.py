r"""Test error on the plane through three SWAP replicas (the paper's figure).

  python scripts/plane.py --workdir runs/swap --grid 9 --out plane.png

Reads the phase-2 checkpoint of a finished run, spans the plane through
replicas 0, 1 and 2 with an orthonormal basis, and evaluates a grid of
points on it: at each point the weights are recomputed BN statistics and
all, exactly as phase 3 does for the average. The grid points are batched
as replicas of one computation. The replicas and the projection of their
average are marked.
"""

import functools
import json
import pathlib

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxswap import checkpoint
from jaxswap import config as config_lib
from jaxswap import models
from jaxswap import step as step_lib
from jaxswap import train

flags.DEFINE_string('workdir', None, 'A finished SWAP run (>= 3 replicas).')
flags.DEFINE_integer('grid', 9, 'Points per side of the grid.')
flags.DEFINE_float('margin', 0.3, 'Grid margin around the replicas, as a '
                   'fraction of their spread.')
flags.DEFINE_integer('chunk', 9, 'Grid points evaluated at once.')
flags.DEFINE_string('out', 'plane.png', 'PNG to write; JSON beside it.')
FLAGS = flags.FLAGS


def _flat(tree):
  return jnp.concatenate([x.reshape(x.shape[0], -1)
                          for x in jax.tree.leaves(tree)], axis=1)


def _unflat(vectors, like):
  leaves, treedef = jax.tree.flatten(like)
  out, i = [], 0
  for leaf in leaves:
    size = int(np.prod(leaf.shape[1:]))
    out.append(vectors[:, i:i + size].reshape((-1,) + leaf.shape[1:]))
    i += size
  return jax.tree.unflatten(treedef, out)


def main(argv):
  del argv
  workdir = pathlib.Path(FLAGS.workdir)
  config = config_lib.from_json((workdir / 'config.json').read_text())
  dataset, arrays = train.load_data(config)
  n = arrays.train_images.shape[0]
  phase2 = train.make_phase(config, 'phase2', n)
  if phase2.replicas < 3:
    raise app.UsageError('the plane needs a run with >= 3 replicas')
  model = models.build(config, dataset.num_classes)
  sample = jnp.zeros((1,) + arrays.train_images.shape[1:])
  ckpt = checkpoint.Checkpointer(workdir / 'checkpoints', 100)
  step = next(s for s in ckpt.steps()
              if ckpt.meta(s)['phase'] == 'phase2'
              and ckpt.meta(s).get('complete'))
  state = ckpt.restore(step, train.state_template(model, phase2, sample))
  ckpt.close()

  # An orthonormal basis of the plane through replicas 0, 1, 2.
  w = np.asarray(_flat(state.params), np.float64)
  origin, u = w[0], w[1] - w[0]
  u_hat = u / np.linalg.norm(u)
  v = w[2] - w[0] - (w[2] - w[0]) @ u_hat * u_hat
  v_hat = v / np.linalg.norm(v)
  coords = np.stack([(w - origin) @ u_hat, (w - origin) @ v_hat], 1)
  lo, hi = coords.min(0), coords.max(0)
  pad = FLAGS.margin * (hi - lo).max()
  axes = [np.linspace(lo[k] - pad, hi[k] + pad, FLAGS.grid)
          for k in (0, 1)]
  points = np.array([(a, b) for b in axes[1] for a in axes[0]])

  mesh = train.make_mesh(1)
  rep = NamedSharding(mesh, P('replica'))
  data = train.pipeline.put(arrays, NamedSharding(mesh, P()))
  bn_cfg = step_lib.StepConfig(
      batch_size=config.phase3.bn_batch_size,
      crop_padding=config.data.crop_padding, flip=config.data.flip,
      label_smoothing=0.0)
  recompute = step_lib.jit(functools.partial(
      step_lib.recompute_batch_stats, model=model,
      num_batches=config.phase3.bn_batches, cfg=bn_cfg))
  evaluate = step_lib.jit(functools.partial(
      step_lib.evaluate, model=model, batch_size=config.eval.batch_size))
  like = jax.tree.map(lambda x: x[:1], state.params)
  stats_like = jax.tree.map(lambda x: x[:1], state.batch_stats)
  errors = []
  for i in range(0, len(points), FLAGS.chunk):
    chunk = points[i:i + FLAGS.chunk]
    vec = origin + chunk[:, :1] * u_hat + chunk[:, 1:] * v_hat
    params = jax.device_put(_unflat(jnp.asarray(vec, jnp.float32), like),
                            rep)
    stats = jax.tree.map(
        lambda x, k=len(chunk): jnp.broadcast_to(x, (k,) + x.shape[1:]),
        stats_like)
    keys = jax.vmap(lambda j: jax.random.fold_in(jax.random.PRNGKey(3), j))(
        jnp.arange(len(chunk)))
    stats = recompute(params, stats, keys, data)
    correct, _ = evaluate(params, stats, data.test_images, data.test_labels,
                          data.mean, data.std)
    errors += list(1 - np.asarray(correct) / arrays.test_images.shape[0])
    print(f'{i + len(chunk)}/{len(points)} grid points', flush=True)
  errors = np.array(errors).reshape(FLAGS.grid, FLAGS.grid)

  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 5))
  cs = ax.contourf(axes[0], axes[1], errors * 100, levels=20,
                   cmap='viridis')
  fig.colorbar(cs, label='test error (%)')
  ax.plot(coords[:3, 0], coords[:3, 1], 'wo', label='replicas 0-2')
  if len(coords) > 3:
    ax.plot(coords[3:, 0], coords[3:, 1], 'w.', label='other replicas '
            '(projected)')
  mean = coords.mean(0)
  ax.plot(mean[0], mean[1], 'r*', markersize=14, label='average '
          '(projected)')
  ax.legend(fontsize=8)
  ax.set_title('test error on the plane of three replicas')
  fig.tight_layout()
  fig.savefig(FLAGS.out, dpi=120)
  pathlib.Path(FLAGS.out).with_suffix('.json').write_text(json.dumps(
      {'axes': [a.tolist() for a in axes], 'test_error': errors.tolist(),
       'replica_coords': coords.tolist()}, indent=1))
  print(f'wrote {FLAGS.out}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
