"""The package's one convolution: oneDNN's kernels or XLA's on CPU, XLA's elsewhere.

``backend`` chooses the CPU convolution (``config.model.conv``):

* 'onednn': oneDNN's kernels called through XLA's FFI (kernels/onednn.py; the
  optional ``onednn`` extra), 2-3x faster than XLA:CPU's at our shapes
  (docs/onednn.md). Applies to 2-D NHWC x HWIO convolutions without dilation
  or groups (every convolution of the package's models) inside ``shard_map``
  or on a single device; others stay on XLA.
* 'xla': XLA's convolution, its kernel gradient summed over batch chunks (below).
* 'auto': 'onednn' where it loads, else 'xla' (one log line says why).

Accelerators always use XLA's convolution and gradients.

XLA:CPU computes the gradient of a convolution with respect to its kernel as

XLA:CPU computes the gradient of a convolution with respect to its kernel as
one backprop-filter convolution over the whole batch, 2-4x slower than the
same work in chunks of 32 examples summed (benchmarks/conv_grad.py; at ResNet-18
width 64, batch 128: 808 -> 347 ms at 64 channels 32x32, 1913 -> 438 ms at
128 channels 16x16). The forward pass and the input gradient are XLA's own
(chunking them was not faster). Accelerators keep XLA's convolution and its
gradients unchanged: the chunks apply only where ``jax.default_backend()`` is
'cpu'.

``conv_general_dilated`` has lax.conv_general_dilated's signature, so
``flax.linen.Conv(..., conv_general_dilated=conv_general_dilated)`` uses it
with the same parameters (names, shapes) as before.
"""

import dataclasses
import functools
from typing import Any, Optional

from absl import logging
import jax
import jax.numpy as jnp
from jax import lax

from barlow_jax.kernels import onednn

BACKENDS = ('auto', 'xla', 'onednn')
_NHWC = ('NHWC', 'HWIO', 'NHWC')

# Examples per chunk of the kernel gradient on CPU (16-64 were measured; 32 is best or close);
# 0 keeps XLA's own gradient (benchmarks/jax_step.py --kernel_grad_chunk=0 measures both).
KERNEL_GRAD_CHUNK = 32


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """Everything of a lax.conv_general_dilated call but its two operands (hashable)."""
  window_strides: tuple
  padding: Any  # 'SAME' | 'VALID' | tuple of (low, high) pairs.
  lhs_dilation: Optional[tuple] = None
  rhs_dilation: Optional[tuple] = None
  dimension_numbers: Any = None
  feature_group_count: int = 1
  precision: Any = None
  preferred_element_type: Any = None

  def apply(self, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    return lax.conv_general_dilated(lhs, rhs, **dataclasses.asdict(self))


def _as_tuple(x):
  return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def chunked_conv(spec: ConvSpec, chunk: int, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
  """``spec.apply(lhs, rhs)``, its kernel gradient summed over batch chunks of ``chunk``."""
  return spec.apply(lhs, rhs)


def _chunked_conv_fwd(spec, chunk, lhs, rhs):
  return spec.apply(lhs, rhs), (lhs, rhs)


def kernel_grad(spec: ConvSpec, chunk: int, lhs: jax.Array, rhs: jax.Array,
                out_grad: jax.Array) -> jax.Array:
  """Gradient with respect to ``rhs``: a sum over examples, taken ``chunk`` at a time."""
  numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, spec.dimension_numbers)
  lhs_batch, out_batch = numbers.lhs_spec[0], numbers.out_spec[0]
  n = lhs.shape[lhs_batch]
  total = None
  for start in range(0, n, chunk):  # Unrolled: lax.map over chunks was not faster.
    stop = min(start + chunk, n)
    x = lax.slice_in_dim(lhs, start, stop, axis=lhs_batch)
    g = lax.slice_in_dim(out_grad, start, stop, axis=out_batch)
    (part,) = jax.vjp(lambda w, x=x: spec.apply(x, w), rhs)[1](g)
    total = part if total is None else total + part
  return total


def _chunked_conv_bwd(spec, chunk, residuals, out_grad):
  lhs, rhs = residuals
  (lhs_grad,) = jax.vjp(lambda x: spec.apply(x, rhs), lhs)[1](out_grad)
  return lhs_grad, kernel_grad(spec, chunk, lhs, rhs, out_grad)


chunked_conv.defvjp(_chunked_conv_fwd, _chunked_conv_bwd)


def onednn_unavailable_reason() -> Optional[str]:
  """Why oneDNN's convolutions cannot be used in this process, or None if they can.

  Builds and loads them on first call (kernels/onednn.load); the answer is cached.
  """
  try:
    onednn.load()
  except onednn.Unavailable as e:
    return str(e)
  return None


@functools.lru_cache(maxsize=None)
def resolve_backend(backend: str) -> str:
  """'onednn' or 'xla': the convolution ``backend`` (one of BACKENDS) means in this process.

  Raises:
    ValueError: ``backend`` is not one of BACKENDS.
    onednn.Unavailable: 'onednn' on a CPU where it cannot load (config
      validation reports this before anything is compiled).
  """
  if backend not in BACKENDS:
    raise ValueError(f'conv backend {backend!r} is not one of {BACKENDS}')
  if backend == 'xla' or jax.default_backend() != 'cpu':
    return 'xla'
  reason = onednn_unavailable_reason()
  if reason is None:
    logging.info('CPU convolutions: oneDNN %s (kernels/onednn.py), %d OpenMP thread(s) per call.',
                 onednn.version(), onednn.threads_per_call())
    return 'onednn'
  if backend == 'onednn':
    raise onednn.Unavailable(reason)
  logging.info('CPU convolutions: XLA\'s, since oneDNN\'s cannot be used: %s', reason)
  return 'xla'


def _partitioned_by_hand() -> bool:
  """Whether a custom call here runs on each device's own slice of the batch.

  Inside ``shard_map`` it does; so it does with a single device. Under plain
  ``jit`` over several devices XLA would all-gather a batch-sharded input and
  run the custom call on the whole batch on every device (correct, N times
  the work): XLA's convolution, which it partitions, is used there instead
  (evaluators/predict.py on a multi-device mesh).
  """
  return bool(jax.sharding.get_abstract_mesh().manual_axes) or jax.device_count() == 1


def _explicit_padding(lhs_shape, rhs_shape, window_strides, padding) -> Optional[tuple]:
  """((low, high), (low, high)) of an NHWC x HWIO convolution, None if oneDNN cannot pad so."""
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs_shape[1:3], rhs_shape[:2], window_strides, padding)
  padding = tuple(tuple(int(p) for p in pair) for pair in padding)
  return padding if all(p >= 0 for pair in padding for p in pair) else None


def _onednn_conv(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                 dimension_numbers, feature_group_count, batch_group_count,
                 preferred_element_type) -> Optional[jax.Array]:
  """The convolution through oneDNN, or None where it does not apply (then XLA's)."""
  if lhs.ndim != 4 or feature_group_count != 1 or batch_group_count != 1:
    return None
  if any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
    return None
  if (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) !=
      lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)):
    return None
  pads = _explicit_padding(lhs.shape, rhs.shape, window_strides, padding)
  if pads is None:
    return None
  # oneDNN runs in float32; bfloat16/float16 operands are widened and the result
  # narrowed as XLA's convolution would return it (docs/onednn.md: bf16).
  out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
  return onednn.conv2d(lhs, rhs, window_strides, pads).astype(out_dtype)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None,
                         kernel_grad_chunk: Optional[int] = None, backend: str = 'xla'):
  """lax.conv_general_dilated on ``backend`` (BACKENDS; models pass config.model.conv).

  With XLA on CPU the kernel gradient is taken over batch chunks:
  ``kernel_grad_chunk`` None means KERNEL_GRAD_CHUNK on CPU and XLA's own
  gradient elsewhere; a positive int forces chunks of that size on any
  backend (tests), 0 XLA's own gradient.
  """
  if resolve_backend(backend) == 'onednn' and _partitioned_by_hand():
    out = _onednn_conv(lhs, rhs, _as_tuple(window_strides), _as_tuple(padding), lhs_dilation,
                       rhs_dilation, dimension_numbers, feature_group_count, batch_group_count,
                       preferred_element_type)
    if out is not None:
      return out
  spec = ConvSpec(_as_tuple(window_strides), _as_tuple(padding), _as_tuple(lhs_dilation),
                  _as_tuple(rhs_dilation), dimension_numbers, feature_group_count, precision,
                  preferred_element_type)
  chunk = kernel_grad_chunk
  if chunk is None and jax.default_backend() == 'cpu':
    chunk = KERNEL_GRAD_CHUNK
  if not chunk or batch_group_count != 1:  # batch_group_count mixes examples: no chunks.
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    batch_group_count, precision, preferred_element_type)
  return chunked_conv(spec, chunk, lhs, rhs)
