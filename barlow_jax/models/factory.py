"""The networks the stages train, and their construction from ``config.model``.

* ``BarlowTwinsModel``: encoder -> projector, plus an online linear probe
  (pretraining);
* ``SupervisedModel``: encoder -> linear classifier and embedding head (the
  supervised variant of Ramyaa (2022), fine-tuning, supervised baselines).

Both name their encoder ``backbone``, so a pretrained encoder drops into a
supervised model (fine-tuning).
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from barlow_jax.models import encoders
from barlow_jax.models import heads


def _backbone(model: nn.Module) -> nn.Module:
  """The encoder named by ``model``'s fields (encoder, width, stem, dtype, axis_name, conv)."""
  kwargs = dict(width=model.width, dtype=model.dtype, axis_name=model.axis_name,
                conv_backend=model.conv)
  if model.encoder.startswith('resnet'):
    kwargs['stem'] = model.stem  # VGG has a single, stem-less layout.
  return encoders.ENCODERS[model.encoder](**kwargs)


class BarlowTwinsModel(nn.Module):
  """Encoder -> projector, plus an online linear probe on the frozen features.

  The probe sees ``stop_gradient(features)``, so it measures the representation
  during pretraining without changing it (as BYOL and solo-learn do).

  Returns a dict with 'features' [N, F], 'embeddings' [N, D], 'probe_logits' [N, K].
  """
  encoder: str
  projector: str
  num_classes: int
  width: int = 64
  stem: str = 'cifar'
  dtype: Any = jnp.float32
  axis_name: Optional[str] = None
  conv: str = 'xla'  # The CPU convolution (models/conv.BACKENDS); parameters are the same.

  def setup(self):
    self.backbone = _backbone(self)
    self.head = heads.Projector(heads.parse_mlp_spec(self.projector), dtype=self.dtype,
                                axis_name=self.axis_name)
    self.probe = nn.Dense(self.num_classes, dtype=jnp.float32)

  def __call__(self, x, train: bool = True):
    features = self.backbone(x, train=train)
    embeddings = self.head(features, train=train)
    probe_logits = self.probe(jax.lax.stop_gradient(features).astype(jnp.float32))
    return {'features': features, 'embeddings': embeddings, 'probe_logits': probe_logits}


def conv_backend(model_config) -> str:
  """``config.model.conv``; 'xla' for configs recorded before the key existed."""
  return model_config.get('conv', 'xla')


def create_model(config, num_classes: int, axis_name: Optional[str] = None) -> BarlowTwinsModel:
  """The model described by ``config.model`` (see configs/cifar_bt.py); the online probe
  has ``num_classes`` outputs (the dataset's)."""
  m = config.model
  return BarlowTwinsModel(
      encoder=m.encoder, projector=m.projector, num_classes=num_classes,
      width=m.width, stem=m.stem, dtype=jnp.dtype(m.dtype), axis_name=axis_name,
      conv=conv_backend(m))


class SupervisedModel(nn.Module):
  """Encoder -> optional Linear(feature_dim) -> linear classifier and embedding head.

  The supervised Barlow Twins network of Ramyaa (2022, §4.2.1): the encoder's
  output is mapped to 2048 units (``feature_dim``; 0 keeps the encoder's
  output, as fine-tuning does), then a linear classifier and an embedding
  head (``embedding``, e.g. '2048-128'; '' for none) read it. Both branches
  of the Siamese network are this one module applied twice.

  Returns a dict with 'features' [N, F] (encoder), 'representation' [N, R]
  (what the heads read), 'logits' [N, K] float32 and, with an embedding head,
  'embeddings' [N, D].
  """
  encoder: str
  num_classes: int
  width: int = 64
  stem: str = 'cifar'
  feature_dim: int = 2048
  embedding: str = '2048-128'
  dtype: Any = jnp.float32
  axis_name: Optional[str] = None
  conv: str = 'xla'  # The CPU convolution (models/conv.BACKENDS); parameters are the same.

  def setup(self):
    # Same module name as in BarlowTwinsModel, so a pretrained backbone drops in.
    self.backbone = _backbone(self)
    self.fc = nn.Dense(self.feature_dim, dtype=self.dtype) if self.feature_dim else None
    self.classifier = nn.Dense(self.num_classes, dtype=jnp.float32)
    self.embed = heads.MLP(heads.parse_mlp_spec(self.embedding), self.dtype) if self.embedding else None

  def __call__(self, x, train: bool = True):
    features = self.backbone(x, train=train)
    representation = self.fc(features) if self.fc is not None else features
    out = {'features': features, 'representation': representation,
           'logits': self.classifier(representation.astype(jnp.float32))}
    if self.embed is not None:
      out['embeddings'] = self.embed(representation)
    return out


def create_supervised_model(config, num_classes: int,
                            axis_name: Optional[str] = None) -> SupervisedModel:
  """The SupervisedModel described by ``config.model`` (see configs/cifar_supervised_bt.py),
  classifying into ``num_classes`` (the dataset's)."""
  m = config.model
  return SupervisedModel(
      encoder=m.encoder, num_classes=num_classes, width=m.width, stem=m.stem,
      feature_dim=m.feature_dim, embedding=m.embedding, dtype=jnp.dtype(m.dtype),
      axis_name=axis_name, conv=conv_backend(m))
