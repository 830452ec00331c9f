r"""Supervised ResNet trained from scratch with cross-entropy on a balanced label fraction.

The supervised baseline of seed 000 (Table 1): a ResNet-50 trained on the
same class-balanced 10% (or 20%) of CIFAR-10 that the Barlow Twins classifier
sees, with and without augmentation. One branch (plain supervised training;
a second branch with gamma = 0 would only double the compute per image) and
a linear classifier on the encoder output (no 2048 layer, no embedding head).

Recipe (the seed gives none): SGD momentum 0.9, lr 0.1 cosine, weight decay
5e-4, batch 128, 100 epochs; random resized crop (scale 0.08-1) + flip, or
nothing with ':noaug'. On a GPU: 4k steps of ResNet-50, minutes.
Expected: see docs/reproduce.md, "Ghosh et al.'s comparison at CPU scale".

  python -m barlow_jax.main --config=configs/cifar_supervised.py --config.fraction=0.1 --workdir=runs/sup10
  python -m barlow_jax.main --config=configs/cifar_supervised.py:noaug --config.fraction=0.1 --workdir=runs/sup10_noaug
"""

import ml_collections

from barlow_jax.config_files import sibling

cifar_supervised_bt = sibling(__file__, 'cifar_supervised_bt')


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """``arg``: '' (crop + flip) or 'noaug' (no augmentation at all)."""
  if arg not in ('', 'noaug'):
    raise ValueError(f"Unknown config argument {arg!r}: expected '' or 'noaug'.")
  config = cifar_supervised_bt.get_config('crop_flip')
  config.ablation = arg or 'crop_flip'
  config.fraction = 0.1
  config.model.encoder = 'resnet50'
  config.model.feature_dim = 0
  config.model.embedding = ''
  config.num_branches = 1
  config.gamma = 0.0
  config.batch_size = 128
  config.num_epochs = 100.0
  config.optimizer.lr = 0.1
  config.optimizer.weight_decay = 5e-4
  config.optimizer.schedule = 'warmup_cosine'
  config.optimizer.warmup_epochs = 0.0
  if arg == 'noaug':
    config.augment.view1.crop = 0.0
    config.augment.view1.flip = 0.0
  config.eval.aug_view = 'view1'
  config.plots.num_examples = 0  # No embedding head to plot.
  config.log_every = 20
  config.checkpoint.every_steps = 1000
  return config
