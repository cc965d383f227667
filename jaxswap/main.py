r"""Command-line entry: parses flags and hands over to `train`.

  python -m jaxswap.main --config configs/swap_fashion_mnist.py \
      --workdir runs/fmnist --config.phase2.replicas=8
"""

import json
import logging as py_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file with get_config().',
    lock_config=True)
flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and the '
                    'summary go; rerunning with the same one resumes.')
flags.DEFINE_bool('overwrite', False, 'Delete a run already in --workdir.')
flags.DEFINE_bool('dry_run', False, 'Build and compile every phase, print '
                  'parameters, per-device memory, steps and meshes, and '
                  'exit without training.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process '
                    '0, for a multi-process run on GPU or CPU machines.')
flags.DEFINE_integer('num_processes', None, 'Processes of a multi-process '
                     'run.')
flags.DEFINE_integer('process_id', None, 'This process, in [0, '
                     'num_processes).')
flags.DEFINE_bool('distributed', False, 'Initialize jax.distributed from '
                  'the environment (Cloud TPU pod slices, SLURM).')
flags.mark_flags_as_required(['config'])


class _OnlyOurInfo:
  """Drops the INFO chatter of orbax and CLU; keeps their warnings.

  Their errors keep their message but lose the traceback: a failure in
  orbax's background writer reaches the user as one line of ours.
  """

  def filter(self, record) -> bool:
    noisy = any(f'/{lib}/' in record.pathname
                for lib in ('orbax', 'clu', 'etils', 'tensorflow'))
    if noisy and record.exc_info:
      record.exc_info, record.exc_text = None, None
    return record.levelno >= py_logging.WARNING or not noisy


def _parse_flags(argv):
  """absl's parser, with a bad flag or config override as one line."""
  try:
    argv = FLAGS(argv)
    FLAGS.config.keys()  # A config file that failed to load raises here.
    return argv
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError,
          OSError) as e:
    text = str(e).replace('\\n', ' ').replace('\\', '').strip('\'"')
    text = ' '.join(text.split())
    bad = [a for a in argv[1:] if a.startswith('--config')]
    hint = f' (in {" ".join(bad)})' if bad else ''
    print(f'error: {text}{hint}', file=sys.stderr)
    sys.exit(2)


def _initialize_distributed():
  """jax.distributed.initialize, when the run spans several processes."""
  import jax
  if not (FLAGS.distributed or (FLAGS.num_processes or 1) > 1):
    return
  # Collectives between CPU devices of different processes go over gloo;
  # the setting does nothing to GPU and TPU devices.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(
      coordinator_address=FLAGS.coordinator_address,
      num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  logging.info('Process %d of %d, %d of %d devices local.',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Imported here so that --help and flag errors come before JAX starts.
  from jaxswap import config as config_lib
  from jaxswap import train
  from jaxswap.data import errors

  _initialize_distributed()
  try:
    if FLAGS.dry_run:
      print(json.dumps(train.dry_run(FLAGS.config), indent=1))
      return 0
    if not FLAGS.workdir:
      raise config_lib.ConfigError('--workdir is required: the folder for '
                                   'checkpoints, metrics and the summary')
    summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir,
                                       FLAGS.overwrite)
  except (config_lib.ConfigError, errors.DataError,
          train.WorkdirError) as e:
    logging.error('%s', e)
    # One write, so that a background thread's output cannot split it.
    sys.stderr.flush()
    sys.stderr.write(f'error: {e}\n')
    sys.stderr.flush()
    return 2
  except train.Preempted as e:
    print(f'Stopped by SIGTERM at {e}; a checkpoint is saved. Run the same '
          'command to resume.', file=sys.stderr)
    return 0
  print(train.format_summary(summary))
  return 0


def run():
  """Runs `main` under absl, as `python -m jaxswap.main` does."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  # TensorFlow (under tensorflow-datasets and the TensorBoard writer) runs
  # none of our numerics; its oneDNN notice at import is noise.
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  logging.set_verbosity(logging.INFO)
  # Which accelerator plugins are absent is not news to the user.
  py_logging.getLogger('jax._src.xla_bridge').setLevel(py_logging.WARNING)
  logging.get_absl_handler().addFilter(_OnlyOurInfo())
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
