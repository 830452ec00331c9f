r"""The official PyTorch formulation of the Barlow Twins step, as a worker of compare_torch.py.

facebookresearch/barlowtwins main.py, at CIFAR scale: a torchvision-layout
ResNet-18 with the CIFAR stem (3x3 stride-1 conv, no max-pool) at
``--width``, ``zero_init_residual``; the projector Linear(bias=False)-BN-ReLU
x2 + Linear(bias=False); ``c = bn(z1).T @ bn(z2) / N`` with
``BatchNorm1d(affine=False)``; loss on_diag + lambda * off_diag; momentum SGD
with weight decay. Float32, channels_last, ``--threads`` intra-op threads.
The two views are given (the official code augments them in DataLoader
workers, outside the step).

Written here as a benchmark reference only: barlow_jax never imports torch.
"""

from absl import app
from absl import flags
import torch
from torch import nn

from benchmarks import bench_worker

flags.DEFINE_integer('width', 8, 'Channels of the first ResNet stage.')
flags.DEFINE_string('projector', '1024-1024-1024', 'Projector sizes.')
flags.DEFINE_integer('batch', 128, 'Images per view and step.')
flags.DEFINE_float('lambd', 0.0051, 'Weight of the off-diagonal term.')
flags.DEFINE_float('lr', 0.1, 'SGD learning rate.')
flags.DEFINE_float('momentum', 0.9, 'SGD momentum.')
flags.DEFINE_float('weight_decay', 1e-4, 'SGD weight decay.')
flags.DEFINE_integer('threads', 2, 'torch.set_num_threads.')
FLAGS = flags.FLAGS


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
  return nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)


class BasicBlock(nn.Module):
  """torchvision's ResNet-18 block."""

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.conv1, self.bn1 = conv3x3(cin, cout, stride), nn.BatchNorm2d(cout)
    self.conv2, self.bn2 = conv3x3(cout, cout), nn.BatchNorm2d(cout)
    nn.init.zeros_(self.bn2.weight)  # zero_init_residual=True
    self.relu = nn.ReLU(inplace=True)
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    return self.relu(self.bn2(self.conv2(out)) + identity)


def resnet18_cifar(width: int) -> nn.Sequential:
  layers = [conv3x3(3, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
  cin = width
  for stage in range(4):
    cout = width * 2**stage
    for block in range(2):
      layers.append(BasicBlock(cin, cout, 2 if stage > 0 and block == 0 else 1))
      cin = cout
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
  return nn.Sequential(*layers)


class BarlowTwins(nn.Module):
  """The official module: backbone, projector, loss."""

  def __init__(self, width: int, projector: str, batch_size: int, lambd: float):
    super().__init__()
    self.batch_size, self.lambd = batch_size, lambd
    self.backbone = resnet18_cifar(width)
    sizes = [width * 8] + [int(s) for s in projector.split('-')]
    layers = []
    for i in range(len(sizes) - 2):
      layers += [nn.Linear(sizes[i], sizes[i + 1], bias=False), nn.BatchNorm1d(sizes[i + 1]),
                 nn.ReLU(inplace=True)]
    layers.append(nn.Linear(sizes[-2], sizes[-1], bias=False))
    self.projector = nn.Sequential(*layers)
    self.bn = nn.BatchNorm1d(sizes[-1], affine=False)

  def forward(self, y1, y2):
    z1 = self.projector(self.backbone(y1))
    z2 = self.projector(self.backbone(y2))
    c = self.bn(z1).T @ self.bn(z2)
    c.div_(self.batch_size)
    on_diag = torch.diagonal(c).add_(-1).pow_(2).sum()
    n = c.shape[0]
    off_diag = c.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten().pow_(2).sum()
    return on_diag + self.lambd * off_diag


def main(_):
  torch.set_num_threads(FLAGS.threads)
  torch.manual_seed(0)
  model = BarlowTwins(FLAGS.width, FLAGS.projector, FLAGS.batch, FLAGS.lambd)
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
