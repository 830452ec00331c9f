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

'lars' is the official Barlow Twins LARS (facebookresearch/barlowtwins,
main.py), step by step. Per parameter p with gradient g:
    if p is a kernel (ndim > 1): g += weight_decay * p
                                 g *= eta * |p| / |g|  (1 if either norm is 0)
    mu = momentum * mu + g
    p -= lr(step) * mu
with lr(step) = ``learning_rate_schedule`` ('warmup_cosine' is the official
``adjust_learning_rate``) times optimizer.lr for kernels and optimizer.bias_lr
for biases and BN (the paper's 0.2 and 0.0048, per 256 images). The official
code splits on ndim == 1; ndim <= 1 here (the same without scalar params).
The learning rate multiplies the momentum buffer, *after* it accumulates, as
in the official code and in PyTorch SGD. ``optax.lars`` puts the learning
rate before the momentum trace instead (mu = momentum * mu + lr(step) * g):
the two agree only for a constant learning rate; with warmup and cosine
decay every step's update differs (during warmup the buffer holds gradients
scaled by the earlier, smaller rates). Hence ``lars`` below is assembled
from optax pieces in the official order.
"""

import functools

import optax
import jax
import jax.numpy as jnp

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
    return 'weights' if _is_kernel(leaf) else 'norm_and_bias'
  return jax.tree_util.tree_map_with_path(label, params)


def _is_kernel(leaf) -> bool:
  """Kernels get weight decay and the LARS trust ratio; biases and BN do not."""
  return leaf.ndim > 1


def _kernels_mask(params):
  return jax.tree.map(_is_kernel, params)


def _scale_by_trust_ratio(trust_coefficient: float) -> optax.GradientTransformation:
  """g *= eta * |p| / |g|, 1 if either norm is 0: the official LARS's trust ratio.

  What ``optax.scale_by_trust_ratio(eps=0)`` computes, with plain norms:
  optax's ``safe_norm`` makes its norm differentiable at 0 with a second norm
  and two selects over the whole tensor, which nobody differentiates here;
  on CPU those passes over the projector's 1024x1024 kernels took ~8 ms of the
  quick start's ~230 ms step (benchmarks/step_profile.py).
  """
  def scale(g, p):
    p_norm, g_norm = jnp.linalg.norm(p), jnp.linalg.norm(g)
    ratio = jnp.where((p_norm == 0) | (g_norm == 0), 1.0, trust_coefficient * p_norm / g_norm)
    return g * ratio.astype(g.dtype)

  def update(updates, state, params):
    return jax.tree.map(scale, updates, params), state

  return optax.GradientTransformation(optax.init_empty_state, update)


def lars(learning_rate, weight_decay: float, momentum: float, trust_coefficient: float):
  """The official Barlow Twins LARS (see the module docstring).

  Biases and BN parameters (ndim <= 1) get no weight decay and no trust ratio
  (the official ``exclude_bias_and_norm`` filters), so for them this is SGD
  with momentum. The trust ratio's zero-norm rule (ratio 1 if the parameter
  or the decayed update has norm 0) and eps=0 are the official ones.

  Args:
    learning_rate: a float or an optax schedule of the step (0 at the first
      update), applied to the momentum buffer.
    weight_decay: added to the gradient of kernels as weight_decay * p.
    momentum: of the buffer mu (which starts at zeros).
    trust_coefficient: LARS eta.
  """
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=_kernels_mask),
      optax.masked(_scale_by_trust_ratio(trust_coefficient), _kernels_mask),
      optax.trace(decay=momentum, nesterov=False),
      optax.scale_by_learning_rate(learning_rate))


def num_train_steps(config, steps_per_epoch: int) -> int:
  """config.num_steps if set, else config.num_epochs converted to steps."""
  if config.get('num_steps') is not None:
    return int(config.num_steps)
  if not config.get('num_epochs') or config.num_epochs <= 0:
    raise ValueError('Set config.num_epochs > 0 or config.num_steps > 0.')
  return max(1, int(round(config.num_epochs * steps_per_epoch)))


def learning_rate_schedule(config, base_lr: float, steps_per_epoch: int, total_steps: int):
  """Schedule for a peak learning rate already scaled by batch size.

  'warmup_cosine' (paper): linear warmup from 0, cosine to end_lr_factor * peak
  over the remaining total_steps - warmup steps; with warmup_epochs=10 and
  end_lr_factor=0.001 it is the official ``adjust_learning_rate``:
  peak * step / warmup during warmup, then peak * q + end * (1 - q) with
  q = (1 + cos(pi * (step - warmup) / (total_steps - warmup))) / 2.
  'cosine_restarts' (seed 000, SGDR): cosine cycles of restart_epochs, the
  first one after the warmup.
  'constant': the peak, after warmup.

  The step is converted to the default float first: optax's schedules of an
  int32 count (the optimiser's, the train state's step) compute in float32
  even with jax_enable_x64, which rounds a float64 run's learning rates to
  float32 (5e-7 of the rate at the first warmup step: the float64 run of
  tests/test_official_step.py sees it). float32 runs get the same values.
  """
  schedule = _optax_schedule(config, base_lr, steps_per_epoch, total_steps)
  return lambda step: schedule(jnp.asarray(step, float))


def _optax_schedule(config, base_lr: float, steps_per_epoch: int, total_steps: int):
  """learning_rate_schedule's optax schedule (of the step count)."""
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
    # One LARS for both groups, as in the official code: its masks leave
    # biases and BN without decay and trust ratio (SGD with momentum).
    def make(lr):
      return lars(lr, weight_decay=opt.weight_decay, momentum=opt.momentum,
                  trust_coefficient=opt.trust_coefficient)
    return make(weights_lr), make(bias_lr)
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
    # about the backbone's BN and biases ('lars' still spares the head's bias
    # decay and trust ratio, by its own mask).
    transforms['head'] = _weights_and_bias_transforms(opt, head_lr, head_lr)[0]
  tx = optax.multi_transform(
      transforms, functools.partial(param_groups, separate_head=separate_head))
  return tx, weights_lr
