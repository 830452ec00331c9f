r"""Quick start on a laptop CPU: Barlow Twins on all of CIFAR-10 in about 12 minutes.

Sized by measurement on 2 CPU cores (benchmarks/step_speed.py): a ResNet-18
at width 8 (1/8 of the standard 64 channels, 64-d features) runs ~380 img/s
at batch 128, so 5 epochs of 50k images take ~11 minutes; width 16 runs
about a third as fast, width 64 ~11 img/s. At a fixed budget, several epochs
of a narrow encoder learn more than a fraction of an epoch of a wide one.

Recipe (close to solo-learn's CIFAR Barlow Twins), each choice measured here
after 1 epoch (linear / kNN k=20 top-1, README "What to expect on a laptop"):
  * LARS with trust coefficient 0.02 (solo-learn's CIFAR eta) instead of the
    paper's 0.001: every step moves the weights by lr * eta of their norm,
    and 0.001 is sized for 1000 epochs of ImageNet (38.4 -> 39.6);
  * batch 128 instead of 256: twice the updates for the same images
    (-> 41.8; batch 64: 41.9);
  * random-resized-crop scale 0.2-1 instead of 0.08-1: 32 px crops of 8% of
    the image leave little to match after a few epochs (-> 42.6 / 42.6);
  * lr 0.3 per 256, weight decay 1e-4, projector 1024-1024-1024, no blur (it
    hurts at 32 px), solarize 0.2 on the second view.

Expected (measured on 2 cores, 2026-12-04): ~11.5 minutes of pretraining on
an otherwise idle machine; kNN monitor 39.7, 45.0, 47.3, 48.0, 48.4 after
epochs 1-5; then configs/cifar_linear.py gives 50.7% linear / 51.6% kNN
(k=20) top-1 on the test set, against 30.6%
for the same encoder untrained and 41.3% for logistic regression on raw
pixels (C chosen by cross-validation; README, "Quick start").

  python -m barlow_jax.main --config=configs/cifar_bt_cpu.py --workdir=runs/bt_cpu
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
  config.num_epochs = 5.0
  config.optimizer.lr = 0.3
  config.optimizer.bias_lr = 0.3 * 0.024  # The paper's biases/weights ratio (0.0048 / 0.2).
  config.optimizer.trust_coefficient = 0.02
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = 'warmup_cosine'
  config.optimizer.warmup_epochs = 0.3
  for view in (config.augment.view1, config.augment.view2):
    view.blur = 0.0
    view.crop_scale = (0.2, 1.0)
  config.augment.view2.solarize = 0.2
  config.log_every = 50
  config.checkpoint.every_steps = 500
  # kNN top-1 (bank train[:10000], all 10k test images) after every epoch.
  config.knn_monitor.every_epochs = 1.0
  return config
