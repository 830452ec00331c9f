r"""The official PyTorch formulation of the Barlow Twins step, as a worker of compare_torch.py.

facebookresearch/barlowtwins main.py's model at CIFAR scale
(benchmarks/official_torch.py: torchvision's ResNet-18 with the CIFAR stem at
``--width``, the official projector and loss), trained by momentum SGD with
weight decay. Float32, channels_last, ``--threads`` intra-op threads.
The two views are given (the official code augments them in DataLoader
workers, outside the step).

Written here as a benchmark reference only: barlow_jax never imports torch.
"""

from absl import app
from absl import flags
import torch

from benchmarks import bench_worker
from benchmarks import official_torch

flags.DEFINE_integer('width', 8, 'Channels of the first ResNet stage.')
flags.DEFINE_string('projector', '1024-1024-1024', 'Projector sizes.')
flags.DEFINE_integer('batch', 128, 'Images per view and step.')
flags.DEFINE_float('lambd', 0.0051, 'Weight of the off-diagonal term.')
flags.DEFINE_float('lr', 0.1, 'SGD learning rate.')
flags.DEFINE_float('momentum', 0.9, 'SGD momentum.')
flags.DEFINE_float('weight_decay', 1e-4, 'SGD weight decay.')
flags.DEFINE_integer('threads', 2, 'torch.set_num_threads.')
FLAGS = flags.FLAGS


def main(_):
  torch.set_num_threads(FLAGS.threads)
  torch.manual_seed(0)
  model = official_torch.barlow_twins(FLAGS.width, FLAGS.projector, FLAGS.batch, FLAGS.lambd)
  model = model.to(memory_format=torch.channels_last).train()
  optimizer = torch.optim.SGD(model.parameters(), lr=FLAGS.lr, momentum=FLAGS.momentum,
                              weight_decay=FLAGS.weight_decay)
  views = [torch.randn(FLAGS.batch, 3, 32, 32).to(memory_format=torch.channels_last)
           for _ in range(2)]

  def run_steps(n: int) -> None:
    for _ in range(n):
      optimizer.zero_grad()
      loss = model(*views)
      loss.backward()
      optimizer.step()
    loss.item()

  bench_worker.serve(run_steps)


if __name__ == '__main__':
  app.run(main)
