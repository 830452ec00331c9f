"""Where a run's scalars and images go: TensorBoard always, Weights & Biases when asked.

``config.logging.wandb=True`` adds a W&B run beside the TensorBoard events
(``pip install 'barlow_jax[wandb]'``), receiving the same scalars and images.
The run is named after the workdir and its id is derived from it, so running
the same command again (a resume) continues the same W&B run. Its local files
go to ``<workdir>/wandb`` (``WANDB_MODE=offline`` keeps them there; ``wandb
sync`` uploads them later). ``check`` finds a missing package or login when
the run starts, before any data is read or anything compiles (exit 2), so a
run never stops halfway for want of W&B.
"""

import hashlib
import os
from typing import Any, Mapping, Optional

from absl import logging
from clu import metric_writers
from clu.metric_writers import interface
import jax
import numpy as np

from barlow_jax.errors import ConfigError
from barlow_jax.runtime import workdir as workdir_lib

# WANDB_MODE values that need no login.
NO_LOGIN_MODES = ('offline', 'disabled', 'dryrun')
DEFAULT_PROJECT = 'barlow_jax'


def wandb_requested(config) -> bool:
  """Whether ``config`` (or a sweep's ``config.run``) asks for W&B."""
  return any(c is not None and bool(c.get('logging', {}).get('wandb', False))
             for c in (config, config.get('run')))


def _import_wandb():
  try:
    import wandb  # pylint: disable=g-import-not-at-top  # Optional: the [wandb] extra.
  except ImportError as e:
    raise ConfigError("config.logging.wandb=True needs the wandb package: pip install "
                      "'barlow_jax[wandb]' (or pip install wandb).") from e
  return wandb


def check(config) -> None:
  """Raises ConfigError if ``config`` asks for W&B and W&B cannot be used.

  Without network access: the package must import and, unless WANDB_MODE is
  offline or disabled, an API key must be configured (WANDB_API_KEY, a
  settings file or ~/.netrc, as ``wandb login`` writes it).
  """
  if not wandb_requested(config):
    return
  wandb = _import_wandb()
  if os.environ.get('WANDB_MODE', '').lower() in NO_LOGIN_MODES:
    return
  if not wandb.login(prompt=False, verify=False):
    raise ConfigError('config.logging.wandb=True but W&B has no API key: run `wandb login`, set '
                      'WANDB_API_KEY, or set WANDB_MODE=offline to keep the run local (upload '
                      'it later with `wandb sync <workdir>/wandb/offline-run-*`).')


def run_id(workdir: str) -> str:
  """The W&B run id of ``workdir``: the same for every run (and resume) in it."""
  return hashlib.sha256(workdir.encode()).hexdigest()[:16]


def _uint8(images: np.ndarray) -> np.ndarray:
  """Images as TensorBoard takes them (uint8, or floats in [0, 1]) as uint8."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  return np.round(np.clip(images, 0.0, 1.0) * 255).astype(np.uint8)


class WandbWriter(interface.MetricWriter):
  """A clu MetricWriter that sends scalars, images, texts, histograms and hparams to W&B."""

  def __init__(self, workdir: str, project: str, config: Optional[Mapping[str, Any]] = None):
    self._wandb = _import_wandb()
    rid = run_id(workdir)
    run = self._wandb.run
    if run is not None and run.id == rid:  # A second writer of the same workdir (evaluation).
      self._run = run
      return
    local = None if workdir_lib.is_remote(workdir) else workdir  # W&B writes local files only.
    self._run = self._wandb.init(
        project=project, name=workdir, id=rid, resume='allow', dir=local, config=config,
        reinit='finish_previous',  # A sweep's next run.
        settings=self._wandb.Settings(console='off', quiet=True))
    logging.info('W&B run %s (project %s), local files in %s.', rid, project, self._run.dir)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    self._run.log({k: float(v) for k, v in scalars.items()}, step=step)

  def write_images(self, step: int, images: Mapping[str, Any]):
    self._run.log({k: [self._wandb.Image(x) for x in _uint8(v)] for k, v in images.items()},
                  step=step)

  def write_texts(self, step: int, texts: Mapping[str, str]):
    self._run.log(dict(texts), step=step)

  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Optional[Mapping[str, int]] = None):
    self._run.log({k: self._wandb.Histogram(np.asarray(v).ravel(), num_bins=(num_buckets or {}).get(k, 64))
                   for k, v in arrays.items()}, step=step)

  def write_hparams(self, hparams: Mapping[str, Any]):
    self._run.config.update(dict(hparams), allow_val_change=True)

  def _not_sent(self, kind: str) -> None:
    logging.warning('%s summaries are written to TensorBoard only, not to W&B.', kind)

  def write_summaries(self, step, values, metadata=None):
    del step, values, metadata
    self._not_sent('Tensor')

  def write_videos(self, step, videos):
    del step, videos
    self._not_sent('Video')

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate
    self._not_sent('Audio')

  def flush(self):
    pass  # W&B sends in the background; finishing the run is close's job.

  def close(self):
    self._run.finish()


def create(workdir: str, config) -> metric_writers.MetricWriter:
  """The run's metric writer: TensorBoard (and the log), plus W&B if the config asks.

  Process 0 writes; the others only log (clu's ``just_logging``).
  """
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if jax.process_index() > 0 or not wandb_requested(config):
    return writer
  project = config.logging.get('wandb_project', DEFAULT_PROJECT)
  return metric_writers.MultiWriter([writer, WandbWriter(workdir, project, config.to_dict())])
