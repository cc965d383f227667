"""A CPU-sized capsule network on MNIST (or Fashion-MNIST with :fashion).

Simple backbone to 14x14x64, 16 primary capsules of 4x4, one conv capsule
layer to 6x6 and 10 class capsules, 2 routing iterations; SGD with a short
warm-up and linear decay, 5,000 training images held out for validation.

  python -m jaxswap.main --config configs/capsnet_mnist.py \
      --workdir runs/capsnet_mnist
"""

from jaxcaps import configs as capsule_configs
from jaxswap import config as config_lib


def get_config(arg: str = ''):
  c = config_lib.base_config()
  c.data.source = 'idx'
  if arg == 'fashion':
    c.data.name = 'fashion_mnist'
    c.data.flip = True
  else:
    c.data.name = 'mnist'
    c.data.path = '../shared/data/mnist'
    c.data.flip = False
  c.data.crop_padding = 2
  c.data.validation_size = 5000

  c.model.name = 'capsnet'
  c.model.capsule = capsule_configs.mnist_small()

  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 5e-4
  c.phase1.batch_size = 128
  c.phase1.peak_lr = 0.1
  c.phase1.warmup_epochs = 0.2
  c.phase1.max_epochs = 2.0
  c.phase2.replicas = 0
  c.eval.batch_size = 1000
  c.train.checkpoint_every = 200
  return c
