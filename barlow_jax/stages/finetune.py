"""Fine-tuning a Barlow Twins encoder on a balanced label fraction (paper App. B.2).

  python -m barlow_jax.main --config=configs/cifar_finetune.py \
      --config.pretrained_workdir=runs/bt --config.label_fraction=0.1 --workdir=runs/ft10

The dataset is the pretraining's unless ``config.dataset`` names another
(ImageNet's semi-supervised protocol: configs/imagenet_finetune.py fine-tunes
on ``imagenet2012_subset/1pct`` or ``/10pct``); either way its images are
standardised with the encoder's statistics (datasets.for_encoder). The
architecture comes from <pretrained_workdir>/config.json and the encoder
weights (params and BatchNorm statistics) from its Orbax checkpoint
(models/pretrained.load); the projector is dropped and a new linear
classifier reads the encoder's features. The whole network is then trained
by the supervised stage with one branch, the classifier at its own learning
rate (``optimizer.head_lr``), on a class-balanced ``label_fraction`` of the
training labels. Writes results.json / results.md (top-1, top-5, micro,
macro-F1 on train, test and augmented test) like every supervised run.
"""

from absl import logging
import ml_collections
import numpy as np

from barlow_jax import config_validation
from barlow_jax.data import datasets
from barlow_jax.data import pipeline
from barlow_jax.evaluators import linear_probe
from barlow_jax.evaluators import predict
from barlow_jax.models import factory
from barlow_jax.models import pretrained
from barlow_jax.runtime import mesh as mesh_lib
from barlow_jax.stages import supervised


def supervised_config(config, pretrained_config) -> ml_collections.ConfigDict:
  """The supervised config of the fine-tuning run.

  The encoder architecture comes from the pretraining config, the dataset too
  unless ``config.dataset`` names another; ``label_fraction`` becomes the
  supervised stage's ``fraction``.

  Args:
    config: the fine-tuning config (configs/cifar_finetune.py).
    pretrained_config: the pretraining workdir's config.

  Returns:
    A new, unlocked ConfigDict for supervised.run.
  """
  result = ml_collections.ConfigDict(config.to_dict())
  result.dataset = config.get('dataset') or pretrained_config.dataset
  for key in ('data_dir', 'download'):  # Where the data is may differ from pretraining.
    if result[key] is None:
      result[key] = pretrained_config[key]
  result.fraction = config.label_fraction
  m = pretrained_config.model
  result.model = ml_collections.ConfigDict({
      'encoder': m.encoder, 'width': m.width, 'stem': m.stem, 'dtype': m.dtype,
      'conv': factory.conv_backend(m),
      'feature_dim': 0,  # The classifier reads the encoder output, as in the paper.
      'embedding': ''})
  result.augment.crop_size = pretrained_config.augment.crop_size
  if pretrained_config.get('data_stats') and result.dataset == pretrained_config.dataset:
    # The encoder's input standardisation (another dataset records its own: supervised.run).
    result.data_stats = pretrained_config.data_stats.to_dict()
  return result


def probe_classifier(config, encoder: pretrained.Pretrained, dataset: datasets.Dataset,
                     mesh) -> dict:
  """The classifier's first weights: a linear probe on the labelled fraction (LP-FT).

  The probe (evaluators/linear_probe, ``config.probe``) is fitted on the clean
  features of the labelled images the fine-tuning trains on (centred, and
  scaled by one std: see linear_probe.feature_standardizer), then folded into
  a Dense layer on raw features. Fine-tuning then starts where the linear
  probe ends instead of from a random classifier, whose gradients first pull
  the encoder towards fitting noise (Kumar et al. (2022), "Fine-Tuning can
  Distort Pretrained Features and Underperform Out-of-Distribution"). At CPU
  scale, 20 epochs from a random classifier ended 2 points below the linear
  probe with the same encoder and labels (docs/reproduce.md).

  Returns:
    {'kernel': [F, K], 'bias': [K]} of the classifier.
  """
  fn = predict.make_predict_fn(encoder.config, encoder.model, None, outputs=('features',),
                               spec=dataset.spec)
  out = predict.predict_split(dataset, fn, encoder.variables, config.train_split,
                              config.eval.batch_size, mesh, seed=config.seed)
  num_classes = dataset.spec.num_classes
  keep = np.arange(len(out['label']))  # Split order, as pipeline.load_train_data selects.
  if config.label_fraction < 1.0:
    keep = pipeline.balanced_subset(out['label'], config.label_fraction, num_classes,
                                    config.fraction_seed)
  fitted = linear_probe.fit_linear_probe(
      out['features'][keep], out['label'][keep], num_classes,
      linear_probe.ProbeHParams.of(config.probe, config.seed), per_feature=False)
  logging.info('Classifier initialised by a linear probe on %d labelled images.', len(keep))
  return linear_probe.as_dense(*fitted)


def initial_variables(config, encoder: pretrained.Pretrained, dataset: datasets.Dataset,
                      mesh) -> dict:
  """The pretrained encoder and, with head_init 'linear_probe', the probe's classifier."""
  params = {'backbone': encoder.variables['params']['backbone']}
  if config.head_init == 'linear_probe':
    params['classifier'] = probe_classifier(config, encoder, dataset, mesh)
  return {'params': params, 'batch_stats': {'backbone': encoder.variables['batch_stats']['backbone']}}


def run(config, workdir: str, allow_config_change: bool = False) -> dict:
  """Restores the encoder, fine-tunes it with a new classifier, evaluates.

  A resumed run keeps its own weights; with another config than it recorded
  it is refused unless ``allow_config_change`` (trainer.fit).

  Returns:
    The results dict (also written to ``workdir``/results.json).
  """
  config_validation.validate_finetune(config)
  mesh = mesh_lib.make_mesh()
  encoder = pretrained.load(config.pretrained_workdir, mesh, config.checkpoint_step,
                            {'data_dir': config.data_dir, 'download': config.download})
  source = {'pretrained_workdir': config.pretrained_workdir, 'pretrained_step': int(encoder.step),
            'label_fraction': float(config.label_fraction)}
  dataset = datasets.for_encoder(config.get('dataset'), encoder.config)
  return supervised.run(supervised_config(config, encoder.config), workdir,
                        init_variables=initial_variables(config, encoder, dataset, mesh),
                        extra_results=source,
                        allow_config_change=allow_config_change, dataset=dataset)
