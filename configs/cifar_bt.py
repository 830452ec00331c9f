r"""Barlow Twins on a balanced 10% of CIFAR-10: the setting of seed 000.

Seed 000 ("Self Supervised learning in image classification: Introducing
Barlow Twins", 2022) pretrains a ResNet-50 with an 8192-8192 projector on a
class-balanced 10% of CIFAR-10 for 1000 epochs, batch 64, with cosine
annealing and warm restarts every 30 epochs, and reports 66.4% test accuracy
(micro) for a classifier on the learned features (20%: 69.1%).

Augmentation (seed 000 §4): random resized crop and Gaussian blur always,
horizontal flip 0.5, colour jitter 0.8, grayscale 0.2, no solarization.

Optimiser: the seed does not say; we use the paper's LARS recipe scaled to
batch 64 (lr 0.2 * 64/256 for weights, 0.0048 * 64/256 for biases and BN).
Note: 10% here is of the 50k training images (500 per class); the seed took
10% of all 60k (600 per class).

Cost: 1000 epochs of 5000 images is 78k steps of ResNet-50 at batch 64; on one
modern GPU expect several hours. It does not fit on a CPU; for that, see
configs/cifar_bt_cpu.py.

  python -m barlow_jax.main --config=configs/cifar_bt.py --workdir=runs/bt
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.mode = 'pretrain'  # Which stage barlow_jax.main runs.

  # Data: a tuned name (barlow_jax/data/datasets.DATASETS), any TFDS name
  # ('name[/config][:version]') or 'folder:/path/to/images' (docs/data.md).
  # data_dir=None uses TFDS_DATA_DIR or ~/tensorflow_datasets (folders are
  # prepared under it); download fetches a missing TFDS dataset.
  config.dataset = 'cifar10'
  config.data_dir = config_dict.placeholder(str)
  config.download = True
  config.bad_images = 'skip'  # Folders: undecodable files 'skip'ped (counted) or 'fatal'.
  config.train_split = 'train'  # e.g. 'unlabelled' or 'train+unlabelled' for stl10.
  config.fraction = 0.1  # Class-balanced fraction of train_split, in (0, 1].
  config.fraction_seed = 0  # Which balanced subset: same seed, same images.
  config.cache_dataset = True  # Keep encoded images in host RAM (off for ImageNet).

  config.model = ml_collections.ConfigDict()
  config.model.encoder = 'resnet50'  # resnet18 | resnet34 | resnet50 | vgg16
  config.model.width = 64  # Channels of the first stage; 64 is the standard width.
  config.model.stem = 'cifar'  # 'cifar': 3x3/1 conv, no max-pool; 'imagenet': 7x7/2 + pool.
  config.model.projector = '8192-8192'  # Linear-BN-ReLU between layers, last Linear plain.
  config.model.dtype = 'float32'  # Activations; 'bfloat16' on TPU. C is always float32.
  # CPU convolutions: 'auto' (oneDNN's where the [onednn] extra loads, else XLA's), 'xla' or
  # 'onednn' (an error where it cannot load). Same results; GPU/TPU use XLA's (docs/onednn.md).
  config.model.conv = 'auto'

  config.lambd = 0.0051  # Weight of the off-diagonal term.
  config.batch_size = 64  # Global, over all devices and processes.
  config.num_epochs = 1000.0
  config.num_steps = config_dict.placeholder(int)  # If set, overrides num_epochs.
  config.seed = 0

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'lars'  # lars | sgd | adamw
  config.optimizer.lr = 0.2  # Per 256 images when scale_lr_by_batch.
  config.optimizer.bias_lr = 0.0048  # Biases and BN; None means the same as lr.
  config.optimizer.scale_lr_by_batch = True
  config.optimizer.weight_decay = 1.5e-6
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = False
  config.optimizer.trust_coefficient = 0.001  # LARS eta.
  config.optimizer.schedule = 'cosine_restarts'  # warmup_cosine | cosine_restarts | constant
  config.optimizer.warmup_epochs = 10.0
  config.optimizer.restart_epochs = 30.0  # Cycle length of cosine_restarts.
  config.optimizer.end_lr_factor = 0.001  # Cosine ends at this fraction of the peak.
  config.probe_lr = 1e-3  # Adam on the online linear probe (stop-gradient features).

  config.augment = ml_collections.ConfigDict()
  config.augment.crop_size = 32
  common = dict(crop=1.0, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=0.5,
                jitter=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
                grayscale=0.2, blur=1.0, blur_sigma=(0.1, 2.0), blur_kernel=3,
                solarize=0.0, solarize_threshold=0.5)
  config.augment.view1 = dict(common)
  config.augment.view2 = dict(common)

  # Online kNN monitor (barlow_jax/evaluators/knn_monitor.py): every
  # every_epochs epochs and at the end, frozen features of train_split (the memory bank) and
  # test_split with the current weights, weighted kNN top-1 logged as
  # monitor/knn_top1. 0 turns it off. Cost per firing: one inference pass over
  # both splits, here 20k images, ~7% of the 10 epochs of 5k images x 2 views
  # (forward + backward) between firings.
  config.knn_monitor = ml_collections.ConfigDict()
  config.knn_monitor.every_epochs = 10.0
  config.knn_monitor.train_split = 'train[:10000]'
  config.knn_monitor.test_split = 'test'
  config.knn_monitor.k = 20
  config.knn_monitor.temperature = 0.07

  config.log_every = 100
  # Scalars and images go to TensorBoard (<workdir>/events.*); wandb=True
  # sends the same to Weights & Biases too (the [wandb] extra; run named after
  # the workdir, a resume continues it; runtime/writers.py).
  config.logging = ml_collections.ConfigDict()
  config.logging.wandb = False
  config.logging.wandb_project = 'barlow_jax'
  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 2000
  config.checkpoint.max_to_keep = 3
  return config
