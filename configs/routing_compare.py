"""The capsule paper's routing comparison at a CPU size, one run per arg.

  --config configs/routing_compare.py:DATASET,MODEL

DATASET is 'mnist' or 'cifar10' (the images in ../shared/data); MODEL is
one of the three routings, 'inverted' (Tsai et al. 2020), 'dynamic'
(Sabour et al. 2017) or 'em' (Hinton et al. 2018), each in the same
capsule architecture, or 'resnet18', the paper's CNN baseline at eighth
width. The capsule layout is `jaxcaps.configs.routing_small` on both data
sets: simple backbone (one 3x3 stride-2 convolution, 64 channels), 8
primary capsule types of 4x4 poses, a 3x3 stride-2 conv capsule layer of
8 types, 10 class capsules, 2 routing iterations; each routing trains
with its own loss (cross entropy, margin, spread). Every model gets the
same budget, sized for 2 CPU cores (EM routing, the slowest, trains at
under 100 images/s there): SGD with Nesterov momentum, batch 64, a short
warm-up and a linear decay over `EPOCHS` epochs of the full training set,
then one pass over the test set.

`scripts/routing_compare.py` runs the grid over seeds and the routing
iterations ablation (`--config.model.capsule.num_routing=N`).
"""

from jaxcaps import configs as capsule_configs
from jaxswap import config as config_lib

DATASETS = ('mnist', 'cifar10')
MODELS = ('inverted', 'dynamic', 'em', 'resnet18')
EPOCHS = 0.25


def get_config(arg: str = 'mnist,inverted'):
  dataset, _, model = arg.partition(',')
  if dataset not in DATASETS or model not in MODELS:
    raise ValueError(f'config arg {arg!r}: expected DATASET,MODEL with '
                     f'DATASET in {DATASETS} and MODEL in {MODELS}, e.g. '
                     "'cifar10,em'")
  c = config_lib.base_config()
  if dataset == 'mnist':
    c.data.source = 'idx'
    c.data.name = 'mnist'
    c.data.path = '../shared/data/mnist'
    c.data.crop_padding = 2
    c.data.flip = False
  else:
    c.data.source = 'image_folder'
    c.data.name = 'cifar10'
    c.data.path = '../shared/data/cifar10-jpeg.tar.gz'
    c.data.crop_padding = 4
    c.data.flip = True

  if model == 'resnet18':
    c.model.name = 'resnet18'
    c.model.width = 0.125          # 8-16-32-64 channels
  else:
    c.model.name = 'capsnet'
    c.model.capsule = capsule_configs.routing_small()
    c.model.capsule.routing = model

  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 5e-4
  c.phase1.batch_size = 64
  c.phase1.peak_lr = 0.05
  c.phase1.warmup_epochs = 0.02
  c.phase1.max_epochs = EPOCHS
  c.phase2.replicas = 0
  c.eval.batch_size = 500
  c.train.checkpoint_every = 500
  c.train.progress = 'log'
  return c
