"""Optimisers and learning-rate schedules, built from optax.

Parameters fall into three groups:
  * 'weights': kernels of convs and dense layers (ndim > 1);
  * 'norm_and_bias': BatchNorm scales/offsets and biases (ndim <= 1); the
    paper excludes them from weight decay and from the LARS trust ratio and
    gives them their own learning rate (0.0048 vs 0.2);
  * 'probe': the online linear probe, trained by its own Adam so that probing
    never depends on the pretraining recipe.
"""

import optax
import jax

PROBE_MODULE = 'probe'


def param_groups(params):
  """Pytree of group labels with the structure of ``params``."""
  def label(path, leaf):
    if any(getattr(k, 'key', None) == PROBE_MODULE for k in path):
      return 'probe'
    return 'weights' if leaf.ndim > 1 else 'norm_and_bias'
  return jax.tree_util.tree_map_with_path(label, params)


def num_train_steps(config, steps_per_epoch: int) -> int:
  """config.num_steps if set, else config.num_epochs converted to steps."""
  if config.get('num_steps'):
    return int(config.num_steps)
  if not config.get('num_epochs') or config.num_epochs <= 0:
    raise ValueError('Set config.num_epochs > 0 or config.num_steps > 0.')
  return max(1, int(round(config.num_epochs * steps_per_epoch)))


def learning_rate_schedule(config, base_lr: float, steps_per_epoch: int, total_steps: int):
  """Schedule for a peak learning rate already scaled by batch size.

  'warmup_cosine' (paper): linear warmup from 0, cosine to end_lr_factor * peak.
  'cosine_restarts' (seed 000, SGDR): cosine cycles of restart_epochs, the
  first one after the warmup.
  'constant': the peak, after warmup.
  """
  opt = config.optimizer
  warmup = min(int(opt.warmup_epochs * steps_per_epoch), total_steps - 1)
  end = base_lr * opt.end_lr_factor
  if opt.schedule == 'warmup_cosine':
    return optax.warmup_cosine_decay_schedule(0.0, base_lr, warmup, total_steps, end)
  if opt.schedule == 'cosine_restarts':
    period = max(1, int(opt.restart_epochs * steps_per_epoch))
    first = dict(init_value=0.0, peak_value=base_lr, warmup_steps=warmup,
                 decay_steps=warmup + period, end_value=end)
    cycle = dict(init_value=base_lr, peak_value=base_lr, warmup_steps=0,
                 decay_steps=period, end_value=end)
    num_cycles = max(1, -(-(total_steps - warmup) // period))
    return optax.sgdr_schedule([first] + [cycle] * (num_cycles - 1))
  if opt.schedule == 'constant':
    return optax.join_schedules(
        [optax.linear_schedule(0.0, base_lr, max(warmup, 1)), optax.constant_schedule(base_lr)],
        [max(warmup, 1)])
  raise ValueError(f'config.optimizer.schedule={opt.schedule!r} is not one of '
                   "'warmup_cosine', 'cosine_restarts', 'constant'.")


def _scaled(lr: float, batch_size: int, opt) -> float:
  return lr * batch_size / 256 if opt.scale_lr_by_batch else lr


def create_optimizer(config, steps_per_epoch: int, total_steps: int):
  """Returns (optax transformation, weights learning-rate schedule)."""
  opt = config.optimizer
  weights_lr = learning_rate_schedule(
      config, _scaled(opt.lr, config.batch_size, opt), steps_per_epoch, total_steps)
  bias_base = opt.bias_lr if opt.get('bias_lr') is not None else opt.lr
  bias_lr = learning_rate_schedule(
      config, _scaled(bias_base, config.batch_size, opt), steps_per_epoch, total_steps)
  if opt.name == 'lars':
    weights = optax.lars(weights_lr, weight_decay=opt.weight_decay, momentum=opt.momentum,
                         trust_coefficient=opt.trust_coefficient)
    # No decay and no trust ratio: plain SGD with momentum, as in the paper.
    norm_and_bias = optax.sgd(bias_lr, momentum=opt.momentum)
  elif opt.name == 'sgd':
    weights = optax.chain(optax.add_decayed_weights(opt.weight_decay),
                          optax.sgd(weights_lr, momentum=opt.momentum, nesterov=opt.nesterov))
    norm_and_bias = optax.sgd(bias_lr, momentum=opt.momentum, nesterov=opt.nesterov)
  elif opt.name == 'adamw':
    weights = optax.adamw(weights_lr, weight_decay=opt.weight_decay)
    norm_and_bias = optax.adam(bias_lr)
  else:
    raise ValueError(f"config.optimizer.name={opt.name!r} is not one of 'lars', 'sgd', 'adamw'.")
  tx = optax.multi_transform(
      {'weights': weights, 'norm_and_bias': norm_and_bias, 'probe': optax.adam(config.probe_lr)},
      param_groups)
  return tx, weights_lr
