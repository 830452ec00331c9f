r"""Supervised learning with a Barlow Twins term (seed 001, chapters 3-4) on CIFAR-10.

Two weight-sharing branches, each a ResNet-18 (or VGG-16) whose output is
mapped to 2048 units, then a linear classifier and an embedding head
Linear(2048)-ReLU-Linear(128). Loss (eq. 3.5):

  CE(branch 1) + CE(branch 2) + gamma * BT(z1, z2)

with gamma = 0 the cross-entropy baseline under the identical augmentation.
Optimiser (§4.2.4): SGD, momentum 0.9, lr 0.01, weight decay 1e-4, batch 128
(ResNet-18) or 512 (VGG-16), 1000 epochs (GPU: ~5 h per ResNet-18 run).

Augmentation (§3.1, §4.2.3): the argument after ':' picks the encoder and/or
the ablation of Tables 4.5-4.10, e.g. ``configs/cifar_supervised_bt.py:crop``
or ``:vgg16,grayscale``. The rule, applied to the transformations T of the
ablation (ABLATIONS below), is data only:

  view 1 (targeted branch) = crop + flip + T (T at its targeted probability)
  view 2 (other branch)    = (crop + flip) without T

so every targeted transformation is applied to one branch only, and crop and
flip are always applied on the targeted branch. The default,
'grayscale_solarize', is the full pipeline of §4.2.3 (crop and flip on both
branches; grayscale and solarize on the targeted branch). Augmented-test
accuracy passes the test images through view 1.

Expected (seed 001, Table 4.2, ResNet-18, 1000 epochs): test accuracy
82.78 +- 0.26 for gamma = 0 and 83.63 +- 0.38 for gamma = 1e-3. CPU-scale
numbers: docs/reproduce.md, "Does CE + BT beat CE alone?".

  python -m barlow_jax.main --config=configs/cifar_supervised_bt.py --config.gamma=0.001 --workdir=runs/sbt
  python -m barlow_jax.sweep --config=configs/cifar_supervised_bt.py \
      --gammas=0,1e-4,1e-3,1e-2 --seeds=3 --workdir=runs/sweep
"""

import ml_collections
from ml_collections import config_dict

# Crop and flip: "always applied" (§3.1); here they are the base of both branches.
BASE = {'crop': 1.0, 'flip': 0.5}

# Targeted transformations of each ablation and their probability on view 1.
# The seed gives no probabilities ("with desired probability"); 0.5 makes
# half of the pairs differ by the transformation.
ABLATIONS = {
    'crop': {'crop': 1.0},  # Table 4.5
    'flip': {'flip': 0.5},  # Table 4.6
    'grayscale': {'grayscale': 0.5},  # Table 4.7
    'solarize': {'solarize': 0.5},  # Table 4.8
    'crop_flip': {'crop': 1.0, 'flip': 0.5},  # Table 4.9
    'grayscale_solarize': {'grayscale': 0.5, 'solarize': 0.5},  # Table 4.10; the default
}

# Per encoder: the seed's batch size (§4.2.4).
ENCODERS = {'resnet18': {'batch_size': 128}, 'vgg16': {'batch_size': 512}}

# Every transformation off; views start from this and switch on what they use.
_OFF = dict(crop=0.0, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=0.0, jitter=0.0,
            brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, grayscale=0.0, blur=0.0,
            blur_sigma=(0.1, 2.0), blur_kernel=3, solarize=0.0, solarize_threshold=0.5)


def views(ablation: str) -> tuple[dict, dict]:
  """(view1, view2) augmentation dicts of an ablation (see the module docstring)."""
  targeted = ABLATIONS[ablation]
  view1 = {**_OFF, **BASE, **targeted}
  view2 = {**_OFF, **{k: v for k, v in BASE.items() if k not in targeted}}
  return view1, view2


def _parse_arg(arg: str) -> tuple[str, str]:
  encoder, ablation = 'resnet18', 'grayscale_solarize'
  for token in filter(None, arg.split(',')):
    if token in ENCODERS:
      encoder = token
    elif token in ABLATIONS:
      ablation = token
    else:
      raise ValueError(f'Unknown config argument {token!r}: expected an encoder '
                       f'{sorted(ENCODERS)} and/or an ablation {sorted(ABLATIONS)}.')
  return encoder, ablation


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """The config; ``arg`` is 'encoder', 'ablation' or 'encoder,ablation' (both optional)."""
  encoder, ablation = _parse_arg(arg)
  config = ml_collections.ConfigDict()
  config.mode = 'supervised'
  config.ablation = ablation  # Informational: written to config.json and results.

  config.dataset = 'cifar10'
  config.data_dir = config_dict.placeholder(str)
  config.download = True
  config.bad_images = 'skip'  # Folders: undecodable files 'skip'ped (counted) or 'fatal'.
  config.train_split = 'train'
  # Added to train_split when gamma > 0: images with label -1 that enter only
  # the BT term (STL-10's 'unlabelled[:5000]', §4.4). None for CIFAR.
  config.unlabelled_split = config_dict.placeholder(str)
  config.fraction = 1.0  # Class-balanced fraction of the labelled train_split.
  config.fraction_seed = 0
  config.cache_dataset = True

  config.model = ml_collections.ConfigDict()
  config.model.encoder = encoder  # resnet18 | vgg16 (any of models.ENCODERS)
  config.model.width = 64  # Standard channel width; smaller for CPU runs.
  config.model.stem = 'cifar'
  config.model.feature_dim = 2048  # Encoder output mapped to this many units (§4.2.1).
  config.model.embedding = '2048-128'  # Embedding head: Linear-ReLU-Linear.
  config.model.dtype = 'float32'
  config.model.conv = 'auto'  # CPU convolutions: 'auto' | 'xla' | 'onednn' (docs/onednn.md).

  config.num_branches = 2  # Two weight-shared branches (Siamese, §4.2.2).
  config.gamma = 1e-3  # Weight of the BT term; 0 is the cross-entropy baseline.
  config.lambd = 0.0051  # Off-diagonal weight inside BT; the seed does not give it.
  config.batch_size = ENCODERS[encoder]['batch_size']
  config.num_epochs = 1000.0
  config.num_steps = config_dict.placeholder(int)  # If set, overrides num_epochs.
  config.seed = 0

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'sgd'
  config.optimizer.lr = 0.01
  config.optimizer.bias_lr = config_dict.placeholder(float)  # None: same as lr.
  config.optimizer.head_lr = config_dict.placeholder(float)  # None: same as lr.
  config.optimizer.scale_lr_by_batch = False
  config.optimizer.weight_decay = 1e-4
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = False
  config.optimizer.schedule = 'constant'  # The seed names no schedule.
  config.optimizer.warmup_epochs = 0.0
  config.optimizer.end_lr_factor = 0.0

  config.augment = ml_collections.ConfigDict()
  config.augment.crop_size = 32
  view1, view2 = views(ablation)
  config.augment.view1 = view1
  config.augment.view2 = view2

  config.eval = ml_collections.ConfigDict()
  config.eval.train_split = 'train'  # Train accuracy: these images, not augmented.
  config.eval.test_split = 'test'
  config.eval.aug_view = 'view1'  # Augmented-test accuracy: test images through this view.
  config.eval.batch_size = 512

  config.plots = ml_collections.ConfigDict()
  config.plots.num_examples = 2000  # Augmented train images in the PCA / t-SNE plots; 0: none.
  config.plots.features = 'representation'  # Plotted: 'representation' (2048-d) or 'embeddings'.
  config.plots.tsne = True

  config.log_every = 100
  # Scalars and images go to TensorBoard (<workdir>/events.*); wandb=True
  # sends the same to Weights & Biases too (the [wandb] extra; run named after
  # the workdir, a resume continues it; runtime/writers.py).
  config.logging = ml_collections.ConfigDict()
  config.logging.wandb = False
  config.logging.wandb_project = 'barlow_jax'
  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 2000
  config.checkpoint.max_to_keep = 2
  return config
