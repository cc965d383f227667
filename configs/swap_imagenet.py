"""The SWAP paper's ImageNet comparison: ResNet-50, streamed per host.

  --config configs/swap_imagenet.py:METHOD      (sgd_small, sgd_large,
                                                  swa or swap)

ImageNet (tensorflow-datasets `imagenet2012`, prepared beforehand in
--config.data.tfds_data_dir: its tarballs cannot be downloaded by tfds)
is too large to hold on every device, so each host reads its share of
every batch with tf.data (`jaxswap.data.stream`): Inception-style random
crops at 224 and flips to train, the centre 87.5% to test on the 50,000
validation images.

The recipe is the usual large-batch ResNet-50 one (Goyal et al. 2017):
SGD with Nesterov momentum 0.9, weight decay 1e-4 on kernels,
label smoothing 0.1, a linear warm-up, the rate 0.1 per 256 images, for a
28-epoch budget as the paper's schedule has. Small-batch SGD and each
SWAP replica take 1024 images a step; large-batch SGD and SWAP's phase 1
double it, with the rate, as the paper does. SWAP stops phase 1 at 70%
training accuracy and trains 8 replicas for the last 6 epochs. The
batches are sized for 32 JAX devices (a TPU v3-32 or v5e-32): 64 images
per device in phase 1, and in phase 2 each replica on 4 devices at 256
each.

NOTE: the paper's own stopping accuracy, replica count and phase-2
schedule are not known to us, and this config has not been run: it is
checked by `tests/test_stream.py` on mock data only.

  bash scripts/tpu/run.sh configs/swap_imagenet.py:swap runs/imagenet \
      --config.data.tfds_data_dir=gs://BUCKET/tensorflow_datasets

tfds reads the data from gs:// directly. The work directory must be on
the workers' disks (the trainer does not write to gs:// yet), so on a
slice of several hosts each keeps its own part of the checkpoints and a
stopped run cannot resume (scripts/tpu/README.md).
"""

from jaxswap import config as config_lib
from jaxswap import methods

BUDGET = methods.Budget(
    train_size=1_281_167, epochs=28.0,
    small_batch=1024, small_lr=0.4, large_batch=2048, large_lr=0.8,
    tail_epochs=6.0, swa_lr=0.04, stop_accuracy=0.70, replicas=8)


def get_config(method: str = 'swap'):
  c = config_lib.base_config()
  c.data.source = 'tfds_stream'
  c.data.name = 'imagenet2012'
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'
  c.data.image_size = 224
  c.data.mean = (0.485, 0.456, 0.406)
  c.data.std = (0.229, 0.224, 0.225)
  c.model.name = 'resnet50'
  c.model.width = 1.0
  c.model.dtype = 'bfloat16'
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 1e-4
  c.optimizer.label_smoothing = 0.1
  c.phase1.warmup_epochs = 5.0
  c.phase2.warmup_epochs = 0.0
  c.phase3.bn_batches = 50
  c.phase3.bn_batch_size = 1024
  c.eval.batch_size = 1024
  c.eval.every_epochs = 1.0
  c.train.log_every = 100
  c.train.checkpoint_every = 1000
  return methods.apply(c, method, BUDGET)
