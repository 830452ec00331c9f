"""optimizer.name='lars' is the official Barlow Twins LARS, step by step.

The reference is a NumPy transcription (float64) of the official PyTorch code
(facebookresearch/barlowtwins, main.py: the LARS class with the
exclude_bias_and_norm filters on, two parameter groups, and
adjust_learning_rate called before every step), written from its algorithm
and independent of optax. Our optimiser is built by optim.create_optimizer
from the shipped configs, with small numbers: 2 steps per epoch, the official
10 warmup epochs (20 steps), 25 epochs (50 steps), all of them run.
"""

import math

import jax
import numpy as np
import optax
import pytest

from barlow_jax import config_files
from barlow_jax import optim

STEPS_PER_EPOCH = 2
NUM_EPOCHS = 25
WARMUP_EPOCHS = 10  # Hard-coded in the official adjust_learning_rate.
TOTAL_STEPS = NUM_EPOCHS * STEPS_PER_EPOCH
# float32 parameters against the float64 transcription, over 50 steps: the
# largest difference seen is 2.7e-5 of a value (a projector bias at step 19)
# when XLA compiles without LLVM's optimisations (conftest.TEST_XLA_FLAGS: no
# fused multiply-adds), under 1e-5 with them. The float64 run below is the
# strict comparison.
RTOL = 3e-5


# --- The official algorithm, transcribed to NumPy -------------------------------------------

def official_lr(step, epochs, loader_len, batch_size):
  """adjust_learning_rate's lr before the per-group factors."""
  max_steps = epochs * loader_len
  warmup_steps = WARMUP_EPOCHS * loader_len
  base_lr = batch_size / 256
  if step < warmup_steps:
    return base_lr * step / warmup_steps
  step -= warmup_steps
  max_steps -= warmup_steps
  q = 0.5 * (1 + math.cos(math.pi * step / max_steps))
  end_lr = base_lr * 0.001
  return base_lr * q + end_lr * (1 - q)


def official_lars_step(params, grads, mus, lrs, weight_decay, momentum, eta):
  """One LARS.step() on flat dicts; lrs = (weights group lr, biases group lr)."""
  new_params, new_mus = {}, {}
  for name, p in params.items():
    dp = grads[name]
    excluded = p.ndim == 1  # exclude_bias_and_norm, for both filters.
    if not excluded:
      dp = dp + weight_decay * p
      param_norm = np.linalg.norm(p)
      update_norm = np.linalg.norm(dp)
      q = eta * param_norm / update_norm if param_norm > 0 and update_norm > 0 else 1.0
      dp = dp * q
    new_mus[name] = momentum * mus[name] + dp
    lr = lrs[1] if p.ndim == 1 else lrs[0]  # param_biases: ndim == 1; param_weights: the rest.
    new_params[name] = p - lr * new_mus[name]
  return new_params, new_mus


def run_official(config, params, grads_seq):
  opt = config.optimizer
  mus = {k: np.zeros_like(v) for k, v in params.items()}
  trajectory = []
  for step, grads in enumerate(grads_seq):
    lr = official_lr(step, NUM_EPOCHS, STEPS_PER_EPOCH, config.batch_size)
    params, mus = official_lars_step(params, grads, mus, (lr * opt.lr, lr * opt.bias_lr),
                                     opt.weight_decay, opt.momentum, opt.trust_coefficient)
    trajectory.append(params)
  return trajectory


# --- Ours ----------------------------------------------------------------------------------

def nest(flat):
  """'a/b/c' keys -> nested dicts, the layout of a Flax params tree."""
  tree = {}
  for key, value in flat.items():
    *path, leaf = key.split('/')
    node = tree
    for name in path:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def flatten(tree):
  return {'/'.join(k.key for k in path): np.asarray(leaf, np.float64)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def run_optax(tx, params, grads_seq, dtype=np.float32):
  """Parameters after each step; float64 (jax.enable_x64) shows the algorithm
  without float32 rounding."""
  @jax.jit
  def step(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  with jax.enable_x64(dtype == np.float64):
    params = nest({k: v.astype(dtype) for k, v in params.items()})
    opt_state = tx.init(params)
    trajectory = []
    for grads in grads_seq:
      params, opt_state = step(params, opt_state, nest({k: v.astype(dtype)
                                                        for k, v in grads.items()}))
      assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(params))
      trajectory.append(flatten(params))
  return trajectory


def old_optax_lars(config):
  """What optim built for 'lars' before: optax.lars (lr before the momentum trace)."""
  opt = config.optimizer

  def schedule(lr):
    return optim.learning_rate_schedule(config, lr * config.batch_size / 256, STEPS_PER_EPOCH,
                                        TOTAL_STEPS)

  return optax.multi_transform(
      {'weights': optax.lars(schedule(opt.lr), weight_decay=opt.weight_decay,
                             momentum=opt.momentum, trust_coefficient=opt.trust_coefficient),
       'norm_and_bias': optax.sgd(schedule(opt.bias_lr), momentum=opt.momentum)},
      optim.param_groups)


# --- Set-up and comparison -----------------------------------------------------------------

def small_config(name):
  config = config_files.load(name)
  config.batch_size = 512  # Peak lr = 2 x the per-256 rates.
  config.num_epochs = float(NUM_EPOCHS)
  config.optimizer.schedule = 'warmup_cosine'
  config.optimizer.warmup_epochs = float(WARMUP_EPOCHS)
  assert config.optimizer.name == 'lars' and config.optimizer.end_lr_factor == 0.001
  assert optim.num_train_steps(config, STEPS_PER_EPOCH) == TOTAL_STEPS
  return config


def problem(seed=0):
  """Params with both groups (and a zero kernel: the trust ratio's zero-norm
  branch) and a different random gradient at every step, of varying scale."""
  rng = np.random.default_rng(seed)
  params = {
      'encoder/conv/kernel': rng.normal(0, 0.3, (3, 3, 4, 8)),
      'encoder/bn/scale': np.ones(8),
      'encoder/bn/bias': np.zeros(8),
      'projector/dense/kernel': rng.normal(0, 0.2, (8, 16)),
      'projector/dense/bias': rng.normal(0, 0.1, (16,)),
      'projector/out/kernel': np.zeros((16, 4)),
  }
  grads_seq = [{k: rng.normal(0, 10 ** rng.uniform(-2, 1), v.shape) for k, v in params.items()}
               for _ in range(TOTAL_STEPS)]
  return params, grads_seq


def compare(ours, ref, start):
  """Per parameter, max over steps of the relative difference (in norm) of
  the parameters, and of their displacement from the start."""
  param_diff, move_diff = {}, {}
  for name, p0 in start.items():
    param_diff[name] = max(
        float(np.linalg.norm(a[name] - b[name]) / max(np.linalg.norm(b[name]), 1e-12))
        for a, b in zip(ours, ref))
    move_diff[name] = max(
        float(np.linalg.norm(a[name] - b[name]) / np.linalg.norm(b[name] - p0))
        for a, b in zip(ours, ref) if np.linalg.norm(b[name] - p0) > 0)
  return param_diff, move_diff


@pytest.mark.parametrize('name', ['imagenet_bt', 'cifar_bt_cpu'])
def test_lars_equals_official_step_by_step(name):
  config = small_config(name)
  params, grads_seq = problem()
  tx, _ = optim.create_optimizer(config, STEPS_PER_EPOCH, TOTAL_STEPS)
  ref = run_official(config, params, grads_seq)
  ours = run_optax(tx, params, grads_seq)  # float32, as in training.
  for step, (a, b) in enumerate(zip(ours, ref)):
    for k in params:
      np.testing.assert_allclose(a[k], b[k], rtol=RTOL, atol=1e-7, err_msg=f'step {step}, {k}')
  # The parameters move by a small fraction per step (lr * eta for kernels),
  # so also compare the movement itself, in float64 (in float32 its rounding
  # alone is ~1e-3 of it; in float64 what is left is the schedule's, which
  # optax computes in float32: ~3e-7).
  _, move_diff = compare(run_optax(tx, params, grads_seq, np.float64), ref, params)
  assert max(move_diff.values()) < 1e-5, move_diff


def test_old_optax_lars_order_fails_the_comparison():
  """optax.lars (lr before the momentum trace) drifts from the official LARS
  under warmup + cosine: the test above is able to fail."""
  config = small_config('imagenet_bt')
  params, grads_seq = problem()
  old = run_optax(old_optax_lars(config), params, grads_seq, np.float64)
  ref = run_official(config, params, grads_seq)
  param_diff, move_diff = compare(old, ref, params)
  kernels = [k for k, v in params.items() if v.ndim > 1]
  for k in kernels:
    assert param_diff[k] > 100 * RTOL, (k, param_diff[k])
    assert move_diff[k] > 0.1, (k, move_diff[k])
  # Its biases/BN group (optax.sgd) already had the official order.
  for k in set(params) - set(kernels):
    assert move_diff[k] < 1e-5, (k, move_diff[k])


@pytest.mark.parametrize('name', ['imagenet_bt', 'cifar_bt_cpu'])
def test_warmup_cosine_is_official_adjust_learning_rate(name):
  config = small_config(name)
  _, weights_lr = optim.create_optimizer(config, STEPS_PER_EPOCH, TOTAL_STEPS)
  for step in range(TOTAL_STEPS):
    expected = official_lr(step, NUM_EPOCHS, STEPS_PER_EPOCH, config.batch_size) * config.optimizer.lr
    np.testing.assert_allclose(float(weights_lr(step)), expected, rtol=1e-5, atol=1e-9,
                               err_msg=f'step {step}')  # float32.
