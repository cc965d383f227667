"""The SWAP paper's comparison on Fashion-MNIST, one method per config arg.

  --config configs/compare_fashion_mnist.py:sgd_small   small-batch SGD
  --config configs/compare_fashion_mnist.py:sgd_large   large-batch SGD
  --config configs/compare_fashion_mnist.py:swa         sequential SWA
  --config configs/compare_fashion_mnist.py:swap        SWAP

All train the same eighth-width ResNet-9 for 10 epochs (phase 2 counted
per replica), batches of 128 and 512 with the learning rate scaled
linearly, and evaluate the test set every epoch so that accuracy can be
plotted against wall time (`jaxswap.methods` says what each method sets).
SWAP stops phase 1 at 93% training accuracy or 8 epochs, then trains 4
replicas for 2 epochs. `scripts/compare_methods.py` runs them over seeds.
"""

from jaxswap import config as config_lib
from jaxswap import methods

BUDGET = methods.Budget(
    train_size=60_000, epochs=10.0,
    small_batch=128, small_lr=0.1, large_batch=512, large_lr=0.4,
    tail_epochs=2.0, swa_lr=0.02, stop_accuracy=0.93, replicas=4)


def get_config(method: str = 'swap'):
  c = config_lib.base_config()
  c.data.source = 'idx'
  c.data.name = 'fashion_mnist'
  c.data.crop_padding = 2
  c.data.flip = True
  c.model.name = 'resnet9'
  c.model.width = 0.125
  c.optimizer.label_smoothing = 0.1
  c.phase1.warmup_epochs = 1.0
  c.eval.every_epochs = 1.0
  c.train.checkpoint_every = 500
  return methods.apply(c, method, BUDGET)
