"""oneDNN's CPU convolutions as XLA custom calls: build, load and call them.

``onednn_conv.cc`` (next to this file) holds three XLA FFI handlers (forward,
backward-data, backward-weights). ``load()`` compiles it once with the system's
C++ compiler against jaxlib's FFI headers and the oneDNN wheels of the
``onednn`` extra, into a per-user cache keyed by a hash of everything the
binary depends on, then registers the handlers with XLA. ``conv2d`` is the
convolution and its gradients (a ``jax.custom_vjp``).

Nothing here is required: ``load()`` raises ``Unavailable`` naming the missing
piece (the wheels, a compiler, a failed build, a library that does not load)
and models/conv.py then keeps XLA's convolutions. docs/onednn.md has the
details and the measurements.
"""

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import tempfile
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = pathlib.Path(__file__).with_name('onednn_conv.cc')
# The oneDNN wheels of the `onednn` extra (pyproject.toml): the runtime and its headers.
RUNTIME_DIST, DEVEL_DIST = 'onednn-cpu-gomp', 'onednn-devel-cpu-gomp'
# Environment: the compiler (as build tools read it), where builds are cached,
# the OpenMP team size of each call.
CXX_ENV, CACHE_ENV, THREADS_ENV = 'CXX', 'BARLOW_JAX_ONEDNN_CACHE', 'BARLOW_JAX_ONEDNN_THREADS'
_TARGETS = {'forward': 'BarlowOnednnConvForward',
            'backward_data': 'BarlowOnednnConvBackwardData',
            'backward_weights': 'BarlowOnednnConvBackwardWeights'}
_PREFIX = 'barlow_onednn_conv_'
_FLAGS = ('-O2', '-std=c++17', '-shared', '-fPIC', '-fopenmp')


class Unavailable(RuntimeError):
  """oneDNN's convolutions cannot be used here; the message says why."""


def _dist_file(dist: str, name: str) -> pathlib.Path:
  """The installed file of ``dist`` whose path ends with ``name``.

  The wheels put their files in the environment's data directory (a prefix's
  lib/ and include/), which differs between a venv, a --user install and a
  system Python: the distribution's own record says where they are.
  """
  try:
    files = importlib.metadata.distribution(dist).files or []
  except importlib.metadata.PackageNotFoundError:
    raise Unavailable(
        f'the {dist} wheel is not installed (pip install "barlow_jax[onednn]"; it exists for '
        'Linux x86_64 only)') from None
  for f in files:
    if str(f).replace(os.sep, '/').endswith(name):
      path = pathlib.Path(os.path.realpath(importlib.metadata.distribution(dist).locate_file(f)))
      if path.exists():
        return path
  raise Unavailable(f'{name.lstrip("/")} of the {dist} wheel is missing: reinstall it')


def _compiler() -> str:
  cxx = os.environ.get(CXX_ENV) or 'g++'
  path = shutil.which(cxx)
  if path is None:
    raise Unavailable(f'no C++ compiler: {cxx!r} is not on PATH (install g++, or set {CXX_ENV})')
  return path


def _compiler_version(cxx: str) -> str:
  try:
    return subprocess.run([cxx, '--version'], capture_output=True, text=True, timeout=60,
                          check=True).stdout
  except (OSError, subprocess.SubprocessError) as e:
    raise Unavailable(f'the C++ compiler {cxx!r} does not run: {e}') from None


def cache_dir() -> pathlib.Path:
  """Where built libraries are kept: $BARLOW_JAX_ONEDNN_CACHE, else the user's cache."""
  if os.environ.get(CACHE_ENV):
    return pathlib.Path(os.environ[CACHE_ENV])
  base = os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache')
  return pathlib.Path(base) / 'barlow_jax' / 'onednn'


@contextlib.contextmanager
def _locked(path: pathlib.Path):
  """An exclusive lock on ``path`` (created), so that one process builds and the others wait."""
  with open(path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _build(cxx: str, include: pathlib.Path, lib: pathlib.Path, target: pathlib.Path) -> None:
  """Compiles SOURCE into ``target``, written aside and renamed into place (atomic)."""
  fd, tmp = tempfile.mkstemp(prefix=target.name + '.', suffix='.tmp', dir=target.parent)
  os.close(fd)
  cmd = [cxx, *_FLAGS, f'-I{jax.ffi.include_dir()}', f'-I{include}', str(SOURCE), '-o', tmp,
         f'-L{lib.parent}', f'-l:{lib.name}', f'-Wl,-rpath,{lib.parent}']
  try:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
      first = '\n'.join((result.stderr or result.stdout).strip().splitlines()[:8])
      raise Unavailable(f'building {SOURCE.name} failed ({" ".join(cmd)}):\n{first}')
    os.chmod(tmp, 0o755)  # mkstemp made it 0600.
    os.replace(tmp, target)
  except (OSError, subprocess.SubprocessError) as e:
    raise Unavailable(f'building {SOURCE.name} failed: {e}') from None
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def _sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_atomically(path: pathlib.Path, text: str) -> None:
  tmp = path.with_name(f'{path.name}.{os.getpid()}.tmp')
  tmp.write_text(text)
  os.replace(tmp, path)


def _open(path: pathlib.Path) -> ctypes.CDLL:
  """Loads a built library and checks that oneDNN can run a convolution with it."""
  lib = ctypes.CDLL(str(path))
  message = ctypes.create_string_buffer(512)
  if lib.barlow_onednn_self_test(message, len(message)) != 0:
    raise Unavailable(f'oneDNN does not run here: {message.value.decode(errors="replace")}')
  return lib


def threads_per_call() -> int:
  """The OpenMP team of each call: $BARLOW_JAX_ONEDNN_THREADS, else cores / local CPU devices.

  XLA runs the programs of its CPU devices at once (8 fake devices in the
  tests), each calling oneDNN from its own thread; a team per call as large as
  the machine oversubscribes the cores. Measured (docs/onednn.md, "Threads"):
  with one device a team of both cores beat one thread, with 8 devices one
  thread per call beat two.

  Raises:
    Unavailable: the variable is set to something other than a positive integer.
  """
  value = os.environ.get(THREADS_ENV, '').strip()
  if value:
    if not value.isdigit() or int(value) < 1:
      raise Unavailable(f'{THREADS_ENV}={value!r} is not a positive whole number of threads')
    return int(value)
  cores = len(os.sched_getaffinity(0))
  return max(1, cores // max(1, jax.local_device_count('cpu')))


def build_inputs() -> tuple[str, pathlib.Path, pathlib.Path, pathlib.Path]:
  """(compiler, oneDNN's include dir, libdnnl.so.3, the library to build or reuse).

  The library's name is a hash of everything the binary depends on: the
  source, jaxlib (the FFI headers), oneDNN, the compiler and its flags.

  Raises:
    Unavailable: a piece is missing.
  """
  include = _dist_file(DEVEL_DIST, '/oneapi/dnnl/dnnl.hpp').parents[2]
  runtime = _dist_file(RUNTIME_DIST, '/libdnnl.so.3')
  cxx = _compiler()
  key = hashlib.sha256()
  for part in (SOURCE.read_bytes(), importlib.metadata.version('jaxlib'),
               importlib.metadata.version(RUNTIME_DIST), str(runtime), cxx,
               _compiler_version(cxx), ' '.join(_FLAGS)):
    key.update(part if isinstance(part, bytes) else part.encode())
  directory = cache_dir()
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise Unavailable(f'cannot create the build cache {directory}: {e}') from None
  return cxx, include, runtime, directory / f'{_PREFIX}{key.hexdigest()[:20]}.so'


_registered = []  # The library whose handlers XLA calls, once registered.


@functools.lru_cache(maxsize=None)
def load() -> ctypes.CDLL:
  """Builds (once per user and version) and registers the handlers.

  Returns:
    The loaded library.

  Raises:
    Unavailable: naming the missing piece. Cached, as is success: the answer
      does not change within a process.
  """
  cxx, include, runtime, target = build_inputs()
  # The digest is written once the library is in place. A library without it,
  # or with another content (a partial copy, a disk error), is built again
  # rather than loaded: loading a truncated library can crash the process.
  digest = target.with_name(target.name + '.sha256')
  with _locked(target.with_name(target.name + '.lock')):
    lib = None
    if target.exists() and digest.exists() and digest.read_text() == _sha256(target):
      try:
        lib = _open(target)
      except OSError:  # Not loadable after all: build it again.
        pass
    if lib is None:
      _build(cxx, include, runtime, target)
      _write_atomically(digest, _sha256(target))
      try:
        lib = _open(target)
      except OSError as e:
        raise Unavailable(f'the built {target} does not load: {e}') from None
  lib.barlow_onednn_set_threads(threads_per_call())
  if not _registered:  # XLA keeps the first handler of a name for the process.
    for name, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(_PREFIX + name, jax.ffi.pycapsule(getattr(lib, symbol)),
                                  platform='cpu')
    _registered.append(str(target))
  return lib


def version() -> str:
  """oneDNN's version as loaded (e.g. '3.2.0'); loads the library."""
  v = load().barlow_onednn_version()
  return f'{v // 10000}.{v // 100 % 100}.{v % 100}'


# --- The convolution --------------------------------------------------------

Pairs = tuple[tuple[int, int], tuple[int, int]]


def _call(name: str, like: jax.Array, shape: Sequence[int], *operands, strides, padding):
  # The result type of like's (its varying mesh axes under shard_map), another shape.
  result = jax.typeof(like).update(shape=tuple(shape), dtype=jnp.float32)
  return jax.ffi.ffi_call(_PREFIX + name, result, vmap_method='sequential')(
      *operands, strides=np.asarray(strides, np.int64),
      padding=np.asarray(padding, np.int64).reshape(-1))


def output_shape(x_shape, w_shape, strides, padding: Pairs) -> tuple:
  n, h, w, _ = x_shape
  kh, kw, _, co = w_shape
  (lh, hh), (lw, hw) = padding
  return (n, (h + lh + hh - kh) // strides[0] + 1, (w + lw + hw - kw) // strides[1] + 1, co)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, w, strides, padding):
  return _call('forward', x, output_shape(x.shape, w.shape, strides, padding), x, w,
               strides=strides, padding=padding)


def _conv_fwd(x, w, strides, padding):
  return _conv(x, w, strides, padding), (x, w)


def _conv_bwd(strides, padding, residuals, dy):
  x, w = residuals
  dx = _call('backward_data', x, x.shape, dy, w, strides=strides, padding=padding)
  dw = _call('backward_weights', w, w.shape, x, dy, strides=strides, padding=padding)
  return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def _varying_axes(x: jax.Array) -> frozenset:
  """The shard_map mesh axes over which ``x`` varies (none outside shard_map)."""
  return jax.typeof(x).manual_axis_type.varying


def _varying_as(x: jax.Array, axes: frozenset) -> jax.Array:
  missing = tuple(sorted(axes - _varying_axes(x)))
  return jax.lax.pcast(x, missing, to='varying') if missing else x


def _subsampled(x: jax.Array, strides: tuple[int, int], padding: Pairs,
                out_hw: tuple[int, int]) -> jax.Array:
  """The pixels a strided 1x1 convolution reads: ``x`` padded, then every stride-th row and column.

  A 1x1 convolution with strides s and padding p equals the stride-1, unpadded
  one on this. oneDNN 3.2's own version of this copy ("reduce to unit stride")
  is broken for NHWC: its backward-weights pass, with fewer input channels
  than its channel block (8 with AVX2, 16 with AVX-512), writes the copy past
  its workspace, over the barrier that joins the OpenMP threads of the
  reduction (uxlfoundation/oneDNN#6035). With 2 threads the call then spins
  for ever whenever the overwritten bytes are not zero (the ReLU'd
  activations of a ResNet's first projection shortcut, ResNet CIFAR width 4:
  4 -> 8 channels, stride 2), or returns wrong kernel gradients; with 1 thread
  it writes past the end. Doing the copy here (one XLA slice, its gradient a
  scatter XLA fuses) means oneDNN never takes that path.
  """
  (lh, hh), (lw, hw) = padding
  x = jnp.pad(x, ((0, 0), (lh, hh), (lw, hw), (0, 0)))
  return jax.lax.slice(x, (0, 0, 0, 0),
                       (x.shape[0], (out_hw[0] - 1) * strides[0] + 1,
                        (out_hw[1] - 1) * strides[1] + 1, x.shape[3]),
                       (1, strides[0], strides[1], 1))


def conv2d(x: jax.Array, w: jax.Array, strides: tuple[int, int], padding: Pairs) -> jax.Array:
  """NHWC x HWIO -> NHWC convolution with explicit (low, high) padding, in float32.

  Equal to ``lax.conv_general_dilated(x, w, strides, padding,
  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))``, gradients included. Call
  ``load()`` first. Inside ``shard_map`` both operands are made varying over
  the mesh axes of either: a replicated kernel then gets its gradient summed
  over devices by the transpose of that cast (one psum), as XLA's own
  convolution does. Strided 1x1 convolutions are given to oneDNN as
  stride-1 ones on the subsampled input (``_subsampled`` says why).
  """
  axes = _varying_axes(x) | _varying_axes(w)
  x, w = _varying_as(x, axes), _varying_as(w, axes)
  strides = tuple(int(s) for s in strides)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if w.shape[:2] == (1, 1) and strides != (1, 1):
    out_hw = output_shape(x.shape, w.shape, strides, padding)[1:3]
    x, strides, padding = _subsampled(x, strides, padding, out_hw), (1, 1), ((0, 0), (0, 0))
  return _conv(x.astype(jnp.float32), w.astype(jnp.float32), strides, padding)
