"""The SWAP paper's comparison at its own scale: CIFAR-10 and CIFAR-100.

  --config configs/swap_cifar.py:DATASET,METHOD

DATASET is 'cifar10' or 'cifar100' (tensorflow-datasets), METHOD one of
`jaxswap.methods.METHODS`. The model and recipe are the DAWNBench ResNet-9
(64-128-256-512 channels; SGD with Nesterov momentum 0.9, weight decay
5e-4, label smoothing 0.2, a linear warm-up and decay, crop and flip) that
the paper trains, for 30 epochs. The batches are those of a machine with
8 accelerators: 512 for small-batch SGD and for each SWAP replica, 4096
(512 per device) for large-batch SGD and SWAP's phase 1, whose rate is
scaled by 4 (linear scaling would give 8) over a 3-epoch warm-up; SWAP
stops phase 1 at 95% training accuracy and trains 8 replicas (one per
device) for the last 5 epochs of the budget.

NOTE: the paper's own stopping accuracies, rates and epochs are not
known to us; these values have not yet been run at this scale.

  python -m jaxswap.main --config configs/swap_cifar.py:cifar10,swap \
      --workdir runs/swap_cifar10
"""

from jaxswap import config as config_lib
from jaxswap import methods

DATASETS = ('cifar10', 'cifar100')
BUDGET = methods.Budget(
    train_size=50_000, epochs=30.0,
    small_batch=512, small_lr=0.4, large_batch=4096, large_lr=1.6,
    tail_epochs=5.0, swa_lr=0.05, stop_accuracy=0.95, replicas=8)


def get_config(arg: str = 'cifar10,swap'):
  dataset, _, method = arg.partition(',')
  if dataset not in DATASETS or method not in methods.METHODS:
    raise ValueError(f'config arg {arg!r}: expected DATASET,METHOD with '
                     f'DATASET in {DATASETS} and METHOD in '
                     f'{methods.METHODS}, e.g. cifar100,swap')
  c = config_lib.base_config()
  c.data.source = 'tfds'
  c.data.name = dataset
  c.data.crop_padding = 4
  c.data.flip = True
  c.model.name = 'resnet9'
  c.model.width = 1.0
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 5e-4
  c.optimizer.label_smoothing = 0.2
  c.phase1.warmup_epochs = 3.0 if method in ('sgd_large', 'swap') else 1.0
  c.phase3.bn_batch_size = 1024
  c.eval.batch_size = 1000
  c.eval.every_epochs = 1.0
  c.train.checkpoint_every = 200
  return methods.apply(c, method, BUDGET)
