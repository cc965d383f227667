"""The capsule paper's official CIFAR-10 model and recipe.

Inverted dot-product attention routing, 4x4 poses, resnet backbone, 2
routing iterations; SGD 0.1 with momentum 0.9 and weight decay 5e-4, batch
128, 350 epochs with the rate cut 10x at epochs 150 and 250; random crop
(pad 4) and horizontal flip. 5,000 training images are held out as a
validation split for model selection.

  python -m jaxswap.main --config configs/capsnet_cifar10.py \
      --workdir runs/capsnet_cifar10

`--config configs/capsnet_cifar10.py:simple` takes the simple backbone;
`:swap` trains it with SWAP (phase 1 to 100 epochs at batch 512, then 4
replicas at batch 128).
"""

from jaxcaps import configs as capsule_configs
from jaxswap import config as config_lib


def get_config(arg: str = 'resnet'):
  options = set(arg.split(',')) if arg else set()
  c = config_lib.base_config()
  c.data.source = 'image_folder'
  c.data.name = 'cifar10'
  c.data.path = '../shared/data/cifar10-jpeg.tar.gz'
  c.data.crop_padding = 4
  c.data.flip = True
  c.data.validation_size = 5000

  c.model.name = 'capsnet'
  c.model.capsule = capsule_configs.cifar10(
      'simple' if 'simple' in options else 'resnet')

  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 5e-4

  c.phase1.batch_size = 128
  c.phase1.peak_lr = 0.1
  c.phase1.warmup_epochs = 0.0
  c.phase1.max_epochs = 350.0
  c.phase1.lr_milestones = (150.0, 250.0)
  c.phase1.lr_cut = 0.1
  c.phase2.replicas = 0            # plain SGD
  c.eval.batch_size = 200
  c.eval.every_epochs = 5.0
  c.train.checkpoint_every = 1000

  if 'swap' in options:
    c.phase1.batch_size = 512
    c.phase1.peak_lr = 0.4
    c.phase1.warmup_epochs = 5.0
    c.phase1.max_epochs = 100.0
    c.phase1.lr_milestones = ()
    c.phase1.stop_accuracy = 0.95
    c.phase2.replicas = 4
    c.phase2.batch_size = 128
    c.phase2.epochs = 20.0
    c.phase2.peak_lr = 0.05
  return c
