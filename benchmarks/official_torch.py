"""facebookresearch/barlowtwins main.py's model in PyTorch, at CIFAR scale.

Transcribed from its documented behaviour: ``BarlowTwins`` (backbone,
projector Linear(bias=False)-BN-ReLU + Linear(bias=False), the affine-free
BatchNorm1d of z, ``c = bn(z1).T @ bn(z2) / batch_size``, on_diag + lambd *
off_diag) on torchvision's ResNet-18 (its BasicBlock and state_dict names,
``zero_init_residual`` as main.py asks of its ResNet-50) with the CIFAR stem
(3x3 stride-1 conv1, maxpool = Identity) at a given width. The one reference
of benchmarks/torch_step.py (speed) and tests/test_official_step.py (the
numbers of the whole step), which loads this file by its path: it imports
torch and torchvision only. barlow_jax itself never imports torch here.
"""

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet


class ResNet18(nn.Module):
  """torchvision's resnet18 (BasicBlock, state_dict names) at ``width``, CIFAR stem, no fc."""

  def __init__(self, width: int):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.Identity()
    cin = width
    for i in range(4):
      cout, stride = width * 2**i, 1 if i == 0 else 2
      down = None
      if stride != 1 or cin != cout:
        down = nn.Sequential(tv_resnet.conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
      setattr(self, f'layer{i + 1}', nn.Sequential(tv_resnet.BasicBlock(cin, cout, stride, down),
                                                   tv_resnet.BasicBlock(cout, cout)))
      cin = cout
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    for m in self.modules():  # zero_init_residual=True
      if isinstance(m, tv_resnet.BasicBlock):
        nn.init.zeros_(m.bn2.weight)

  def forward(self, x):
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return torch.flatten(self.avgpool(x), 1)


def off_diagonal(x):
  n, m = x.shape
  assert n == m
  return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


class BarlowTwins(nn.Module):
  """main.py's BarlowTwins with a given backbone of ``features`` outputs."""

  def __init__(self, backbone: nn.Module, features: int, projector: str, batch_size: int,
               lambd: float):
    super().__init__()
    self.batch_size, self.lambd = batch_size, lambd
    self.backbone = backbone
    sizes = [features] + [int(s) for s in projector.split('-')]
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
    c.div_(self.batch_size)  # The global batch; all_reduce(c) is the identity in one process.
    on_diag = torch.diagonal(c).add_(-1).pow_(2).sum()
    off_diag = off_diagonal(c).pow_(2).sum()
    return on_diag + self.lambd * off_diag


def barlow_twins(width: int, projector: str, batch_size: int, lambd: float) -> BarlowTwins:
  """BarlowTwins on ResNet18(width) (8 * width features)."""
  return BarlowTwins(ResNet18(width), width * 8, projector, batch_size, lambd)
