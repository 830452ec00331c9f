r"""Quick start on a laptop CPU: Barlow Twins on CIFAR-10 in minutes.

Placeholder: sized by measurement below.
"""

from configs import cifar_bt


def get_config():
  config = cifar_bt.get_config()
  config.fraction = 1.0
  config.model.encoder = 'resnet18'
  config.model.width = 16
  config.model.projector = '512-512-512'
  config.batch_size = 128
  config.num_epochs = 1.0
  config.optimizer.schedule = 'warmup_cosine'
  config.optimizer.warmup_epochs = 0.1
  config.log_every = 20
  config.checkpoint.every_steps = 200
  return config
