r"""Capsules against a CNN of the same depth and width on overlaid digits.

The overlaid-digits experiment of Tsai et al. (ICLR 2020, "Capsules with
Inverted Dot-Product Attention Routing"), at a size a CPU can run. Every
example overlays two MNIST digits of different classes, each shifted by up
to 4 pixels, on a 36x36 canvas (`jaxcaps.multimnist`); training digits come
from the MNIST train split and test digits from its test split. A
prediction is right when its two highest logits are the two digits.

Two networks are trained from the same capsule config: the capsule network
(`jaxcaps.model.CapsNet`) and `jaxcaps.baselines_cnn.MatchedCNN`, which has
the same backbone and, layer by layer, as many neurons (see that module for
the correspondence). Both get the same optimizer (Adam, constant learning
rate, no weight decay), epochs, batch size, batch order and initialization
seed, and the sigmoid multi-label loss. For each the script reports the
test "both digits right" accuracy after the last epoch, the parameter
count and the training and inference throughput (images/s, compilation
excluded), as a Markdown table and, with --out, as JSON.

The defaults (5,000 training and 2,000 test examples, 3 epochs) run in
about 5-8 minutes on 2 CPU cores. At that size the numbers are a smoke-scale
comparison: neither network is near convergence, and the accuracies say
more about which one learns faster from little data than about the
paper's claim; the images/s move with whatever else shares the cores. A
full-size run, for an accelerator (the epochs are our choice, not the
paper's), is

  python scripts/multimnist_compare.py --train_size 60000 \
      --test_size 10000 --epochs 30 --seeds 3 --out multimnist.json

NOTE: no validation split; the test accuracy is only read after the last
epoch (the per-epoch test lines are for watching, not for choosing).
"""

import json
import logging as py_logging
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

_DEFAULT_MNIST = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                              '..', '..', 'shared', 'data', 'mnist')

FLAGS = flags.FLAGS
flags.DEFINE_string('data_dir', _DEFAULT_MNIST,
                    'Folder with the four MNIST idx files.')
flags.DEFINE_string('config', 'mnist_small',
                    'Capsule model config of jaxcaps.configs.get_config; '
                    'the CNN is matched to it.')
flags.DEFINE_integer('num_routing', None,
                     'Routing iterations; the config\'s when unset.')
flags.DEFINE_integer('train_size', 5000, 'MultiMNIST training examples.')
flags.DEFINE_integer('test_size', 2000, 'MultiMNIST test examples.')
flags.DEFINE_integer('max_shift', 4, 'Largest shift of a digit, pixels.')
flags.DEFINE_integer('data_seed', 0, 'Seed of the training set; the test '
                     'set uses data_seed + 1.')
flags.DEFINE_integer('epochs', 3, 'Passes over the training set.')
flags.DEFINE_integer('batch_size', 64, 'Training batch size.')
flags.DEFINE_integer('eval_batch_size', 500, 'Evaluation batch size.')
flags.DEFINE_float('learning_rate', 1e-3, 'Adam learning rate.')
flags.DEFINE_integer('seeds', 1, 'Training seeds 0 .. seeds - 1 (weights '
                     'and batch order); both models share each seed.')
flags.DEFINE_string('out', None, 'JSON file for the results.')

NUM_CLASSES = 10
MODELS = ('capsnet', 'cnn')


# ------------------------------------------------------------------- data


def build_data(data_dir, train_size, test_size, max_shift, data_seed):
  """MultiMNIST train and test sets as uint8 images and (n, 2) labels."""
  from jaxcaps import multimnist  # pylint: disable=g-import-not-at-top
  from jaxswap.data import sources  # pylint: disable=g-import-not-at-top

  mnist = sources.load_idx(data_dir, 'mnist')
  train = multimnist.make_multimnist(mnist.train_images, mnist.train_labels,
                                     train_size, data_seed,
                                     max_shift=max_shift)
  test = multimnist.make_multimnist(mnist.test_images, mnist.test_labels,
                                    test_size, data_seed + 1,
                                    max_shift=max_shift)
  logging.info('Data: %d train examples from %d MNIST train digits, %d test '
               'examples from %d MNIST test digits, %s images.', train_size,
               len(mnist.train_labels), test_size, len(mnist.test_labels),
               'x'.join(map(str, train[0].shape[1:])))
  return train, test


# ------------------------------------------------------------ train, eval


def make_steps(model, optimizer):
  """The jitted train step and eval step of `model`.

  The train state is a dict of params, batch_stats (empty without
  BatchNorm) and opt_state; images arrive as uint8 and are scaled to
  [0, 1] inside the step, so the host never holds a float copy.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from jaxcaps import multimnist  # pylint: disable=g-import-not-at-top

  def scale(images):
    return images.astype(jnp.float32) / 255.0

  def train_step(state, images, labels):
    def loss_fn(params):
      variables = {'params': params}
      if state['batch_stats']:
        variables['batch_stats'] = state['batch_stats']
        logits, updates = model.apply(variables, scale(images), train=True,
                                      mutable=['batch_stats'])
        batch_stats = updates['batch_stats']
      else:
        logits = model.apply(variables, scale(images), train=True)
        batch_stats = state['batch_stats']
      return multimnist.multilabel_loss(logits, labels), (logits,
                                                          batch_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state['params'])
    updates, opt_state = optimizer.update(grads, state['opt_state'],
                                          state['params'])
    new_state = {'params': optax.apply_updates(state['params'], updates),
                 'batch_stats': batch_stats, 'opt_state': opt_state}
    correct = multimnist.both_digits_correct(logits, labels).sum()
    return new_state, {'loss': loss, 'correct': correct}

  def eval_step(state, images, labels):
    variables = {'params': state['params']}
    if state['batch_stats']:
      variables['batch_stats'] = state['batch_stats']
    logits = model.apply(variables, scale(images), train=False)
    return multimnist.both_digits_correct(logits, labels)

  # The state is replaced every step, so its buffers can be reused.
  return jax.jit(train_step, donate_argnums=0), jax.jit(eval_step)


def evaluate(eval_step, state, images, labels, batch_size):
  """Fraction of examples with both digits right; pads the last batch."""
  n = len(labels)
  pad = -n % batch_size
  images = np.concatenate([images, images[:pad]])
  labels = np.concatenate([labels, labels[:pad]])
  correct = [eval_step(state, images[i:i + batch_size],
                       labels[i:i + batch_size])
             for i in range(0, len(labels), batch_size)]
  return float(np.concatenate([np.asarray(c) for c in correct])[:n].mean())


def _progress(total, desc):
  """A tqdm bar on a terminal, nothing otherwise (logs stay clean)."""
  import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(total=total, desc=desc, unit='step', leave=False,
                   disable=not sys.stderr.isatty())


def train_and_evaluate(name, model, train, test, seed):
  """Trains `model` from `seed`; returns its accuracy and throughput."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from jaxcaps import model as capsnet  # pylint: disable=g-import-not-at-top

  train_images, train_labels = train
  test_images, test_labels = test
  batch_size = FLAGS.batch_size
  steps_per_epoch = len(train_labels) // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f'--train_size {len(train_labels)} is smaller than '
                     f'--batch_size {batch_size}; raise the one or lower the '
                     'other.')

  variables = jax.jit(model.init, static_argnames='train')(
      jax.random.key(seed), train_images[:1].astype(np.float32),
      train=False)
  optimizer = optax.adam(FLAGS.learning_rate)
  state = {'params': variables['params'],
           'batch_stats': variables.get('batch_stats', {}),
           'opt_state': optimizer.init(variables['params'])}
  num_params, _ = capsnet.parameter_summary(state['params'])
  train_step, eval_step = make_steps(model, optimizer)

  start = time.perf_counter()
  train_step = train_step.lower(state, train_images[:batch_size],
                                train_labels[:batch_size]).compile()
  eval_step = eval_step.lower(
      state, test_images[:FLAGS.eval_batch_size],
      test_labels[:FLAGS.eval_batch_size]).compile()
  compile_s = time.perf_counter() - start
  logging.info('%s seed %d: %s parameters, %d epochs of %d steps at batch '
               '%d (remainder dropped), compiled in %.1f s.', name, seed,
               f'{num_params:,}', FLAGS.epochs, steps_per_epoch, batch_size,
               compile_s)

  # The same seed gives both models the same batch order.
  order_rng = np.random.default_rng(seed)
  history, train_seconds = [], 0.0
  for epoch in range(1, FLAGS.epochs + 1):
    order = order_rng.permutation(len(train_labels))
    metrics = []
    start = time.perf_counter()
    with _progress(steps_per_epoch, f'{name} epoch {epoch}') as bar:
      for i in range(steps_per_epoch):
        # Sorted, so that the gather reads the host array in memory
        # order; a batch is a set, so nothing else changes.
        index = np.sort(order[i * batch_size:(i + 1) * batch_size])
        state, step_metrics = train_step(state, train_images[index],
                                         train_labels[index])
        metrics.append(step_metrics)
        bar.update()
      metrics = jax.device_get(metrics)
    seconds = time.perf_counter() - start
    train_seconds += seconds

    loss = float(np.mean([m['loss'] for m in metrics]))
    if not np.isfinite(loss):
      raise FloatingPointError(
          f'{name} seed {seed}: mean training loss {loss} in epoch {epoch}; '
          f'lower --learning_rate (now {FLAGS.learning_rate}).')
    train_acc = (sum(int(m['correct']) for m in metrics)
                 / (steps_per_epoch * batch_size))
    test_acc = evaluate(eval_step, state, test_images, test_labels,
                        FLAGS.eval_batch_size)
    history.append({'epoch': epoch, 'loss': loss, 'train_both_right':
                    train_acc, 'test_both_right': test_acc,
                    'seconds': seconds})
    logging.info('%s seed %d epoch %d/%d: loss %.4f, both digits right '
                 '%.2f%% train, %.2f%% test; %.0f images/s, %.1f s.', name,
                 seed, epoch, FLAGS.epochs, loss, 100 * train_acc,
                 100 * test_acc, steps_per_epoch * batch_size / seconds,
                 seconds)

  # A separate timed pass, so that inference throughput has no
  # training work mixed in.
  start = time.perf_counter()
  test_acc = evaluate(eval_step, state, test_images, test_labels,
                      FLAGS.eval_batch_size)
  eval_seconds = time.perf_counter() - start
  return {
      'params': num_params,
      'test_both_right': test_acc,
      'train_images_per_s': (FLAGS.epochs * steps_per_epoch * batch_size
                             / train_seconds),
      'eval_images_per_s': len(test_labels) / eval_seconds,
      'compile_seconds': compile_s,
      'history': history,
  }


# ----------------------------------------------------------------- report


def summarize(runs):
  """Mean and (with several seeds) standard deviation of each metric."""
  summary = {}
  for name, per_seed in runs.items():
    row = {'params': per_seed[0]['params'], 'seeds': len(per_seed)}
    for key in ('test_both_right', 'train_images_per_s',
                'eval_images_per_s'):
      values = np.array([r[key] for r in per_seed])
      row[key] = float(values.mean())
      row[f'{key}_std'] = float(values.std(ddof=1)) if len(values) > 1 else 0.
    summary[name] = row
  return summary


def markdown_table(summary):
  """The comparison as a Markdown table, one row per model."""
  def with_std(row, key, scale, digits):
    text = f'{scale * row[key]:.{digits}f}'
    if row['seeds'] > 1:
      text += f' ± {scale * row[key + "_std"]:.{digits}f}'
    return text

  lines = ['| model | parameters | test both digits right (%) | '
           'train images/s | eval images/s |',
           '| --- | ---: | ---: | ---: | ---: |']
  for name, row in summary.items():
    lines.append(f'| {name} | {row["params"]:,} | '
                 f'{with_std(row, "test_both_right", 100, 2)} | '
                 f'{with_std(row, "train_images_per_s", 1, 0)} | '
                 f'{with_std(row, "eval_images_per_s", 1, 0)} |')
  return '\n'.join(lines)


def log_correspondence(config, caps, cnn, image_shape):
  """Logs the neurons per layer of both networks side by side."""
  from jaxcaps import baselines_cnn  # pylint: disable=g-import-not-at-top

  pairs = baselines_cnn.matched_layer_names(config)
  shape = (1,) + tuple(image_shape)
  caps_counts = baselines_cnn.neurons_per_layer(caps, shape,
                                                [c for c, _ in pairs])
  cnn_counts = baselines_cnn.neurons_per_layer(cnn, shape,
                                               [n for _, n in pairs])
  lines = [f'  {c:<13} {caps_counts[c]:>9,}   {n:<9} {cnn_counts[n]:>9,}'
           for c, n in pairs]
  logging.info('Neurons per layer, capsule network and CNN:\n%s',
               '\n'.join(lines))
  if any(caps_counts[c] != cnn_counts[n] for c, n in pairs):
    raise RuntimeError('MatchedCNN does not match the capsule network '
                       'layer by layer; see the table above.')
  return {c: caps_counts[c] for c, _ in pairs}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.seeds < 1 or FLAGS.epochs < 1:
    raise app.UsageError(f'--seeds ({FLAGS.seeds}) and --epochs '
                         f'({FLAGS.epochs}) must be at least 1.')
  # Imported here so that --help and flag errors come before JAX starts.
  import jax  # pylint: disable=g-import-not-at-top
  from jaxcaps import baselines_cnn  # pylint: disable=g-import-not-at-top
  from jaxcaps import configs  # pylint: disable=g-import-not-at-top
  from jaxcaps import model as capsnet  # pylint: disable=g-import-not-at-top
  from jaxswap.data import errors  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  config = configs.get_config(FLAGS.config)
  overrides = {}
  if FLAGS.num_routing is not None:
    overrides['num_routing'] = FLAGS.num_routing
  models = {'capsnet': capsnet.from_config(config, NUM_CLASSES, **overrides),
            'cnn': baselines_cnn.matched_cnn_from_config(config, NUM_CLASSES)}
  logging.info('Comparing the %s capsule network (%d routing iterations) '
               'with its matched CNN on %s, %d seed(s).', FLAGS.config,
               models['capsnet'].num_routing, jax.devices()[0].platform,
               FLAGS.seeds)

  try:
    train, test = build_data(FLAGS.data_dir, FLAGS.train_size,
                             FLAGS.test_size, FLAGS.max_shift,
                             FLAGS.data_seed)
  except errors.DataError as e:
    logging.error('%s (set --data_dir).', e)
    return 2
  neurons = log_correspondence(config, models['capsnet'], models['cnn'],
                               train[0].shape[1:])

  runs = {name: [] for name in MODELS}
  for seed in range(FLAGS.seeds):
    for name in MODELS:
      runs[name].append(train_and_evaluate(name, models[name], train, test,
                                           seed))
  summary = summarize(runs)
  table = markdown_table(summary)
  logging.info('Done in %.0f s.', time.perf_counter() - start)
  print(f'\nMultiMNIST, {FLAGS.config}: {FLAGS.train_size} train / '
        f'{FLAGS.test_size} test examples, {FLAGS.epochs} epochs, batch '
        f'{FLAGS.batch_size}, Adam {FLAGS.learning_rate:g}, '
        f'{FLAGS.seeds} seed(s)\n')
  print(table)

  if FLAGS.out:
    settings = {key: FLAGS[key].value for key in (
        'config', 'num_routing', 'train_size', 'test_size', 'max_shift',
        'data_seed', 'epochs', 'batch_size', 'learning_rate', 'seeds')}
    settings['optimizer'] = 'adam'
    settings['platform'] = jax.devices()[0].platform
    with open(FLAGS.out, 'w') as f:
      json.dump({'settings': settings, 'neurons_per_layer': neurons,
                 'summary': summary, 'runs': runs}, f, indent=2)
    logging.info('Results written to %s.', FLAGS.out)


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  logging.set_verbosity(logging.INFO)
  # Which accelerator plugins are absent is not news to the user.
  py_logging.getLogger('jax._src.xla_bridge').setLevel(py_logging.WARNING)
  app.run(main)
