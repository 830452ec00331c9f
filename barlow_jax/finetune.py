"""Fine-tuning a Barlow Twins encoder on a balanced label fraction (paper App. B.2).

  python -m barlow_jax.main --config=configs/cifar_finetune.py \
      --config.pretrained_workdir=runs/bt --config.label_fraction=0.1 --workdir=runs/ft10

The architecture comes from <pretrained_workdir>/config.json and the encoder
weights (params and BatchNorm statistics) from its Orbax checkpoint
(evaluate.restore_encoder); the projector is dropped and a new linear
classifier reads the encoder's features. The whole network is then trained
by the supervised stage with one branch, the classifier at its own learning
rate (``optimizer.head_lr``), on a class-balanced ``label_fraction`` of the
training labels. Writes results.json / results.md (top-1, top-5, micro,
macro-F1 on train, test and augmented test) like every supervised run.
"""

import ml_collections

from barlow_jax import config_validation
from barlow_jax import evaluate
from barlow_jax import supervised
from barlow_jax import train


def supervised_config(config, pretrain_config) -> ml_collections.ConfigDict:
  """The supervised config of the fine-tuning run.

  Dataset and encoder architecture come from the pretraining config;
  ``label_fraction`` becomes the supervised stage's ``fraction``.

  Args:
    config: the fine-tuning config (configs/cifar_finetune.py).
    pretrain_config: the pretraining workdir's config.

  Returns:
    A new, unlocked ConfigDict for supervised.run.
  """
  sup = ml_collections.ConfigDict(config.to_dict())
  pre = pretrain_config
  sup.dataset = pre.dataset
  for key in ('data_dir', 'download'):  # Where the data is may differ from pretraining.
    if sup.get(key) is None:
      sup[key] = pre[key]
  sup.fraction = config.label_fraction
  sup.model = ml_collections.ConfigDict({
      'encoder': pre.model.encoder, 'width': pre.model.width, 'stem': pre.model.stem,
      'dtype': pre.model.dtype,
      'feature_dim': 0,  # The classifier reads the encoder output, as in the paper.
      'embedding': ''})
  sup.augment.crop_size = pre.augment.crop_size
  return sup


def run(config, workdir: str) -> dict:
  """Restores the encoder, fine-tunes it with a new classifier, evaluates.

  Returns:
    The results dict (also written to ``workdir``/results.json).
  """
  config_validation.validate_finetune(config)
  pre = evaluate.load_pretrain_config(config.pretrained_workdir)
  sup = supervised_config(config, pre)
  _, variables, step = evaluate.restore_encoder(pre, config.pretrained_workdir,
                                                config.get('checkpoint_step'), train.make_mesh())
  source = {'pretrained_workdir': config.pretrained_workdir, 'pretrained_step': int(step),
            'label_fraction': float(config.label_fraction)}
  return supervised.run(sup, workdir, init_variables=variables, extra_results=source)
