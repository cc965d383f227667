"""The SWAP paper's comparison on the CIFAR-10 JPEGs, sized for a CPU.

  --config configs/compare_cifar10.py:METHOD     (sgd_small, sgd_large,
                                                   swa or swap)

The images in ../shared/data (re-encoded as JPEG, so accuracy runs a
little below the original CIFAR-10), an eighth-width ResNet-9 (8-16-32-64
channels), crop and flip, 10 epochs on one budget (`jaxswap.methods`):
batches of 128 and 512, the learning rate scaled linearly; SWAP stops
phase 1 at 80% training accuracy or 8 epochs, then trains 4 replicas for
2 epochs. `scripts/compare_methods.py --config configs/compare_cifar10.py`
runs them over seeds.
"""

from jaxswap import config as config_lib
from jaxswap import methods

BUDGET = methods.Budget(
    train_size=50_000, epochs=10.0,
    small_batch=128, small_lr=0.1, large_batch=512, large_lr=0.4,
    tail_epochs=2.0, swa_lr=0.02, stop_accuracy=0.80, replicas=4)


def get_config(method: str = 'swap'):
  c = config_lib.base_config()
  c.data.source = 'image_folder'
  c.data.name = 'cifar10'
  c.data.path = '../shared/data/cifar10-jpeg.tar.gz'
  c.data.crop_padding = 4
  c.data.flip = True
  c.model.name = 'resnet9'
  c.model.width = 0.125
  c.optimizer.label_smoothing = 0.1
  c.phase1.warmup_epochs = 1.0
  c.eval.every_epochs = 1.0
  c.train.checkpoint_every = 500
  return methods.apply(c, method, BUDGET)
