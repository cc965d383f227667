"""The SWAP paper's comparison on Fashion-MNIST, one method per config arg.

  --config configs/compare_fashion_mnist.py:sgd_small   small-batch SGD
  --config configs/compare_fashion_mnist.py:sgd_large   large-batch SGD
  --config configs/compare_fashion_mnist.py:swa         sequential SWA
  --config configs/compare_fashion_mnist.py:swap        SWAP

All train the same eighth-width ResNet-9 for the same number of epochs
(phase 2 counted per replica), with the learning rate scaled linearly with
the batch, and evaluate the test set every epoch so that accuracy can be
plotted against wall time. `scripts/compare_methods.py` runs them over
seeds.
"""

from jaxswap import config as config_lib

EPOCHS = 10.0


def get_config(method: str = 'swap'):
  c = config_lib.base_config()
  c.data.source = 'idx'
  c.data.name = 'fashion_mnist'
  c.data.crop_padding = 2
  c.data.flip = True
  c.model.name = 'resnet9'
  c.model.width = 0.125
  c.optimizer.label_smoothing = 0.1
  c.eval.every_epochs = 1.0
  c.train.checkpoint_every = 500
  c.phase1.warmup_epochs = 1.0
  c.phase1.max_epochs = EPOCHS
  c.phase2.replicas = 0

  if method == 'sgd_small':
    c.phase1.batch_size = 128
    c.phase1.peak_lr = 0.1
  elif method == 'sgd_large':
    c.phase1.batch_size = 512
    c.phase1.peak_lr = 0.4
  elif method == 'swa':
    # Small-batch SGD for most of the budget, then a flat-rate tail whose
    # weights are averaged twice an epoch.
    c.phase1.batch_size = 128
    c.phase1.peak_lr = 0.1
    c.phase1.max_epochs = EPOCHS - 2.0
    c.phase1.final_lr = 0.02
    c.phase2.replicas = 1
    c.phase2.batch_size = 128
    c.phase2.epochs = 2.0
    c.phase2.peak_lr = 0.02
    c.phase2.final_lr = 0.02
    c.phase2.swa_every_steps = 234
    c.phase2.swa_start_epochs = 0.0
  elif method == 'swap':
    c.phase1.batch_size = 512
    c.phase1.peak_lr = 0.4
    c.phase1.max_epochs = EPOCHS - 2.0
    c.phase1.stop_accuracy = 0.93
    c.phase2.replicas = 4
    c.phase2.batch_size = 128
    c.phase2.epochs = 2.0
    c.phase2.peak_lr = 0.1
  else:
    raise ValueError(f'unknown method {method!r}; choose sgd_small, '
                     'sgd_large, swa or swap')
  return c
