"""Checks a config before any data is read or anything is compiled.

Every error names the offending key, so a typo costs seconds, not a compile.
"""


from etils import epath
import jax

from barlow_jax.data import augment
from barlow_jax.data import datasets
from barlow_jax.data import folders
from barlow_jax.errors import ConfigError
from barlow_jax.kernels import onednn
from barlow_jax.models import conv
from barlow_jax.models import encoders
from barlow_jax.models import heads


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _one_of(config, key: str, allowed) -> None:
  value = config
  for part in key.split('.'):
    value = value[part]
  _require(value in allowed, f'config.{key}={value!r} is not one of {sorted(allowed)}.')


def validate_model(config) -> None:
  m = config.model
  _one_of(config, 'model.encoder', encoders.ENCODERS)
  _one_of(config, 'model.stem', ('cifar', 'imagenet'))
  _one_of(config, 'model.dtype', ('float32', 'bfloat16', 'float16'))
  _require(m.width > 0, f'config.model.width={m.width} must be positive.')
  # Barlow Twins models have a projector, supervised ones an embedding head.
  for key in ('projector', 'embedding'):
    if m.get(key):
      try:
        heads.parse_mlp_spec(m[key])
      except ValueError as e:
        raise ConfigError(f'config.model.{key}: {e}') from None
  _require('projector' not in m or bool(m.projector), 'config.model.projector must be set.')
  if 'conv' in m:
    _one_of(config, 'model.conv', conv.BACKENDS)
    try:
      conv.resolve_backend(m.conv)  # Builds oneDNN's kernels on first use (seconds).
    except onednn.Unavailable as e:
      raise ConfigError(f"config.model.conv='onednn' cannot be used: {e}. Use 'auto' or 'xla' "
                        'for XLA\'s convolutions (docs/onednn.md).') from None


def validate_data(config) -> None:
  datasets.check_name(config.dataset, config.data_dir)
  if config.get('bad_images') is not None:
    _one_of(config, 'bad_images', folders.BAD_IMAGES)
  _require(0.0 < config.fraction <= 1.0, f'config.fraction={config.fraction} must be in (0, 1].')
  b, n, p = config.batch_size, jax.device_count(), jax.process_count()
  _require(b > 0, f'config.batch_size={b} must be positive.')
  _require(b % n == 0, f'config.batch_size={b} must be divisible by the device count ({n}).')
  _require(b % p == 0, f'config.batch_size={b} must be divisible by the process count ({p}).')


def validate_view(cfg, key: str) -> None:
  """Checks one augment.ViewAugment given as a dict; ``key`` names it in errors."""
  try:
    view = augment.view_from_config(cfg)
  except (ValueError, TypeError) as e:
    raise ConfigError(f'config.{key}: {e}') from None
  for field in ('crop', 'flip', 'jitter', 'grayscale', 'blur', 'solarize'):
    p = getattr(view, field)
    _require(0.0 <= p <= 1.0, f'config.{key}.{field}={p} must be a probability in [0, 1].')
  _require(view.blur_kernel > 0 and view.blur_kernel % 2 == 1,
           f'config.{key}.blur_kernel={view.blur_kernel} must be a positive odd integer.')
  lo, hi = view.crop_scale
  _require(0.0 < lo <= hi <= 1.0, f'config.{key}.crop_scale={view.crop_scale} '
           'must satisfy 0 < min <= max <= 1.')


def validate_augment(config) -> None:
  a = config.augment
  _require(a.crop_size > 0, f'config.augment.crop_size={a.crop_size} must be positive.')
  for name in ('view1', 'view2'):
    validate_view(a[name], f'augment.{name}')


def validate_optimizer(config) -> None:
  o = config.optimizer
  _one_of(config, 'optimizer.name', ('lars', 'sgd', 'adamw'))
  _one_of(config, 'optimizer.schedule', ('warmup_cosine', 'cosine_restarts', 'constant'))
  _require(o.lr > 0, f'config.optimizer.lr={o.lr} must be positive.')
  _require(o.weight_decay >= 0, f'config.optimizer.weight_decay={o.weight_decay} must be >= 0.')
  steps, epochs = config.get('num_steps'), config.get('num_epochs')
  _require(steps is None or steps > 0,
           f'config.num_steps={steps} must be positive (or None: the length is config.num_epochs).')
  _require(epochs is None or epochs > 0, f'config.num_epochs={epochs} must be positive.')
  _require(steps is not None or epochs is not None, 'Set config.num_epochs or config.num_steps.')
  _require(config.log_every > 0, f'config.log_every={config.log_every} must be positive.')
  _require(config.checkpoint.every_steps > 0,
           f'config.checkpoint.every_steps={config.checkpoint.every_steps} must be positive.')


def validate_knn_monitor(config) -> None:
  """config.knn_monitor, if present (configs written before it existed have none).

  Whether the splits exist is checked when training starts, from the
  dataset's metadata (evaluators/knn_monitor.make_hook).
  """
  m = config.get('knn_monitor')
  if m is None:
    return
  _require(m.every_epochs >= 0,
           f'config.knn_monitor.every_epochs={m.every_epochs} must be >= 0 (0: off).')
  _require(isinstance(m.k, int) and m.k > 0, f'config.knn_monitor.k={m.k!r} must be a '
           'positive integer.')
  _require(m.temperature > 0,
           f'config.knn_monitor.temperature={m.temperature} must be positive.')
  for key in ('train_split', 'test_split'):
    _require(isinstance(m[key], str) and bool(m[key].strip()),
             f'config.knn_monitor.{key}={m[key]!r} must be a TFDS split, e.g. \'test[:1000]\'.')


def validate_pretrain(config) -> None:
  """All checks for a Barlow Twins pretraining config; raises ConfigError."""
  _require(config.lambd >= 0, f'config.lambd={config.lambd} must be >= 0.')
  validate_model(config)
  validate_data(config)
  validate_augment(config)
  validate_optimizer(config)
  validate_knn_monitor(config)


def _validate_pretrained_and_labels(config) -> None:
  """What the evaluation stages share: a pretraining workdir to read and a label fraction."""
  workdir = config.pretrained_workdir
  _require(bool(workdir), 'config.pretrained_workdir must be set to a pretraining workdir.')
  _require((epath.Path(workdir) / 'config.json').exists(),
           f'config.pretrained_workdir={workdir!r} has no config.json (not a pretraining workdir?).')
  _require(0.0 < config.label_fraction <= 1.0,
           f'config.label_fraction={config.label_fraction} must be in (0, 1].')


def validate_linear(config) -> None:
  """Checks for the linear-probe / kNN stage; raises ConfigError."""
  _validate_pretrained_and_labels(config)
  if config.get('dataset'):  # Another dataset than the pretraining's.
    datasets.check_name(config.dataset, config.data_dir)
  _require(config.batch_size > 0 and config.batch_size % jax.device_count() == 0,
           f'config.batch_size={config.batch_size} must be a positive multiple of the device '
           f'count ({jax.device_count()}).')
  _require(config.probe.epochs > 0, f'config.probe.epochs={config.probe.epochs} must be positive.')
  if config.probe.get('augment'):
    # One global batch per step, sharded over the devices and fed by every process.
    b, n, p = config.probe.batch_size, jax.device_count(), jax.process_count()
    _require(b > 0 and b % n == 0 and b % p == 0,
             f'config.probe.batch_size={b} must be a positive multiple of the device count ({n}) '
             f'and of the process count ({p}) when config.probe.augment is set.')
  validate_view(config.probe.view, 'probe.view')  # Also the augmented-test accuracy's view.
  _require(all(k > 0 for k in config.knn.k), f'config.knn.k={config.knn.k} must be positive.')


def validate_transfer(config) -> list[str]:
  """Checks for the transfer table (stages/transfer.py); raises ConfigError.

  Returns:
    The dataset names of config.datasets, in order; each checked (datasets.check_name).
  """
  validate_linear(config)
  names = [n.strip() for n in (config.datasets or '').split(',') if n.strip()]
  _require(bool(names), f'config.datasets={config.datasets!r} must name the datasets to probe, '
           "comma-separated: 'cifar10,cifar100,folder:/path'.")
  repeated = sorted({n for n in names if names.count(n) > 1})
  _require(not repeated, f'config.datasets names {repeated} more than once.')
  for name in names:
    datasets.check_name(name, config.data_dir, f'{name!r} of config.datasets')
  _require(not config.probe.augment, 'config.probe.augment=True is not supported by the transfer '
           'table (its head would resume per dataset); probe one dataset with '
           'configs/cifar_linear.py --config.dataset=NAME instead.')
  return names


BASELINE_METHODS = ('knn_k5', 'logistic_regression', 'random_forest')


def validate_baselines(config) -> None:
  """Checks for the raw-pixel baselines stage; raises ConfigError."""
  _one_of(config, 'dataset', datasets.DATASETS)
  unknown = sorted(set(config.methods) - set(BASELINE_METHODS))
  _require(bool(config.methods) and not unknown,
           f'config.methods={tuple(config.methods)} must be a non-empty subset of '
           f'{BASELINE_METHODS}' + (f'; unknown: {unknown}.' if unknown else '.'))
  _require(0.0 < config.label_fraction <= 1.0,
           f'config.label_fraction={config.label_fraction} must be in (0, 1].')
  _require(len(config.logistic_cs) > 0 and all(c > 0 for c in config.logistic_cs),
           f'config.logistic_cs={tuple(config.logistic_cs)} must be positive values.')
  _require(config.logistic_cv_folds >= 2,
           f'config.logistic_cv_folds={config.logistic_cv_folds} must be at least 2.')
  _require(config.forest_trees > 0, f'config.forest_trees={config.forest_trees} must be positive.')


def validate_supervised(config) -> None:
  """Checks for the supervised (CE + CE + gamma * BT) stage; raises ConfigError."""
  _require(config.num_branches in (1, 2),
           f'config.num_branches={config.num_branches} must be 1 or 2.')
  _require(config.gamma >= 0, f'config.gamma={config.gamma} must be >= 0.')
  _require(config.lambd >= 0, f'config.lambd={config.lambd} must be >= 0.')
  _require(config.gamma == 0 or config.num_branches == 2,
           f'config.gamma={config.gamma} needs config.num_branches=2 (the BT term '
           'compares the two branches).')
  _require(config.gamma == 0 or bool(config.model.embedding),
           f'config.gamma={config.gamma} needs an embedding head (config.model.embedding).')
  _require(config.model.feature_dim >= 0,
           f'config.model.feature_dim={config.model.feature_dim} must be >= 0 (0: none).')
  validate_model(config)
  validate_data(config)
  validate_augment(config)
  validate_optimizer(config)
  head_lr = config.optimizer.get('head_lr')
  _require(head_lr is None or head_lr > 0,
           f'config.optimizer.head_lr={head_lr} must be positive (or None: same as lr).')
  _one_of(config, 'eval.aug_view', ('view1', 'view2'))
  _require(config.eval.batch_size > 0 and config.eval.batch_size % jax.device_count() == 0,
           f'config.eval.batch_size={config.eval.batch_size} must be a positive multiple of the '
           f'device count ({jax.device_count()}).')
  _require(config.plots.num_examples >= 0,
           f'config.plots.num_examples={config.plots.num_examples} must be >= 0.')


def validate_finetune(config) -> None:
  """Checks for the fine-tuning stage, before the pretraining config is read."""
  _validate_pretrained_and_labels(config)
  if config.get('dataset'):  # Another dataset than the pretraining's.
    datasets.check_name(config.dataset, config.data_dir)
  _require(config.head_init in ('linear_probe', 'random'),
           f"config.head_init={config.head_init!r} must be 'linear_probe' or 'random'.")
