r"""Quick start on a laptop CPU: Barlow Twins on all of CIFAR-10 in under 12 minutes.

What it gives, with the wall times on the development machine and the
command for each number: README, "What to expect on a laptop".

Sized by measurement on 2 CPU cores: a ResNet-18 at width 8 (1/8 of the
standard 64 channels, 64-d features) with a 1024-1024-1024 projector, batch
128. At a fixed budget, step speed is accuracy: several epochs of a narrow
encoder learn more than a fraction of an epoch of a wide one (width 16 is half
as fast, width 64 ~20x slower), and 24-px training crops run 1.5x as many
img/s as 32-px ones, which won at equal wall time (docs/reproduce.md: 24 px x
8 epochs against 32 px x 4.5). 6 epochs, with the kNN monitor every second
epoch, are what fits in 12 minutes with the probe on the 2-core development
machine of 2026-12-06 with oneDNN's convolutions, with a margin for slower
ones (docs/reproduce.md, "The quick start on oneDNN").

Recipe (close to solo-learn's CIFAR Barlow Twins), each choice measured here
after 1 epoch (docs/reproduce.md, "How the quick start's recipe was chosen"):
  * LARS with trust coefficient 0.02 (solo-learn's CIFAR eta) instead of the
    paper's 0.001: every step moves the weights by lr * eta of their norm,
    and 0.001 is sized for 1000 epochs of ImageNet;
  * batch 128 instead of 256: twice the updates for the same images;
  * random-resized-crop scale 0.35-1 instead of 0.08-1: small crops of a
    32-px image leave little to match in a few epochs (kNN after 1 epoch:
    39.0 at 0.2-1, 42.4 at 0.35-1, 41.7 at 0.5-1);
  * lr 0.3 per 256 (0.15 and 0.6 were worse), lambda 0.0051 (0.002 and 0.01
    were worse), weight decay 1e-4, projector 1024^3 (512^3 and 2048^3 were
    worse), no blur (it hurts at 32 px), solarize 0.2 on the second view
    (removing it was worse), colour jitter as the paper.

  python -m barlow_jax.main --config=configs/cifar_bt_cpu.py --workdir=runs/bt_cpu
  python -m barlow_jax.main --config=configs/cifar_linear.py \
      --config.pretrained_workdir=runs/bt_cpu --workdir=runs/probe_cpu
"""

from barlow_jax.config_files import sibling

cifar_bt = sibling(__file__, 'cifar_bt')


def get_config():
  config = cifar_bt.get_config()
  config.fraction = 1.0
  config.model.encoder = 'resnet18'
  config.model.width = 8
  config.model.projector = '1024-1024-1024'
  config.batch_size = 128
  config.num_epochs = 6.0
  config.optimizer.lr = 0.3
  config.optimizer.bias_lr = 0.3 * 0.024  # The paper's biases/weights ratio (0.0048 / 0.2).
  config.optimizer.trust_coefficient = 0.02
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = 'warmup_cosine'
  config.optimizer.warmup_epochs = 0.3
  for view in (config.augment.view1, config.augment.view2):
    view.blur = 0.0
    view.crop_scale = (0.35, 1.0)
  config.augment.crop_size = 24  # Trains on 24-px crops; evaluation sees the 32-px images.
  config.augment.view2.solarize = 0.2
  config.log_every = 50
  config.checkpoint.every_steps = 500
  # kNN top-1 (bank train[:10000], all 10k test images) after every second epoch and at the end.
  config.knn_monitor.every_epochs = 2.0
  return config
