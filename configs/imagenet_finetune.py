r"""ImageNet's semi-supervised protocol: fine-tuning on 1% or 10% of the labels (paper Table 2).

The official evaluate.py with ``--weights finetune --train-percent 1`` (or 10):
the pretrained ResNet-50 and a new linear classifier are trained together on
SimCLR's class-balanced lists of 1% (12,811 images) or 10% (128,116) of
ImageNet's training images, and tested on the 50,000 validation images. Here
the lists are TFDS's ``imagenet2012_subset/1pct`` and ``/10pct`` (built by TFDS
from the ImageNet tars in its manual dir, as imagenet2012; their 'validation'
split is imagenet2012's).

The official command (README) and its hyper-parameters, the same for 1% and
10% (facebookresearch/barlowtwins issue #14):

  python evaluate.py /path/to/imagenet/ resnet50.pth --weights finetune --train-perc 1 \
      --epochs 20 --lr-backbone 0.002 --lr-classifier 0.5 --weight-decay 0

* 20 epochs, batch 256, SGD momentum 0.9, weight decay 0, cosine to 0;
  lr 0.002 for the backbone (BatchNorm in training mode), 0.5 for the classifier;
* training views: RandomResizedCrop(224) (scale 0.08-1, ratio 3/4-4/3, cut
  from the whole image on the host) + horizontal flip; evaluation
  Resize(256) + CenterCrop(224); ImageNet's channel statistics.

Paper Table 2 (top-1 / top-5): 1% 55.0 / 79.2, 10% 69.7 / 89.3; the released
model gave 55.1 / 79.9 and 68.9 / 89.0 under this command (issue #14).

Differences from evaluate.py: the cosine decays per step (evaluate.py steps it
per epoch); the classifier starts from Flax's default initialisation (LeCun
normal; evaluate.py draws N(0, 0.01)); BatchNorm statistics are those of the
global batch (evaluate.py: per GPU); results.json reports the last epoch's
accuracy (evaluate.py logs the best over epochs as well).

  python -m barlow_jax.main --config=configs/imagenet_finetune.py \
      --config.pretrained_workdir=runs/imagenet_bt --workdir=runs/semisup_1pct
  python -m barlow_jax.main --config=configs/imagenet_finetune.py \
      --config.pretrained_workdir=runs/imagenet_bt --config.dataset=imagenet2012_subset/10pct \
      --workdir=runs/semisup_10pct
"""

import ml_collections

from barlow_jax.config_files import sibling

cifar_finetune = sibling(__file__, 'cifar_finetune')


def get_config() -> ml_collections.ConfigDict:
  """The fine-tuning config on ImageNet's 1% subset (--config.dataset picks the 10% one)."""
  config = cifar_finetune.get_config()
  config.dataset = 'imagenet2012_subset/1pct'
  config.train_split = 'train'
  config.label_fraction = 1.0  # The subset is the labelled fraction.
  config.cache_dataset = False  # 10%: 14 GB of JPEGs.
  # As cifar_finetune already: SGD momentum 0.9, cosine to 0 without warmup, a fresh classifier.
  config.batch_size = 256
  config.num_epochs = 20.0
  config.optimizer.lr = 0.002  # --lr-backbone
  config.optimizer.head_lr = 0.5  # --lr-classifier
  config.optimizer.weight_decay = 0.0
  view = config.augment.view1  # RandomResizedCrop(224) + RandomHorizontalFlip, nothing else.
  view.crop, view.crop_scale, view.crop_ratio, view.flip = 1.0, (0.08, 1.0), (3 / 4, 4 / 3), 0.5
  for key in ('jitter', 'grayscale', 'blur', 'solarize'):
    view[key] = 0.0
  config.eval.train_split = 'train'
  config.eval.test_split = 'validation'  # ImageNet's test split has no labels.
  config.log_every = 100
  config.checkpoint.every_steps = 1000
  return config
