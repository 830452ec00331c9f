r"""What one pretraining step costs per chip, on paper: compiled, never run.

  python -m benchmarks.cost --config=configs/imagenet_bt.py              # 8 and 64 fake devices
  python -m benchmarks.cost --config=configs/imagenet_bt.py --mesh_sizes=8 --batches=64,128

Compiles the Barlow Twins train step of ``--config`` (trainer.make_train_step
with stages.pretrain's loss, from ShapeDtypeStructs: no array is allocated)
for meshes of ``--mesh_sizes`` fake CPU devices at each per-device batch of
``--batches`` and prints, per device:

* FLOPs and bytes accessed (``compiled.cost_analysis()``);
* the bytes the convolutions and matmuls alone read and write, in the
  program's own dtypes (from the lowered HLO): the HBM traffic if everything
  else fused into them, a lower bound where XLA:CPU's "bytes accessed" is an
  upper one;
* memory (``compiled.memory_analysis()``: argument, output, aliased (donated),
  temp and generated-code sizes; peak = argument + output - alias + temp);
* what each collective moves (compiled_cost.collectives: the size of the
  buffers the collectives produce, per step) and the floats all-reduced per
  parameter;
* the loss alone (forward + gradient) compiled with the row-sharded C of
  losses.py and with a psum of the full D x D matrix (D*D*4 bytes on paper).

From those numbers it derives, per accelerator (peaks below, with their
sources): the roofline step time max(FLOPs / peak FLOP/s, bytes / HBM
bandwidth), the step and MFU at an assumed achieved efficiency
(``--efficiency``, default 50% of the roofline), the largest per-device batch
that fits its memory (memory(b) = fixed + b * per_example, fitted to the
compiled batches), and the hours of the paper's 1000 ImageNet epochs at
global batch 2048 on 32 and 256 chips.

**Caveat, printed with the numbers.** FLOPs, bytes and memory come from
XLA:CPU's analysis of the program compiled for CPU devices: the same HLO an
accelerator would get, but CPU fusion, layouts and buffer assignment differ
from TPU/GPU ones. XLA:CPU computes bf16 convolutions and matmuls in float32
(its optimized HLO has only f32 convolutions), and "bytes accessed" counts
every operand of every unfused op: it overstates HBM traffic. Communication
and the input pipeline are not in the step time (the all-reduce's size and the
interconnect bandwidth that would hide it are printed beside it).
"""

import copy
import dataclasses
import json
import math
import os
import re
import resource
import time
from typing import Sequence

if __name__ == '__main__' and 'xla_force_host_platform_device_count' not in os.environ.get(
    'XLA_FLAGS', ''):
  # Before JAX starts: enough fake CPU devices for the largest default mesh.
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=64').strip()

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags
import numpy as np

from barlow_jax import compiled_cost
from barlow_jax import losses
from barlow_jax import optim
from barlow_jax import trainer
from barlow_jax.data import datasets
from barlow_jax.data import host_crop
from barlow_jax.data import pipeline
from barlow_jax.models import factory
from barlow_jax.models import heads
from barlow_jax.runtime import mesh as mesh_lib
from barlow_jax.runtime import state as state_lib
from barlow_jax.runtime.mesh import DATA_AXIS
from barlow_jax.stages import pretrain

FLAGS = flags.FLAGS

GB, GIB, MIB = 1e9, 2**30, 2**20

# The paper's run (Zbontar et al. 2021, §4 and App. A): 1000 epochs of
# ImageNet-1k train (1,281,167 images) at global batch 2048; it took 124 hours
# on 32 V100s. Steps counted as trainer.Length does: floor(images / batch) per epoch.
IMAGENET_TRAIN = 1_281_167
PAPER_EPOCHS = 1000
PAPER_GLOBAL_BATCH = 2048
CHIP_COUNTS = (32, 256)
MEMORY_SIZES_GB = (16, 32, 80)


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  flops: float  # Peak dense bf16 (V100: fp16) matrix FLOP/s.
  bandwidth: float  # Peak HBM bytes/s.
  memory: float  # HBM bytes.
  source: str


# Vendor peaks, checked 2026-12-04 (quotes from the pages named):
CHIPS = (
    # docs.cloud.google.com/tpu/docs/v4: "Peak compute per chip 275 teraflops
    # (bf16 or int8)"; "HBM2 capacity and bandwidth 32 GiB, 1200 GBps".
    Chip('TPU v4', 275e12, 1200e9, 32 * GIB, 'cloud.google.com/tpu/docs/v4'),
    # docs.cloud.google.com/tpu/docs/v5e: "Peak compute per chip (bf16) 197
    # TFLOPS"; "HBM2 capacity and bandwidth 16 GB, 819 GBps".
    Chip('TPU v5e', 197e12, 819e9, 16 * GB, 'cloud.google.com/tpu/docs/v5e'),
    # NVIDIA A100 datasheet, A100 80GB SXM: BF16 Tensor Core 312 TFLOPS dense
    # (624 with sparsity); HBM2e 2,039 GB/s; 80 GB.
    Chip('A100 SXM 80GB', 312e12, 2039e9, 80 * GB, 'NVIDIA A100 datasheet'),
    # NVIDIA H100 datasheet, H100 SXM: BF16 Tensor Core 1,979 TFLOPS with
    # sparsity ("1/2 lower without sparsity": 989 dense); HBM3 3.35 TB/s; 80 GB.
    Chip('H100 SXM', 989e12, 3350e9, 80 * GB, 'NVIDIA H100 datasheet'),
    # The paper's hardware, for scale: Tesla V100 SXM2 32GB, "up to 125
    # Tensor TFLOPS" fp16 (developer.nvidia.com, Volta Tensor Cores); HBM2
    # 900 GB/s. The paper's 124 hours on 32 of them include its data loading.
    Chip('V100 SXM2 32GB', 125e12, 900e9, 32 * GB, 'NVIDIA V100 datasheet'),
)

CAVEAT = ("FLOPs, bytes and memory are XLA:CPU's analysis of the step compiled for fake CPU "
          'devices: the same HLO, but accelerator fusion, layouts and buffer assignment differ. '
          'XLA:CPU computes bf16 convolutions in f32 and its "bytes accessed" counts every '
          'unfused operand: an upper bound of HBM traffic; "conv/matmul bytes" (their operands '
          'and results only, in the program\'s dtypes) is the perfect-fusion lower bound. Step '
          'times leave out communication and the input pipeline.')


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per module.
    cost = cost[0]
  return cost


def _compile(jitted, *args):
  """(lowered, compiled, lower seconds, compile seconds)."""
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return lowered, compiled, t1 - t0, t2 - t1


def _max_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # ru_maxrss is KiB.


_ITEMSIZE = {'f64': 8, 's64': 8, 'u64': 8, 'f32': 4, 's32': 4, 'u32': 4, 'bf16': 2, 'f16': 2,
             's16': 2, 'u16': 2, 's8': 1, 'u8': 1, 'pred': 1}
_DEF = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\]')
_MATMUL = re.compile(r'\s(?:convolution|dot)\(([^)]*)\)')


def matmul_bytes(hlo_text: str) -> int:
  """Bytes the convolutions and dots of an HLO module read and write (operands + result).

  Use the lowered, unoptimized HLO (``lowered.as_text(dialect='hlo')``): its
  dtypes are the program's (XLA:CPU's optimized HLO has upcast bf16
  convolutions to f32). With everything else fused into them, this is the
  HBM traffic of the step.
  """
  sizes, total = {}, 0
  lines = hlo_text.splitlines()
  for line in lines:
    match = _DEF.match(line)
    if match and match.group(2) in _ITEMSIZE:
      dims = [int(d) for d in match.group(3).split(',') if d]
      sizes[match.group(1)] = math.prod(dims) * _ITEMSIZE[match.group(2)]
  for line in lines:
    match, op = _DEF.match(line), _MATMUL.search(line)
    if match and op and match.group(1) in sizes:
      operands = [o.strip().lstrip('%') for o in op.group(1).split(',')]
      total += sizes[match.group(1)] + sum(sizes.get(o, 0) for o in operands)
  return total


def abstract_step(config, mesh, per_device_batch: int):
  """(jitted step, abstract state, abstract batch, parameter count); nothing allocated."""
  config = copy.deepcopy(config)
  config.batch_size = per_device_batch * mesh.size
  model = factory.create_model(config, datasets.num_classes(config), axis_name=DATA_AXIS)
  steps_per_epoch = max(1, IMAGENET_TRAIN // config.batch_size)
  tx, schedule = optim.create_optimizer(
      config, steps_per_epoch, optim.num_train_steps(config, steps_per_epoch))
  replicated, sharded = mesh_lib.replicated(mesh), mesh_lib.batch_sharded(mesh)
  state = jax.eval_shape(lambda: state_lib.create_train_state(
      model, tx, mesh, config.seed, config.augment.crop_size))
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                       state)
  n, shape = config.batch_size, pipeline.train_image_shape(
      datasets.dataset_spec(config.dataset),
      host_crop.HostCrops(config.augment.crop_size, trainer.views_of(config, 2)))
  batch = {'image': jax.ShapeDtypeStruct((n, *shape), np.uint8, sharding=sharded),
           'label': jax.ShapeDtypeStruct((n,), np.int32, sharding=sharded)}
  step = trainer.make_train_step(config, pretrain.make_loss_fn(model, config.lambd), tx, mesh,
                                 schedule, num_views=2, spec=datasets.dataset_spec(config.dataset))
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  return step, state, batch, num_params


def measure_step(config, mesh, per_device_batch: int) -> dict:
  """Per-device cost of the compiled train step at one per-device batch."""
  step, state, batch, num_params = abstract_step(config, mesh, per_device_batch)
  lowered, compiled, lower_s, compile_s = _compile(step, state, batch)
  cost, mem = _cost(compiled), compiled.memory_analysis()
  moved = compiled_cost.collectives(compiled.as_text())
  memory = {k: int(getattr(mem, f'{k}_size_in_bytes'))
            for k in ('argument', 'output', 'alias', 'temp', 'generated_code')}
  memory['peak'] = memory['argument'] + memory['output'] - memory['alias'] + memory['temp']
  return {
      'kind': 'step', 'devices': mesh.size, 'batch_per_device': per_device_batch,
      'global_batch': per_device_batch * mesh.size, 'parameters': int(num_params),
      'lower_s': round(lower_s, 1), 'compile_s': round(compile_s, 1),
      'max_rss_gib': round(_max_rss_gib(), 2),
      'flops': float(cost.get('flops', 0.0)),
      'transcendentals': float(cost.get('transcendentals', 0.0)),
      'bytes_accessed': float(cost.get('bytes accessed', 0.0)),
      'matmul_bytes': float(matmul_bytes(lowered.as_text(dialect='hlo'))),
      'memory': memory, 'collectives': moved,
      'all_reduced_per_parameter': moved['all-reduce']['elements'] / num_params,
  }


def _full_c_terms(z1, z2, eps=losses.BN_EPS):
  """The loss's two sums from a psum of the full D x D matrix (what losses.py avoids)."""
  # The same helpers as losses.barlow_twins_terms; only the psum of C differs.
  z1n = losses._standardize(z1, DATA_AXIS, eps)  # pylint: disable=protected-access
  z2n = losses._standardize(z2, DATA_AXIS, eps)  # pylint: disable=protected-access
  n = z1.shape[0] * lax.axis_size(DATA_AXIS)
  c = lax.psum(losses._matmul_t(z1n, z2n), DATA_AXIS) / n  # pylint: disable=protected-access
  return losses._terms_from_rows(c, jnp.diagonal(c))  # pylint: disable=protected-access


def measure_cross_correlation(config, mesh, per_device_batch: int, full: bool) -> dict:
  """Collectives of the Barlow Twins loss alone (value and gradient w.r.t. both views)."""
  d = heads.parse_mlp_spec(config.model.projector)[-1]
  terms_fn = _full_c_terms if full else (
      lambda z1, z2: losses.barlow_twins_terms(z1, z2, DATA_AXIS))

  def loss(z1, z2):
    terms = terms_fn(z1, z2)
    return terms.on_diag + config.lambd * terms.off_diag

  sharded = jax.shard_map(loss, mesh=mesh, in_specs=(P(DATA_AXIS), P(DATA_AXIS)),
                          out_specs=P(), check_vma=True)
  fn = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))
  n = per_device_batch * mesh.size
  z = jax.ShapeDtypeStruct((n, d), jnp.dtype(config.model.dtype),
                           sharding=mesh_lib.batch_sharded(mesh))
  _, compiled, _, compile_s = _compile(fn, z, z)
  moved = compiled_cost.collectives(compiled.as_text())
  return {'kind': 'cross_correlation', 'variant': 'full C psum' if full else 'row-sharded C',
          'devices': mesh.size, 'batch_per_device': per_device_batch, 'global_batch': n,
          'projector_dim': d, 'paper_bytes': d * d * 4 if full else None,
          'compile_s': round(compile_s, 1), 'flops': float(_cost(compiled).get('flops', 0.0)),
          'bytes_moved': sum(v['bytes'] for v in moved.values()), 'collectives': moved}


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
  """(fixed, per_unit): least squares ys ~ fixed + per_unit * xs (exact for two points)."""
  per, fixed = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
  return float(fixed), float(per)


def derive(rows: Sequence[dict], efficiency: float, chips: Sequence[Chip] = CHIPS,
           chip_counts: Sequence[int] = CHIP_COUNTS, global_batch: int = PAPER_GLOBAL_BATCH,
           epochs: float = PAPER_EPOCHS, num_images: int = IMAGENET_TRAIN) -> dict:
  """Roofline, MFU, largest batch and run length per chip, from one mesh's step rows.

  FLOPs, bytes and memory are linear in the per-device batch b, fitted to the
  compiled batches: value(b) = fixed + b * per_example. At global batch G on
  K chips each chip runs b = G / K (the cross-correlation's FLOPs per chip,
  2*D*D*b, are linear in b too; its all-gathered G x D copy of z2 is not, and
  is left out of memory(b)).

  Two step times per chip and batch, both max(FLOPs / peak, bytes / HBM) /
  efficiency: 'cpu_bytes' with XLA:CPU's bytes accessed (the roofline asked
  for; pessimistic), 'fused' with the conv/matmul bytes (optimistic). MFU =
  FLOPs / (step time x peak). The gradient all-reduce (the same size at any
  batch) crosses a ring as 2 (K-1)/K of its bytes per chip;
  'allreduce_gb_per_s' is the interconnect bandwidth that would move it in
  the 'fused' step time, i.e. hide it completely.

  Returns:
    {'fits', 'chips': [per chip], 'memory_fits': {GB: largest batch}, 'steps', ...}.
  """
  bs = sorted({r['batch_per_device'] for r in rows})
  if len(bs) < 2:
    raise ValueError('Need steps compiled at two or more per-device batches.')
  xs = [r['batch_per_device'] for r in rows]
  fits = {name: linear_fit(xs, [get(r) for r in rows]) for name, get in (
      ('flops', lambda r: r['flops']), ('bytes_accessed', lambda r: r['bytes_accessed']),
      ('matmul_bytes', lambda r: r['matmul_bytes']),
      ('peak_memory', lambda r: r['memory']['peak']))}
  all_reduce_bytes = max(r['collectives']['all-reduce']['bytes'] for r in rows)

  def at(name, b):
    fixed, per = fits[name]
    return fixed + per * b

  def largest_batch(capacity):
    fixed, per = fits['peak_memory']
    return max(0, math.floor((capacity - fixed) / per)) if per > 0 else None

  steps = epochs * (num_images // global_batch)
  out = []
  for chip in chips:
    entry = {'chip': chip.name, 'peak_tflops': chip.flops / 1e12,
             'hbm_tb_per_s': chip.bandwidth / 1e12, 'hbm_gb': chip.memory / GB,
             'source': chip.source, 'largest_batch': largest_batch(chip.memory),
             'at_batch': {}, 'runs': {}}
    runs = {k: global_batch / k for k in chip_counts}
    for b in bs + [b for b in runs.values() if b not in bs]:
      compute_s = at('flops', b) / chip.flops
      point = {'compute_ms': compute_s * 1e3, 'memory_gb': at('peak_memory', b) / GB,
               'fits': at('peak_memory', b) <= chip.memory}
      for variant, name in (('cpu_bytes', 'bytes_accessed'), ('fused', 'matmul_bytes')):
        memory_s = at(name, b) / chip.bandwidth
        step_s = max(compute_s, memory_s) / efficiency
        point[variant] = {'hbm_ms': memory_s * 1e3,
                          'bound': 'compute' if compute_s >= memory_s else 'memory',
                          'roofline_ms': max(compute_s, memory_s) * 1e3, 'step_ms': step_s * 1e3,
                          'mfu': at('flops', b) / (step_s * chip.flops)}
      entry['at_batch'][b] = point
    for k, b in runs.items():
      point = entry['at_batch'][b]
      wire = 2 * (k - 1) / k * all_reduce_bytes
      entry['runs'][k] = {
          'batch_per_device': b, 'fits': point['fits'],
          'hours_cpu_bytes': steps * point['cpu_bytes']['step_ms'] / 1e3 / 3600,
          'hours_fused': steps * point['fused']['step_ms'] / 1e3 / 3600,
          'allreduce_wire_gb': wire / GB,
          'allreduce_gb_per_s': wire / GB / (point['fused']['step_ms'] / 1e3)}
    out.append(entry)
  return {'fits': fits, 'chips': out, 'steps': steps, 'efficiency': efficiency, 'batches': bs,
          'all_reduce_bytes': all_reduce_bytes,
          'memory_fits': {gb: largest_batch(gb * GB) for gb in MEMORY_SIZES_GB}}


def run(config, mesh_sizes: Sequence[int], batches: Sequence[int], efficiency: float,
        max_compile_s: float = float('inf'), log=print) -> dict:
  """Compiles and measures every setting.

  A mesh whose compile takes longer than ``max_compile_s`` is not compiled at
  further batches, and larger meshes are skipped; so are meshes larger than
  the devices JAX sees. Each skip is logged with its reason.

  Returns:
    {'steps': [rows], 'cross_correlation': [rows], 'derived': {devices: derive(...)},
    'skipped': [reasons]}.
  """
  steps, xc, derived, skipped = [], [], {}, []

  def skip(reason):
    skipped.append(reason)
    log(f'skipped: {reason}')

  devices = jax.devices()
  for k in sorted(mesh_sizes):
    if k > len(devices):
      skip(f'{k} devices: JAX sees {len(devices)} (set '
           f'XLA_FLAGS=--xla_force_host_platform_device_count={k})')
      continue
    mesh = mesh_lib.make_mesh(devices[:k])
    rows = []
    for i, b in enumerate(batches):
      rows.append(measure_step(config, mesh, b))
      log(_json(rows[-1]))
      if rows[-1]['compile_s'] > max_compile_s and i + 1 < len(batches):
        skip(f'{k} devices, batches {list(batches[i + 1:])}: the compile at batch {b} took '
             f'{rows[-1]["compile_s"]:.0f} s > {max_compile_s:.0f} s')
        break
    steps += rows
    for full in (False, True):
      xc.append(measure_cross_correlation(config, mesh, batches[0], full))
      log(_json(xc[-1]))
    if len({r['batch_per_device'] for r in rows}) >= 2:
      derived[k] = derive(rows, efficiency)
      log(_json({'kind': 'derived', 'devices': k, **derived[k]}))
    slowest = max(r['compile_s'] for r in rows)
    larger = [m for m in mesh_sizes if m > k]
    if slowest > max_compile_s and larger:
      skip(f'{larger} devices: a {k}-device compile took {slowest:.0f} s > {max_compile_s:.0f} s')
      break
  return {'steps': steps, 'cross_correlation': xc, 'derived': derived, 'skipped': skipped}


def _rounded(obj):
  if isinstance(obj, float):
    return float(f'{obj:.6g}')
  if isinstance(obj, dict):
    return {k: _rounded(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_rounded(v) for v in obj]
  return obj


def _json(obj) -> str:
  """One JSON line, floats to 6 significant digits."""
  return json.dumps(_rounded(obj))


def _num(x: float, unit: float) -> str:
  """x / unit with about three significant digits."""
  v = x / unit
  return f'{v:,.0f}' if abs(v) >= 100 else f'{v:.3g}'


def tables(config, result: dict) -> str:
  """Readable (Markdown) tables of ``run``'s result."""
  m = config.model
  lines = [f'{m.encoder} ({m.stem} stem, width {m.width}), projector {m.projector}, dtype '
           f'{m.dtype}, {datasets.dataset_spec(config.dataset).image_size}px uint8 images in, '
           f'{config.augment.crop_size}px views; per device, per step.', CAVEAT, '']
  lines += ['| devices | batch/device | compile s | TFLOP | GB accessed (XLA:CPU) | '
            'conv/matmul GB | args GB | temp GB | peak GB | all-reduce MiB (ops) | '
            'all-gather MiB | all-to-all MiB | reduce-scatter MiB | all-reduced floats / params |',
            '|' + '---|' * 14]
  for r in result['steps']:
    mem, c = r['memory'], r['collectives']
    lines.append(
        f"| {r['devices']} | {r['batch_per_device']} | {r['compile_s']:.0f} | "
        f"{_num(r['flops'], 1e12)} | {_num(r['bytes_accessed'], GB)} | "
        f"{_num(r['matmul_bytes'], GB)} | {_num(mem['argument'], GB)} | "
        f"{_num(mem['temp'], GB)} | {_num(mem['peak'], GB)} | "
        f"{_num(c['all-reduce']['bytes'], MIB)} ({c['all-reduce']['ops']}) | "
        f"{_num(c['all-gather']['bytes'], MIB)} | {_num(c['all-to-all']['bytes'], MIB)} | "
        f"{_num(c['reduce-scatter']['bytes'], MIB)} | {r['all_reduced_per_parameter']:.4f} |")
  if result['steps']:
    r = result['steps'][0]
    lines.append(
        f"{r['parameters']:,} parameters. peak = args + output - aliased (donated state) + "
        f"temp; output {_num(r['memory']['output'], GB)} GB, aliased "
        f"{_num(r['memory']['alias'], GB)} GB, generated code "
        f"{_num(r['memory']['generated_code'], MIB)} MiB. Collectives: the bytes of the buffers "
        'they produce; a ring all-reduce sends about twice its buffer per chip.')
  if result['cross_correlation']:
    lines += ['', 'The loss alone (value and gradient w.r.t. both views):',
              '| devices | batch/device | C | MiB moved (compiled) | on paper | GFLOP |',
              '|---|---|---|---|---|---|']
    for r in result['cross_correlation']:
      paper = f"D*D*4 = {_num(r['paper_bytes'], MIB)} MiB" if r['paper_bytes'] else ''
      lines.append(f"| {r['devices']} | {r['batch_per_device']} | {r['variant']} | "
                   f"{_num(r['bytes_moved'], MIB)} | {paper} | {_num(r['flops'], 1e9)} |")
  for k, d in result['derived'].items():
    fits = d['fits']
    lines += ['', f"From the {k}-device compiles, per device and batch b: GFLOP = "
              f"{_num(fits['flops'][0], 1e9)} + {fits['flops'][1] / 1e9:.4g} b; "
              f"GB accessed = {_num(fits['bytes_accessed'][0], GB)} + "
              f"{fits['bytes_accessed'][1] / GB:.3g} b; conv/matmul GB = "
              f"{_num(fits['matmul_bytes'][0], GB)} + {fits['matmul_bytes'][1] / GB:.3g} b; "
              f"peak memory GB = {_num(fits['peak_memory'][0], GB)} + "
              f"{fits['peak_memory'][1] / GB:.3g} b.",
              f"Step = roofline / {d['efficiency']:g} (assumed achieved efficiency), MFU at that "
              'step; roofline with XLA:CPU bytes accessed / with conv/matmul bytes:',
              '| chip | peak TFLOP/s | HBM TB/s | HBM GB | b | compute ms | roofline ms '
              '(XLA:CPU bytes) | step ms, MFU | roofline ms (conv/matmul bytes) | step ms, MFU '
              '| peak memory GB |', '|' + '---|' * 11]
    for c in d['chips']:
      for b in d['batches']:
        p = c['at_batch'][b]
        cells = [f"{p[v]['roofline_ms']:.1f} ({p[v]['bound']}) | "
                 f"{p[v]['step_ms']:.1f}, {p[v]['mfu']:.0%}" for v in ('cpu_bytes', 'fused')]
        lines.append(f"| {c['chip']} | {c['peak_tflops']:g} | {c['hbm_tb_per_s']:g} | "
                     f"{c['hbm_gb']:.1f} | {b} | {p['compute_ms']:.1f} | " + ' | '.join(cells)
                     + f" | {p['memory_gb']:.1f}{'' if p['fits'] else ' (does not fit)'} |")
    lines += ['', f"The paper's run: {PAPER_EPOCHS} epochs = {d['steps']:,.0f} steps of "
              f"{PAPER_GLOBAL_BATCH} (floor({IMAGENET_TRAIN:,} / {PAPER_GLOBAL_BATCH}) per "
              f"epoch), hours at the step times above (no communication, no input pipeline); "
              f"the gradient all-reduce ({_num(d['all_reduce_bytes'], MIB)} MiB) on a ring, and "
              'the interconnect GB/s per chip that would hide it in the conv/matmul-bytes step:',
              '| chip | largest b in HBM | ' + ' | '.join(
                  f'{n} chips (b={PAPER_GLOBAL_BATCH / n:g}): hours (XLA:CPU bytes / conv/matmul '
                  'bytes) | all-reduce GB on the wire, GB/s to hide it' for n in CHIP_COUNTS)
              + ' |', '|' + '---|' * (2 + 2 * len(CHIP_COUNTS))]
    for c in d['chips']:
      cells = []
      for n in CHIP_COUNTS:
        r = c['runs'][n]
        cells.append(f"{r['hours_cpu_bytes']:,.1f} / {r['hours_fused']:,.1f}"
                     + ('' if r['fits'] else ' (does not fit)'))
        cells.append(f"{r['allreduce_wire_gb']:.2f}, {r['allreduce_gb_per_s']:,.0f}")
      lines.append(f"| {c['chip']} | {c['largest_batch']} | " + ' | '.join(cells) + ' |')
    lines.append('Largest per-device batch by memory: ' + ', '.join(
        f'{gb} GB: {b}' for gb, b in d['memory_fits'].items()) + '.')
  for s in result['skipped']:
    lines.append(f'Skipped: {s}.')
  return '\n'.join(lines)


def _define_flags():
  """The command line; defined only when run as a script, so tests can import the module."""
  config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
  flags.DEFINE_list('mesh_sizes', ['8', '64'], 'Fake CPU devices per mesh (at most the devices '
                    'JAX sees; XLA_FLAGS=--xla_force_host_platform_device_count=N).')
  flags.DEFINE_list('batches', ['64', '128'], 'Per-device batches; two or more, for the linear '
                    'fits in the batch.')
  flags.DEFINE_float('efficiency', 0.5, 'Assumed achieved fraction of the roofline step time.')
  flags.DEFINE_float('max_compile_minutes', 10.0, 'A mesh whose compile takes longer than this '
                     'is not compiled at further batches, and larger meshes are skipped.')


def main(argv):
  del argv
  config = FLAGS.config
  t0 = time.perf_counter()
  result = run(config, [int(k) for k in FLAGS.mesh_sizes], [int(b) for b in FLAGS.batches],
               FLAGS.efficiency, FLAGS.max_compile_minutes * 60,
               log=lambda s: print(s, flush=True))
  print()
  print(tables(config, result))
  print(f'\n{time.perf_counter() - t0:.0f} s in all; max RSS {_max_rss_gib():.1f} GiB; '
        f'{jax.device_count()} {jax.devices()[0].platform} devices seen.', flush=True)


if __name__ == '__main__':
  _define_flags()
  flags.mark_flags_as_required(['config'])
  app.run(main)
