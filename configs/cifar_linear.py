r"""Linear probe and kNN on a frozen Barlow Twins encoder (paper App. B.1 protocol).

Reads the architecture from <pretrained_workdir>/config.json and the weights
from its latest (or checkpoint_step) Orbax checkpoint. Features are computed
once without augmentation and cached in memory; then a softmax classifier is
trained on them for 100 epochs (SGD momentum 0.9, lr 0.3 cosine, weight decay
1e-6, batch 256) on standardised features, and weighted kNN (k=20, 200,
T=0.07) is run. Expected: see README ("what to expect on a laptop").

  python -m barlow_jax.main --config=configs/cifar_linear.py \
      --config.pretrained_workdir=runs/bt --workdir=runs/probe
"""

import ml_collections
from ml_collections import config_dict


def get_config():
  config = ml_collections.ConfigDict()
  config.mode = 'linear'
  config.pretrained_workdir = config_dict.placeholder(str)
  config.checkpoint_step = config_dict.placeholder(int)  # None: the latest.
  config.random_init = False  # True: same architecture, untrained (a baseline).
  config.data_dir = config_dict.placeholder(str)  # None: as in pretraining.
  config.download = config_dict.placeholder(bool)
  config.train_split = 'train'
  config.label_fraction = 1.0  # Balanced fraction of train labels for the classifiers.
  config.fraction_seed = 0
  config.batch_size = 256  # Feature extraction.
  config.seed = 0

  config.probe = ml_collections.ConfigDict()
  config.probe.epochs = 100
  config.probe.batch_size = 256
  config.probe.lr = 0.3
  config.probe.weight_decay = 1e-6
  config.probe.momentum = 0.9

  config.knn = ml_collections.ConfigDict()
  config.knn.k = (20, 200)
  config.knn.temperature = 0.07
  return config
