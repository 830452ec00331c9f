r"""CPU-scale supervised Barlow Twins on CIFAR-10: CE + CE + gamma * BT vs CE alone.

configs/cifar_supervised_bt.py (ResNet-18, batch 128, SGD momentum 0.9,
lr 0.01, weight decay 1e-4, the full augmentation pipeline) shrunk to a few
minutes per run on 2 CPU cores:
  * width 8 (1/8 of the channels), a 512-unit layer and a 512-128 embedding
    head instead of 2048 and 2048-128;
  * the first 10k training images (about 1000 per class), 3 epochs (234
    steps) instead of all 50k for 1000 epochs;
  * train accuracy on those same 10k images (no augmentation), 1000 images
    in the embedding plots.
At ~150 img/s (two branches) a run takes about 4 minutes with evaluation.

Expected result and the exact measurement: docs/reproduce.md, "Does CE + BT
beat CE alone?" (the earlier, shorter run: 32% train accuracy, no verdict).

  python -m barlow_jax.main --config=configs/supervised_bt_sweep.py:cifar_supervised_bt_cpu \
      --config.gammas=0,1e-2 --config.num_seeds=3 --workdir=runs/sweep_cpu
"""

import ml_collections

from barlow_jax.config_files import sibling

cifar_supervised_bt = sibling(__file__, 'cifar_supervised_bt')


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """``arg`` as in cifar_supervised_bt (encoder and/or ablation)."""
  config = cifar_supervised_bt.get_config(arg)
  config.train_split = 'train[:10000]'
  config.model.width = 8
  config.model.feature_dim = 512
  config.model.embedding = '512-128'
  config.num_epochs = 3.0
  config.eval.train_split = config.train_split  # Train accuracy on the images trained on.
  config.plots.num_examples = 1000
  config.log_every = 39
  config.checkpoint.every_steps = 117
  return config
