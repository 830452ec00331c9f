"""Barlow Twins pretraining (Zbontar et al., 2021): the loss, the stage, the picture of C.

  python -m barlow_jax.main --config=configs/cifar_bt_cpu.py --workdir=runs/bt_cpu

Each device augments and encodes its slice of the global batch twice (two
views); BatchNorm and the Barlow Twins normalisation see the global batch
through collectives over DATA_AXIS, and each device computes its own block of
rows of the cross-correlation matrix (losses.py). An online linear probe on
``stop_gradient(features)`` reports how linearly separable the features are
while they are learned. The step, the loop, checkpoints and resume are the
trainer's (trainer.py).
"""

import functools
import os
from typing import NamedTuple

from etils import epath
import jax
import numpy as np

from barlow_jax import config_validation
from barlow_jax import losses
from barlow_jax import plots
from barlow_jax import trainer
from barlow_jax.data import augment
from barlow_jax.data import datasets
from barlow_jax.data import pipeline
from barlow_jax.evaluators import knn_monitor
from barlow_jax.evaluators import predict
from barlow_jax.models import factory
from barlow_jax.runtime import distributed
from barlow_jax.runtime import mesh as mesh_lib
from barlow_jax.runtime import state as state_lib
from barlow_jax.runtime.mesh import DATA_AXIS
from barlow_jax.runtime.state import TrainState

CONSOLE_KEYS = ('bt_loss', 'on_diag', 'off_diag', 'probe_accuracy', 'learning_rate')


def make_loss_fn(model: factory.BarlowTwinsModel, lambd: float) -> trainer.LossFn:
  """on_diag + lambd * off_diag of the two views, plus the online probe's cross-entropy."""

  def loss_fn(params, batch_stats, inputs, labels):
    (out1, out2), batch_stats = trainer.apply_per_view(model, params, batch_stats, inputs)
    terms = losses.barlow_twins_terms(out1['embeddings'], out2['embeddings'], DATA_AXIS)
    bt_loss = terms.on_diag + lambd * terms.off_diag
    # The probe reads stop_gradient(features): its loss trains only the probe.
    probe_loss, probe_acc = losses.masked_cross_entropy(out1['probe_logits'], labels, DATA_AXIS)
    metrics = {'bt_loss': bt_loss, 'on_diag': terms.on_diag, 'off_diag': terms.off_diag,
               'probe_loss': probe_loss, 'probe_accuracy': probe_acc}
    return bt_loss + probe_loss, (batch_stats, metrics)

  return loss_fn


def run(config, workdir: str, allow_config_change: bool = False) -> TrainState:
  """Pretrains with Barlow Twins into ``workdir``, resuming from its latest checkpoint.

  Writes checkpoints, config.json, TensorBoard scalars and images (both
  augmented views at step 1, C at every checkpoint) and cross_correlation.png
  (C of two views of test images at the end). A run resumed with another
  config than it recorded is refused unless ``allow_config_change``
  (trainer.fit).

  Returns:
    The final TrainState (replicated over the mesh).
  """
  config_validation.validate_pretrain(config)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  mesh = mesh_lib.make_mesh()
  dataset = datasets.from_config(config)
  datasets.record_stats(config, dataset)
  data = pipeline.load_train_data(dataset, config.train_split, config.fraction,
                                  config.fraction_seed)
  length = trainer.Length.of(config, data.num_global)
  model = factory.create_model(config, dataset.spec.num_classes, axis_name=DATA_AXIS)
  hooks = [knn_monitor.make_hook(config, dataset, length.steps_per_epoch, length.total_steps,
                                 mesh)]
  # Built on first use: after trainer.fit has checked the workdir (bad input
  # exits before anything is compiled), then once.
  two_views = functools.cache(lambda: make_two_view_fn(config, dataset))
  hooks.append(make_image_hook(two_views, config.checkpoint.every_steps, length.total_steps))
  task = trainer.Task(model, make_loss_fn(model, config.lambd), 2, CONSOLE_KEYS)
  state = trainer.fit(config, workdir, task, data, mesh, hooks=[h for h in hooks if h],
                      allow_config_change=allow_config_change)
  if jax.process_index() == 0:
    final = two_views()({'params': state.params, 'batch_stats': state.batch_stats},
                        int(state.step.addressable_data(0)))
    write_cross_correlation_png(final, os.path.join(workdir, 'cross_correlation.png'))
  return state


class TwoViews(NamedTuple):
  """Two augmented views of the same test images and the C of their embeddings."""
  c: np.ndarray  # [D, D] cross-correlation of the embeddings (losses.cross_correlation).
  view1: np.ndarray  # [N, H, W, 3] in [0, 1]: the network's inputs, before standardising.
  view2: np.ndarray
  step: int  # Of the weights.


def make_two_view_fn(config, dataset: datasets.Dataset, num_images: int = 256):
  """``fn(variables, step) -> TwoViews`` on the first ``num_images`` test images.

  ``variables`` is {'params', 'batch_stats'} (of a TrainState or
  models/pretrained.load), replicated over a mesh; ``step`` only labels the result.
  The images are ``dataset``'s (datasets.resolve), of its test split.

  The images and the augmentation keys are fixed, so the views are the same
  at every call and C changes only with the weights. Each view is the
  evaluators' ``predict`` (BatchNorm in inference mode) on this process's
  first device, compiled once, here.
  """
  spec = dataset.spec
  batch = next(pipeline.eval_batches(dataset.builder, spec, spec.test_split, num_images))
  images = batch['image'][batch['mask']]
  model = factory.create_model(config, spec.num_classes)
  views = [augment.view_from_config(config.augment.view1),
           augment.view_from_config(config.augment.view2)]
  keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(config.seed), 2**31 - 1), 2)
  abstract = state_lib.variable_shapes(model, config.augment.crop_size)
  abstract = {k: abstract[k] for k in ('params', 'batch_stats')}
  fns = [predict.make_predict_fn(config, model, view, ('embeddings', predict.INPUTS), spec=spec)
         for view in views]
  # Compiled here, once: callers may wait for it (make_image_hook).
  compiled = [fn.lower(abstract, images, key).compile() for fn, key in zip(fns, keys)]
  z = jax.eval_shape(fns[0], abstract, images, keys[0])['embeddings']
  correlate = jax.jit(losses.cross_correlation).lower(z, z).compile()

  def two_views(variables: dict, step: int) -> TwoViews:
    local = lambda x: x.addressable_data(0)  # Replicated: every device holds all of it.
    variables = {k: jax.tree.map(local, variables[k]) for k in ('params', 'batch_stats')}
    out1, out2 = (fn(variables, images, key) for fn, key in zip(compiled, keys))
    c = correlate(out1['embeddings'], out2['embeddings'])
    c, view1, view2 = jax.device_get((c, out1[predict.INPUTS], out2[predict.INPUTS]))
    return TwoViews(np.asarray(c), np.asarray(view1), np.asarray(view2), step)

  return two_views


def make_image_hook(get_two_views, save_every: int, total_steps: int, num_shown: int = 8,
                    max_dim: int = 128):
  """A loop hook: both views of ``num_shown`` images after step 1, C at every checkpoint.

  Only process 0 builds the function (``get_two_views()``, e.g. of
  make_two_view_fn: it loads images and compiles) and writes the images. The
  other processes wait for it at the first firing, so that no collective of
  theirs times out meanwhile (distributed.wait_for_all_processes).
  """
  built = []

  def hook(step: int, state):
    first, saved = step == 1, step % save_every == 0 or step == total_steps
    if not (first or saved):
      return None
    if not built:  # The same step on every process.
      built.append(get_two_views() if jax.process_index() == 0 else None)
      distributed.wait_for_all_processes('two_views_compiled')
    if built[0] is None:
      return None
    sample = built[0]({'params': state.params, 'batch_stats': state.batch_stats}, step)
    out = {}
    if first:
      grid = plots.image_grid([sample.view1[:num_shown], sample.view2[:num_shown]])
      out['augment/two_views'] = grid[None]
    if saved:
      out['pretrain/cross_correlation'] = plots.heatmap_rgb(sample.c[:max_dim, :max_dim])[None]
    return out

  return hook


def write_cross_correlation_png(sample: TwoViews, path: str, max_dim: int = 128) -> None:
  """Pictures C of a TwoViews sample: its top-left ``max_dim`` block (8192 x 8192 is unreadable)."""
  c = sample.c
  first = f', first {max_dim} of {c.shape[0]} dims' if c.shape[0] > max_dim else ''
  plots.cross_correlation_png(c[:max_dim, :max_dim], path,
                              f'C of {len(sample.view1)} test images, step {sample.step}{first}')
