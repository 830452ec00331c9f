r"""Barlow Twins on ImageNet: the paper's recipe (Zbontar et al., 2021, §4 and App. A-B).

ResNet-50 (ImageNet stem), projector 8192-8192-8192, lambda 0.0051, batch
2048, 1000 epochs, LARS (lr 0.2 weights / 0.0048 biases and BN, x batch/256,
weight decay 1.5e-6, 10 warmup epochs, cosine to 1/1000 of the peak), and the
asymmetric augmentation: blur 1.0 / 0.1, solarize 0.0 / 0.2 on the two views.

Expected: 73.2% top-1 linear evaluation (paper Table 1); the paper's 1000
epochs took 124 hours on 32 V100s. TFDS needs the ImageNet tars in its manual
dir (see the TFDS imagenet2012 page). As the official code, each view's
random-resized crop is cut from the whole image (on the host,
data/host_crop.py; the photometric ops run on the device) and evaluation uses
Resize(256) + CenterCrop(224).

  launch/tpu_pod.sh --tpu=NAME --zone=ZONE -- --config=configs/imagenet_bt.py --workdir=gs://bucket/bt
  python -m barlow_jax.main --config=configs/imagenet_bt.py --workdir=runs/imagenet_bt   # one host

Small-scale check of this exact config on a CPU (ImageNet must be prepared):
  --config.batch_size=16 --config.num_steps=2 --config.model.width=8 --config.model.projector=64-64
"""

from barlow_jax.config_files import sibling

cifar_bt = sibling(__file__, 'cifar_bt')


def get_config():
  config = cifar_bt.get_config()
  config.dataset = 'imagenet2012'
  config.fraction = 1.0
  config.cache_dataset = False  # 140 GB of JPEGs do not fit in host RAM.
  config.model.encoder = 'resnet50'
  config.model.stem = 'imagenet'
  config.model.projector = '8192-8192-8192'
  config.model.dtype = 'bfloat16'  # Activations; C and the loss stay float32.
  config.batch_size = 2048
  config.num_epochs = 1000.0
  config.optimizer.schedule = 'warmup_cosine'
  config.optimizer.warmup_epochs = 10.0
  config.augment.crop_size = 224
  for view in (config.augment.view1, config.augment.view2):
    view.blur_kernel = 23  # ~10% of 224.
  config.augment.view1.blur = 1.0
  config.augment.view1.solarize = 0.0
  config.augment.view2.blur = 0.1
  config.augment.view2.solarize = 0.2
  config.log_every = 100
  config.checkpoint.every_steps = 5000
  # ImageNet's test split has no labels: the monitor scores validation
  # images, against a bank of 50 training images per class on average.
  config.knn_monitor.train_split = 'train[:50000]'
  config.knn_monitor.test_split = 'validation[:10000]'
  return config
