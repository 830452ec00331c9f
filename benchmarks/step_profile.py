r"""Where the train step's time goes: XLA's own profile of it, grouped by what each op does.

  python -m benchmarks.step_profile --config=configs/cifar_bt_cpu.py --config.augment.crop_size=32
  python -m benchmarks.step_profile --config=configs/cifar_bt_cpu.py \
      --config.model.width=64 --config.model.projector=2048-2048-2048   # the reference setting

Traces ``--steps`` steps of the pretraining step (random uint8 images, as
step_speed.py) with ``jax.profiler``, reads the time of every XLA op from the
trace, and files each op by the compiled program's own text (its fused
computation and the JAX operation it came from):

  convolution, forward     convolutions of the forward pass (XLA's, or oneDNN's
                           custom calls with config.model.conv='onednn')
  convolution, backward    input and kernel gradients (JAX's transposed convolutions,
                           or oneDNN's backward-data and backward-weights calls)
  layout transposes        fusions whose result is a transposed copy: XLA:CPU
                           has no backprop-filter kernel and feeds the kernel
                           gradient a forward convolution of transposed activations
                           (XLA fuses the BatchNorm + ReLU producing them into the
                           transpose, so this includes recomputing them per chunk)
  matmuls                  dots: projector, C = z1^T z2, probe
  collectives              all-reduce, all-gather, reduce-scatter
  elementwise + reductions the rest: BatchNorm, ReLU, loss, augmentation, optimiser

Prints a table and one JSON line (ms per step and share of each group, the
op time per step and the wall time per step). Ops of XLA:CPU run on several
threads at once, so their sum can exceed the wall time.
"""

import collections
import gzip
import json
import pathlib
import re
import tempfile
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from barlow_jax import compiled_cost

FLAGS = flags.FLAGS

GROUPS = ('convolution, forward', 'convolution, backward', 'layout transposes', 'matmuls',
          'collectives', 'elementwise + reductions')
# The custom-call targets of oneDNN's convolutions (barlow_jax/kernels/onednn.py).
_ONEDNN_CONV = 'custom_call_target="barlow_onednn_conv_'
# An instruction and its opcode; a result may be a tuple of shapes (combined collectives).
_INSTRUCTION = r'%([\w.\-]+) = (?:\(.*?\)|\S+) ([\w\-]+)\('


def _computations(hlo_text: str) -> dict:
  """Name -> body of every computation in a compiled HLO module's text."""
  return {m.group(1): m.group(0)
          for m in re.finditer(r'^%?([\w.\-]+) \(.*?^}', hlo_text, re.S | re.M)}


def op_groups(hlo_text: str) -> dict:
  """Instruction name -> group (one of GROUPS) for every instruction of the entry program."""
  bodies = _computations(hlo_text)
  groups = {}
  for m in re.finditer(r'^\s+(?:ROOT )?' + _INSTRUCTION + '(.*)$', hlo_text, re.M):
    name, opcode, rest = m.groups()
    called = re.search(r'calls=%([\w.\-]+)', rest)
    body = bodies.get(called.group(1), '') if called else ''
    op_name = re.search(r'op_name="([^"]*)"', rest)
    op_name = op_name.group(1) if op_name else ''
    ops = {op for _, op in re.findall(_INSTRUCTION, body)} | {opcode}
    root = re.search(r'ROOT ' + _INSTRUCTION, body)
    if any(re.sub(r'-(start|done)$', '', op) in compiled_cost.COLLECTIVES for op in ops):
      group = 'collectives'
    elif 'convolution' in ops:
      group = 'convolution, backward' if 'transpose(' in op_name else 'convolution, forward'
    elif opcode == 'custom-call' and _ONEDNN_CONV in rest:
      group = ('convolution, forward' if f'{_ONEDNN_CONV}forward' in rest else
               'convolution, backward')
    elif 'dot' in ops:
      group = 'matmuls'
    elif root and root.group(2) in ('transpose', 'copy') and 'transpose' in ops:
      group = 'layout transposes'
    else:
      group = 'elementwise + reductions'
    groups[name] = group
  return groups


def op_times(trace_dir: str) -> collections.Counter:
  """Microseconds per op name in the newest perfetto trace under ``trace_dir``."""
  trace = max(pathlib.Path(trace_dir).rglob('*.trace.json.gz'), key=lambda p: p.stat().st_mtime)
  times = collections.Counter()
  for event in json.load(gzip.open(trace))['traceEvents']:
    if event.get('ph') == 'X':
      times[event['name']] += event.get('dur', 0)
  return times


def profile(run_step, hlo_text: str, steps: int) -> dict:
  """Group times (ms per step) of ``steps`` calls of ``run_step`` (compiled as ``hlo_text``)."""
  groups = op_groups(hlo_text)
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    start = time.perf_counter()
    for _ in range(steps):
      out = run_step()
    jax.block_until_ready(out)
    wall = time.perf_counter() - start
    jax.profiler.stop_trace()
    times = op_times(trace_dir)
  per_group = collections.Counter()
  for name, us in times.items():
    if name in groups:  # Other events: Python, the runtime's executor, waiting.
      per_group[groups[name]] += us
  total = sum(per_group.values())
  return {'groups_ms': {g: per_group[g] / steps / 1e3 for g in GROUPS},
          'share': {g: per_group[g] / total if total else 0.0 for g in GROUPS},
          'op_ms_per_step': total / steps / 1e3, 'wall_ms_per_step': wall / steps * 1e3}


def _define_flags():
  """The command line; defined only when run as a script, so tests can import the module."""
  config_flags.DEFINE_config_file('config', 'configs/cifar_bt_cpu.py', 'Config file.',
                                  lock_config=True)
  flags.DEFINE_integer('steps', 5, 'Traced steps, after two untraced ones.')


def main(_):
  # Imported here: tests load this file by its path, where `benchmarks` is no package.
  from benchmarks import pretraining_step
  config = FLAGS.config
  run_step = pretraining_step.LiveStep(config)
  hlo_text = run_step.compiled_text()
  for _ in range(2):  # Compile and warm up.
    jax.block_until_ready(run_step())
  result = profile(run_step, hlo_text, FLAGS.steps)
  result.update(setting=f'{config.model.encoder} width {config.model.width}, projector '
                        f'{config.model.projector}, batch {config.batch_size}, '
                        f'{config.augment.crop_size} px, {jax.device_count()} '
                        f'{jax.devices()[0].platform} device(s)')
  for group in GROUPS:
    print(f"{group:26s} {result['groups_ms'][group]:8.1f} ms  {100 * result['share'][group]:5.1f}%")
  print(f"{'op time per step':26s} {result['op_ms_per_step']:8.1f} ms   "
        f"(wall {result['wall_ms_per_step']:.1f} ms per traced step)")
  print(json.dumps(result))


if __name__ == '__main__':
  _define_flags()
  app.run(main)
