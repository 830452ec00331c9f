"""Finding and loading config files, from any directory and from an installed package.

The configs live in the repository's top-level ``configs/`` folder; a wheel
installs the same files as the package ``barlow_jax.configs`` (pyproject.toml
maps the folder there). ``--config`` accepts a path (``configs/cifar_bt.py``,
absolute or relative to the current directory) or, when no such file exists,
a config's name with or without the folder and suffix (``cifar_bt_cpu``,
``configs/cifar_bt_cpu.py``), which is looked up in the configs folder of
this installation. Either may end in ``:arg`` for configs taking an argument.

A config derives from another by its own path (``sibling``), never by
``from configs import ...``, so it loads from any current directory.
"""

import importlib.util
import os
import pathlib
import types
from typing import Optional

import ml_collections

from barlow_jax.errors import ConfigError


def configs_dir() -> pathlib.Path:
  """The configs folder of this installation (the repository's, or the installed package's)."""
  # A checkout (installed editable or not): the configs beside this code, even
  # when another checkout is the one installed.
  checkout = pathlib.Path(__file__).resolve().parents[1] / 'configs'
  if (checkout / 'cifar_bt.py').is_file():
    return checkout
  installed = importlib.util.find_spec('barlow_jax.configs')
  if installed is not None and installed.submodule_search_locations:
    return pathlib.Path(list(installed.submodule_search_locations)[0])
  return checkout


def available() -> list[str]:
  """Names of the config files of this installation."""
  return sorted(p.stem for p in configs_dir().glob('*.py') if not p.stem.startswith('_'))


def resolve(spec: str) -> str:
  """An existing config file path for ``spec`` (a path or a name), keeping any ``:arg``.

  Raises:
    ConfigError: neither a file nor the name of a config of this installation.
  """
  path, sep, arg = spec.partition(':')
  if os.path.isfile(path):
    return spec
  name = pathlib.Path(path).name.removesuffix('.py')
  candidate = configs_dir() / f'{name}.py'
  if candidate.is_file():
    return f'{candidate}{sep}{arg}'
  raise ConfigError(f'--config={spec!r}: no such file, and no config named {name!r} in '
                    f'{configs_dir()} (have {", ".join(available())}).')


def load_module(path: str) -> types.ModuleType:
  """The config file at ``path`` as a module (its own module name, not cached in sys.modules)."""
  module_spec = importlib.util.spec_from_file_location(
      f'barlow_jax_config_{pathlib.Path(path).stem}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def sibling(config_file: str, name: str) -> types.ModuleType:
  """The config ``name`` beside ``config_file`` (pass ``__file__``), as a module."""
  return load_module(str(pathlib.Path(config_file).resolve().parent / f'{name}.py'))


def load(spec: str, arg: Optional[str] = None) -> ml_collections.ConfigDict:
  """``get_config([arg])`` of the config ``spec`` (a path or a name, as for ``--config``)."""
  path, _, spec_arg = resolve(spec).partition(':')
  arg = arg if arg is not None else (spec_arg or None)
  module = load_module(path)
  return module.get_config(arg) if arg is not None else module.get_config()
