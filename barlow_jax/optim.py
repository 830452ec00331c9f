"""Optimisers and learning-rate schedules, built from optax.

Parameters fall into three groups:
  * 'weights': kernels of convs and dense layers (ndim > 1);
  * 'norm_and_bias': BatchNorm scales/offsets and biases (ndim <= 1); the
    paper excludes them from weight decay and from the LARS trust ratio and
    gives them their own learning rate (0.0048 vs 0.2);
  * 'probe': the online linear probe, trained by its own Adam so that probing
    never depends on the pretraining recipe.
With ``config.optimizer.head_lr`` set, a fourth group 'head' (the
classifier of a supervised model) gets its own learning rate, as fine-tuning
does (paper App. B.2: 0.002 for the backbone, 0.5 for the classifier).
"""

import functools

import optax
import jax

PROBE_MODULE = 'probe'
HEAD_MODULE = 'classifier'  # models.SupervisedModel's classifier.


def param_groups(params, separate_head: bool = False):
  """Pytree of group labels with the structure of ``params``.

  Args:
    params: the parameter pytree.
    separate_head: label the HEAD_MODULE's parameters 'head' (otherwise they
      are 'weights' or 'norm_and_bias' like the rest).
  """
  def label(path, leaf):
    names = {getattr(k, 'key', None) for k in path}
    if PROBE_MODULE in names:
      return 'probe'
    if separate_head and HEAD_MODULE in names:
      return 'head'
    return 'weights' if leaf.ndim > 1 else 'norm_and_bias'
  return jax.tree_util.tree_map_with_path(label, params)


def num_train_steps(config, steps_per_epoch: int) -> int:
  """config.num_steps if set, else config.num_epochs converted to steps."""
  if config.get('num_steps') is not None:
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
    if warmup == 0:  # A 1-step warmup would make the first step's lr 0.
      return optax.constant_schedule(base_lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, base_lr, max(warmup, 1)), optax.constant_schedule(base_lr)],
        [max(warmup, 1)])
  raise ValueError(f'config.optimizer.schedule={opt.schedule!r} is not one of '
                   "'warmup_cosine', 'cosine_restarts', 'constant'.")


def _scaled(lr: float, batch_size: int, opt) -> float:
  return lr * batch_size / 256 if opt.scale_lr_by_batch else lr


def _weights_and_bias_transforms(opt, weights_lr, bias_lr):
  """(transformation for kernels, for biases and BN) of the named optimiser."""
  if opt.name == 'lars':
    weights = optax.lars(weights_lr, weight_decay=opt.weight_decay, momentum=opt.momentum,
                         trust_coefficient=opt.trust_coefficient)
    # No decay and no trust ratio: plain SGD with momentum, as in the paper.
    return weights, optax.sgd(bias_lr, momentum=opt.momentum)
  if opt.name == 'sgd':
    weights = optax.chain(optax.add_decayed_weights(opt.weight_decay),
                          optax.sgd(weights_lr, momentum=opt.momentum, nesterov=opt.nesterov))
    return weights, optax.sgd(bias_lr, momentum=opt.momentum, nesterov=opt.nesterov)
  if opt.name == 'adamw':
    return optax.adamw(weights_lr, weight_decay=opt.weight_decay), optax.adam(bias_lr)
  raise ValueError(f"config.optimizer.name={opt.name!r} is not one of 'lars', 'sgd', 'adamw'.")


def create_optimizer(config, steps_per_epoch: int, total_steps: int):
  """Returns (optax transformation, weights learning-rate schedule).

  Configs without ``probe_lr`` (models without an online probe) get no
  'probe' group; with ``optimizer.head_lr`` set, the classifier is trained
  with the same optimiser at that learning rate (same schedule shape).
  """
  opt = config.optimizer

  def schedule(lr):
    return learning_rate_schedule(
        config, _scaled(lr, config.batch_size, opt), steps_per_epoch, total_steps)

  weights_lr = schedule(opt.lr)
  bias_base = opt.bias_lr if opt.get('bias_lr') is not None else opt.lr
  weights, norm_and_bias = _weights_and_bias_transforms(opt, weights_lr, schedule(bias_base))
  transforms = {'weights': weights, 'norm_and_bias': norm_and_bias}
  if config.get('probe_lr') is not None:
    transforms['probe'] = optax.adam(config.probe_lr)
  separate_head = opt.get('head_lr') is not None
  if separate_head:
    head_lr = schedule(opt.head_lr)
    # One optimiser for kernel and bias of the head: the split into groups is
    # about the backbone's BN and biases.
    transforms['head'] = _weights_and_bias_transforms(opt, head_lr, head_lr)[0]
  tx = optax.multi_transform(
      transforms, functools.partial(param_groups, separate_head=separate_head))
  return tx, weights_lr
