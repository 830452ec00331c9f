r"""Quick start on a laptop CPU: Barlow Twins on all of CIFAR-10 in about 10 minutes.

Sized by measurement on 2 CPU cores (benchmarks/step_speed.py): a ResNet-18
at width 8 (1/8 of the standard 64 channels) runs ~250 img/s, 3 epochs of 50k
images in ~10 minutes; width 16 runs ~110 img/s (1.3 epochs), width 64 ~11.
At a fixed budget, more epochs of a narrow encoder learn more than a fraction
of an epoch of a wide one.

Recipe (close to solo-learn's CIFAR Barlow Twins): LARS, lr 0.3 per 256,
weight decay 1e-4, projector 1024-1024-1024, no blur (it hurts at 32 px),
solarize 0.2 on the second view.

Expected (measured on 2 cores): 10 min 38 s; then configs/cifar_linear.py gives
40.6% linear / 38.3% kNN top-1 on the test set (same encoder untrained: 30.6%;
logistic regression on pixels: 38.6%). Details in README, "Quick start".

  python -m barlow_jax.main --config=configs/cifar_bt_cpu.py --workdir=runs/bt_cpu
"""

from configs import cifar_bt


def get_config():
  config = cifar_bt.get_config()
  config.fraction = 1.0
  config.model.encoder = 'resnet18'
  config.model.width = 8
  config.model.projector = '1024-1024-1024'
  config.batch_size = 256
  config.num_epochs = 3.0
  config.optimizer.lr = 0.3
  config.optimizer.bias_lr = 0.3 * 0.024  # The paper's biases/weights ratio (0.0048 / 0.2).
  config.optimizer.weight_decay = 1e-4
  config.optimizer.schedule = 'warmup_cosine'
  config.optimizer.warmup_epochs = 0.3
  for view in (config.augment.view1, config.augment.view2):
    view.blur = 0.0
  config.augment.view2.solarize = 0.2
  config.log_every = 20
  config.checkpoint.every_steps = 200
  # kNN top-1 (bank train[:10000], all 10k test images) after every epoch.
  config.knn_monitor.every_epochs = 1.0
  return config
