r"""Linear probe and kNN on a frozen Barlow Twins encoder (paper App. B.1 protocol).

Reads the architecture from <pretrained_workdir>/config.json and the weights
from its latest (or checkpoint_step) Orbax checkpoint. Features are computed
once without augmentation and cached in memory; then a softmax classifier is
trained on them for 100 epochs (SGD momentum 0.9, lr 0.3 cosine, weight decay
1e-6, batch 256) on standardised features, and weighted kNN (k=20, 200,
T=0.07) is run. Expected: see the README, "What to expect on a laptop".

With probe.augment=True the classifier is instead trained (same optimiser
and schedule) on features of random-resized-crop + flip views of the train
images (probe.view), computed on the fly by the frozen encoder: every epoch
costs a forward pass of the encoder over the train images, so 100 epochs of
CIFAR-10 are 5M encoder passes instead of 50k. Test features stay clean.

  python -m barlow_jax.main --config=configs/cifar_linear.py \
      --config.pretrained_workdir=runs/bt --workdir=runs/probe
  python -m barlow_jax.main --config=configs/cifar_linear.py --config.probe.augment=True \
      --config.pretrained_workdir=runs/bt --workdir=runs/probe_aug
"""

import ml_collections
from ml_collections import config_dict


def get_config():
  config = ml_collections.ConfigDict()
  config.mode = 'linear'
  config.pretrained_workdir = config_dict.placeholder(str)
  config.checkpoint_step = config_dict.placeholder(int)  # None: the latest.
  config.random_init = False  # True: same architecture, untrained (a baseline).
  # None: the pretraining's dataset; another name (TFDS or folder:) probes the
  # encoder on it, standardised with the encoder's statistics.
  config.dataset = config_dict.placeholder(str)
  config.data_dir = config_dict.placeholder(str)  # None: as in pretraining.
  config.download = config_dict.placeholder(bool)
  config.train_split = 'train'
  config.test_split = config_dict.placeholder(str)  # None: the dataset's test split.
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
  # False: features computed once without augmentation and cached (seconds).
  # True: each step augments its batch on the device and encodes it with the
  # frozen encoder (BatchNorm in inference mode), then updates the classifier.
  # Features are standardised with the mean/std of the clean train features
  # (augmented-feature statistics are not known before training).
  config.probe.augment = False
  # The augmentation when probe.augment (fields of augment.ViewAugment): the
  # paper's linear-evaluation crop + flip, every other transformation off.
  config.probe.view = dict(crop=1.0, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3),
                           flip=0.5, jitter=0.0, grayscale=0.0, blur=0.0, solarize=0.0)

  # Scalars and images go to TensorBoard (<workdir>/events.*); wandb=True
  # sends the same to Weights & Biases too (the [wandb] extra; run named after
  # the workdir, a resume continues it; runtime/writers.py).
  config.logging = ml_collections.ConfigDict()
  config.logging.wandb = False
  config.logging.wandb_project = 'barlow_jax'
  config.knn = ml_collections.ConfigDict()
  config.knn.k = (20, 200)
  config.knn.temperature = 0.07
  return config
