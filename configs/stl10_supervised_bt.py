r"""Supervised learning with a Barlow Twins term on STL-10 (seed 001, §4.4, Tables 4.3-4.4).

As configs/cifar_supervised_bt.py, on STL-10 at 96x96: the 5000 labelled
training images enter both cross-entropies, and for gamma > 0 the first 5000
unlabelled images (label -1) are added to the training set; they enter only
the Barlow Twins term (the CE is a mean over labelled examples). The gamma = 0
baseline trains on the 5000 labelled images alone, as in the seed. Train
accuracy is measured on the labelled split.

Expected (seed 001, ResNet-18): test accuracy 70.46 +- 0.87 for gamma = 0 and
73.66 +- 0.37 for gamma = 1e-3; VGG-16 (':vgg16'): 70.97 +- 4.63 and
76.87 +- 2.22 for gamma = 1e-2. STL-10 is not on the development machine:
tests/test_stl10.py runs this config end to end on a tiny STL-10 prepared by
TFDS's own stl10 builder from fake files, and tests/test_supervised_step.py
checks that unlabelled examples stay out of the cross-entropies.

  python -m barlow_jax.sweep --config=configs/stl10_supervised_bt.py \
      --gammas=0,1e-4,1e-3,1e-2 --seeds=3 --workdir=runs/sweep_stl10
"""

import ml_collections

from barlow_jax.config_files import sibling

cifar_supervised_bt = sibling(__file__, 'cifar_supervised_bt')


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """``arg`` as in cifar_supervised_bt (encoder and/or ablation)."""
  config = cifar_supervised_bt.get_config(arg)
  config.dataset = 'stl10'
  config.train_split = 'train'  # 5000 labelled images.
  config.unlabelled_split = 'unlabelled[:5000]'  # Used only when gamma > 0.
  config.augment.crop_size = 96
  config.eval.train_split = 'train'
  config.eval.test_split = 'test'
  return config
