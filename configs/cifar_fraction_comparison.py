r"""Ghosh, Ghosh & Das (2022), Table 1, in one command: Barlow Twins against baselines on a fraction.

"Self Supervised learning in image classification: Introducing Barlow Twins"
pretrains a ResNet-50 with Barlow Twins on a class-balanced 10% (or 20%) of
CIFAR-10 and compares a classifier on its features with KNN, logistic
regression and a random forest on raw pixels and with a supervised ResNet-50,
all trained on the same fraction. This config runs every row
(barlow_jax/experiments/reproduce.py), reusing finished runs, and writes the
table with the paper's numbers beside ours: at scale 'full' the paper's
setting (ResNet-50, 1000 epochs: GPU hours), at scale 'cpu' the laptop quick
start's encoder on the fraction (docs/reproduce.md, "Ghosh et al.'s
comparison at CPU scale").

Expected (the paper, 10%): 66.44% (micro) for Barlow Twins, 38.72% for the
best pixel baseline (random forest).

  python -m barlow_jax.main --config=configs/cifar_fraction_comparison.py \
      --config.fraction=0.1 --workdir=runs/fraction10
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.mode = 'reproduce'
  config.fraction = 0.1  # Class-balanced fraction of CIFAR-10 train (the paper: 0.1, 0.2).
  config.scale = 'cpu'  # 'cpu': the quick-start encoder; 'full': the paper's setting.
  config.cpu_epochs = 30.0  # Pretraining epochs over the fraction at scale 'cpu'.
  config.cpu_supervised_epochs = 30.0  # Supervised-from-scratch rows at scale 'cpu'.
  # TFDS data dir for every run (None: TFDS_DATA_DIR or ~/tensorflow_datasets).
  config.data_dir = config_dict.placeholder(str)
  return config
