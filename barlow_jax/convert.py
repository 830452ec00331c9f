r"""The official Barlow Twins ResNet-50 (PyTorch) as a barlow_jax pretraining workdir.

  python -m barlow_jax.convert --torch_checkpoint=resnet50.pth --workdir=runs/fb_r50
  python -m barlow_jax.main --config=configs/cifar_linear.py \
      --config.pretrained_workdir=runs/fb_r50 --workdir=runs/fb_r50_probe

The workdir is what a pretraining run leaves (config.json + an Orbax
checkpoint of {'params', 'batch_stats'}), so the linear probe, kNN and
fine-tuning read it unchanged (models/pretrained.load). Its config is
configs/imagenet_bt.py's (ImageNet-stem ResNet-50) in float32, on
``--dataset``, which is the data the probe and fine-tuning stages will use.

Accepted files (``torch.load(weights_only=True)``): the torch.hub
``resnet50.pth`` of facebookresearch/barlowtwins (a torchvision ResNet-50
state_dict whose ``fc`` is Identity; ``fc.*`` is ignored if present), or the
full training ``checkpoint.pth`` (``{'model': {'module.backbone.*',
'module.projector.*', 'module.bn.*'}, ...}``), whose projector is converted
too (``bn`` is the loss's affine-free normalisation: nothing to convert).

models/pretrained.load builds the whole BarlowTwinsModel (encoder, projector, online
probe) and restore_variables checks every array both ways, so the checkpoint
must hold a projector and a probe: a backbone-only file gets a 1-unit
projector and a probe, all zeros, and config.json records
``converted.projector`` = 'absent'. The probe and fine-tuning stages never
read either (they read 'features'); the zeros make them visibly untrained.

This module imports torch; nothing else in the package imports it.
"""

import os
import re
import shutil
import sys
from typing import Optional

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import torch

from barlow_jax import config_files
from barlow_jax import errors
from barlow_jax.data import datasets
from barlow_jax.models import encoders
from barlow_jax.models import factory
from barlow_jax.runtime import checkpoint
from barlow_jax.runtime import state as state_lib
from barlow_jax.runtime import workdir as workdir_lib

BASE_CONFIG = 'imagenet_bt'
# A backbone-only file has no projector; the readers need one (see above).
PLACEHOLDER_PROJECTOR = '1'
STEP = 0  # The checkpoint's step: the file records none we could trust.
# Keys of the accepted files that hold nothing of the encoder or projector.
_IGNORED = re.compile(r'^(fc\.|bn\.)|num_batches_tracked$')
_SHOWN = 10  # Problems listed in a message.
_DISPLAY = {'resnet18': 'ResNet-18', 'resnet34': 'ResNet-34', 'resnet50': 'ResNet-50'}


def _unwrap(obj) -> dict:
  """The flat state_dict of a loaded file: the hub's, or the training checkpoint's 'model'."""
  if isinstance(obj, dict) and isinstance(obj.get('model'), dict):
    obj = obj['model']
  if not isinstance(obj, dict):
    raise errors.CheckpointError(f'Expected a state_dict (a dict of tensors), found a '
                                 f'{type(obj).__name__}.')
  out = {}
  for key, value in obj.items():
    name = key.removeprefix('module.').removeprefix('backbone.')
    if not _IGNORED.search(name):
      out[name] = value
  return out


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """The encoder and projector tensors of ``path`` as float32 arrays, by torchvision name.

  Raises:
    CheckpointError: no such file, not a torch file, or not a dict of tensors.
  """
  if not os.path.isfile(path):
    raise errors.CheckpointError(f'--torch_checkpoint={path!r}: no such file.')
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pickle, zipfile and torch raise many types for a bad file.
    raise errors.CheckpointError(f'--torch_checkpoint={path!r} is not a readable torch file: '
                                 f'{type(e).__name__}: {str(e)[:500]}') from e
  state = _unwrap(obj)
  bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
  if bad:
    raise errors.CheckpointError(f'--torch_checkpoint={path!r}: {bad[:_SHOWN]} are not tensors.')
  return {k: v.detach().to(torch.float32).numpy() for k, v in state.items()}


def projector_spec(state: dict) -> Optional[str]:
  """The official projector's sizes ('8192-8192-8192') from its Linear weights; None if absent."""
  sizes = []
  while f'projector.{3 * len(sizes)}.weight' in state:
    sizes.append(state[f'projector.{3 * len(sizes)}.weight'].shape[0])
  return '-'.join(map(str, sizes)) or None


def converted_config(dataset: str, data_dir: Optional[str], projector: Optional[str],
                     source: str) -> ml_collections.ConfigDict:
  """configs/imagenet_bt.py's config, in float32, on ``dataset``, with the projector found."""
  spec = datasets.dataset_spec(dataset)
  config = config_files.load(BASE_CONFIG)
  config.dataset = dataset
  config.data_dir = data_dir
  config.download = False  # Converting never fetches data; the probe's --config.download can.
  # ImageNet: 256 on the host, centre 224 here; others at their own size.
  config.augment.crop_size = 224 if dataset == 'imagenet2012' else spec.image_size
  config.model.dtype = 'float32'  # The published weights' precision.
  config.model.projector = projector or PLACEHOLDER_PROJECTOR
  config.converted = ml_collections.ConfigDict({
      'torch_checkpoint': source,
      'projector': 'converted' if projector else
                   f'absent (the file has none; a zero {PLACEHOLDER_PROJECTOR}-unit placeholder)'})
  return config


ENCODER = 'resnet50'  # The official backbone; the mapping serves resnet18/34 too.


def _block_names(n: int, encoder: str) -> str:
  """'layer{i}.{j}' of our n-th block of ``encoder`` (Flax numbers them across stages)."""
  stage_sizes = encoders.ENCODERS[encoder].keywords['stage_sizes']
  for i, size in enumerate(stage_sizes):
    if n < size:
      return f'layer{i + 1}.{n}'
    n -= size
  raise ValueError(f'{encoder} has no block {n}.')


_LEAF = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
         'var': 'running_var'}


def _module_name(names: tuple[str, ...], encoder: str) -> str:
  """The torch module of one of our modules' path (below 'backbone' or 'head')."""
  top, rest = names[0], names[1:]
  if top == 'head':  # Projector: Linear, BN, ReLU per hidden layer, last Linear.
    kind, k = rest[0].rsplit('_', 1)
    return f'projector.{3 * int(k) + (kind == "BatchNorm")}'
  if rest in (('stem_conv',), ('stem_bn',)):
    return {'stem_conv': 'conv1', 'stem_bn': 'bn1'}[rest[0]]
  block = _block_names(int(rest[0].rsplit('_', 1)[1]), encoder)
  layer = {'proj_conv': 'downsample.0', 'proj_bn': 'downsample.1'}.get(rest[1])
  if layer is None:
    kind, k = rest[1].rsplit('_', 1)
    layer = f'{"conv" if kind == "Conv" else "bn"}{int(k) + 1}'
  return f'{block}.{layer}'


def torch_name(names: tuple[str, ...], encoder: str = ENCODER) -> str:
  """The torchvision / official-projector name of one of our variables, e.g.
  ('backbone', 'BottleneckBlock_3', 'Conv_1', 'kernel') -> 'layer2.0.conv2.weight'.

  ``encoder`` ('resnet18', 'resnet34' or 'resnet50') numbers the blocks;
  a BasicBlock's Conv_k / BatchNorm_k are torchvision's conv{k+1} / bn{k+1}
  as a bottleneck's are.
  """
  return f'{_module_name(names[:-1], encoder)}.{_LEAF[names[-1]]}'


def to_flax(value: np.ndarray, ndim: int) -> np.ndarray:
  """A torch weight in our layout: conv OIHW -> HWIO, Linear [out, in] -> [in, out]."""
  if ndim == 4:
    return value.transpose(2, 3, 1, 0)
  return value.T if ndim == 2 else value


def torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """The torch shape of one of our arrays of ``shape`` (the inverse of to_flax)."""
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(reversed(shape)) if len(shape) == 2 else tuple(shape)


def _names(path) -> tuple[str, ...]:
  return tuple(str(entry.key) for entry in path)  # Our variables are nested dicts.


def _problems(state: dict, wanted: dict) -> list[str]:
  """Missing, unexpected and wrongly shaped tensors of ``state`` against {name: torch shape}."""
  missing = [f'missing {k} {v}' for k, v in wanted.items() if k not in state]
  unexpected = [f'unexpected {k} {tuple(v.shape)}' for k, v in state.items() if k not in wanted]
  shapes = [f'{k}: {tuple(state[k].shape)}, expected {v}' for k, v in wanted.items()
            if k in state and tuple(state[k].shape) != v]
  return missing + unexpected + shapes


def convert_variables(state: dict, expected: dict, encoder: str = ENCODER) -> dict:
  """{'params', 'batch_stats'} shaped as ``expected``: torch tensors, the rest zeros.

  The encoder, and the projector if ``state`` has one, come from ``state``;
  the online probe (and a placeholder projector) are zeros.

  Args:
    state: torchvision names -> arrays (load_state_dict).
    expected: the shapes of our variables (expected_variables).
    encoder: the torchvision ResNet of ``state`` (the official one: resnet50).

  Raises:
    CheckpointError: ``state`` is not that ResNet (+ official projector),
      naming the missing, unexpected and wrongly shaped tensors.
  """
  # The probe is ours alone; a placeholder projector is too.
  converted = ('backbone', 'head') if projector_spec(state) else ('backbone',)
  from_torch = lambda names: names[0] in converted
  name = lambda names: torch_name(names, encoder)
  wanted = {name(_names(p)): torch_shape(leaf.shape)
            for c in ('params', 'batch_stats')
            for p, leaf in jax.tree_util.tree_flatten_with_path(expected[c])[0]
            if from_torch(_names(p))}
  problems = _problems(state, wanted)
  if problems:
    raise errors.CheckpointError(
        f'Not a torchvision {_DISPLAY.get(encoder, encoder)} state_dict (with the official '
        f'projector, if any): {len(problems)} problems, e.g.:\n  ' + '\n  '.join(problems[:_SHOWN]))

  def convert(path, leaf):
    names = _names(path)
    if not from_torch(names):
      return jnp.zeros(leaf.shape, jnp.float32)
    return jnp.asarray(to_flax(state[name(names)], leaf.ndim))

  return {c: jax.tree_util.tree_map_with_path(convert, expected[c])
          for c in ('params', 'batch_stats')}


def expected_variables(config) -> dict:
  """Shapes of {'params', 'batch_stats'} of the model ``config`` describes (nothing computed)."""
  model = factory.create_model(config, datasets.num_classes(config))
  return state_lib.variable_shapes(model, config.augment.crop_size)


def _check_workdir(workdir: str) -> None:
  if os.path.exists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
    raise errors.WorkdirError(f'--workdir={workdir!r} exists and is not an empty directory: '
                              'convert into a new one.')


def write_workdir(workdir: str, config, variables: dict) -> None:
  """config.json + checkpoint STEP, built aside and renamed into place (never half-written)."""
  tmp = f'{workdir}.converting-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    mngr = checkpoint.manager(tmp)
    mngr.save(STEP, args=ocp.args.StandardSave(variables))
    mngr.wait_until_finished()
    mngr.close()
    workdir_lib.write_config(tmp, config)
    _check_workdir(workdir)  # Again: another process may have filled it meanwhile.
    os.rename(tmp, workdir)  # Replaces an empty directory.
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def convert(torch_checkpoint: str, workdir: str, dataset: str = 'imagenet2012',
            data_dir: Optional[str] = None) -> ml_collections.ConfigDict:
  """Writes the pretraining workdir of the official weights in ``torch_checkpoint``.

  Args:
    torch_checkpoint: resnet50.pth (torch.hub) or the full training checkpoint.pth.
    workdir: a new (or empty) directory.
    dataset: the data the probe and fine-tuning stages will read (config.dataset).
    data_dir: where that data is (config.data_dir); None for TFDS's default.

  Returns:
    The config written to ``workdir``/config.json.

  Raises:
    BadInput: a missing or unreadable file, not a ResNet-50, an unknown
      dataset, or a non-empty workdir; nothing is written then.
  """
  workdir = os.path.abspath(workdir)
  if dataset not in datasets.DATASETS:  # Before reading anything.
    raise errors.ConfigError(f'--dataset={dataset!r} is not one of {sorted(datasets.DATASETS)}.')
  _check_workdir(workdir)
  state = load_state_dict(torch_checkpoint)
  if data_dir and '://' not in data_dir:  # config.json must find it from any directory.
    data_dir = os.path.abspath(data_dir)
  config = converted_config(dataset, data_dir, projector_spec(state),
                            os.path.abspath(torch_checkpoint))
  variables = convert_variables(state, expected_variables(config))
  write_workdir(workdir, config, variables)
  return config


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags, defined only when it runs: barlow_jax.main has a --workdir too,
  and a process that imports both modules (the tests) must not define it twice."""
  flags.DEFINE_string('torch_checkpoint', None, 'resnet50.pth of torch.hub '
                      'facebookresearch/barlowtwins, or the full training checkpoint.pth.')
  flags.DEFINE_string('workdir', None, 'The pretraining workdir to create (new or empty).')
  flags.DEFINE_string('dataset', 'imagenet2012', 'The data the probe and fine-tuning will use '
                      f'(config.dataset): one of {sorted(datasets.DATASETS)}.')
  flags.DEFINE_string('data_dir', None, 'Where that dataset is prepared (config.data_dir).')
  flags.mark_flags_as_required(['torch_checkpoint', 'workdir'])


def _fail(message: str) -> None:
  print(message, file=sys.stderr)
  sys.exit(errors.EXIT_BAD_INPUT)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, exiting with status 2 (a usage error) instead of 1."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(f'FATAL Flags parsing error: {e}')


def main(argv):
  if len(argv) > 1:
    _fail(f'Unexpected arguments: {argv[1:]}')
  try:
    config = convert(FLAGS.torch_checkpoint, FLAGS.workdir, FLAGS.dataset, FLAGS.data_dir)
  except errors.BadInput as e:
    _fail(f'{type(e).__name__}: {e}')
  print(f'Wrote {FLAGS.workdir}: ResNet-50 (ImageNet stem), projector '
        f'{config.converted.projector}, dataset {config.dataset}.')


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=parse_flags)
