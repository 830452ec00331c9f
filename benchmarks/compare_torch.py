r"""Images/s of barlow_jax's train step beside the official PyTorch formulation of it.

  python -m benchmarks.compare_torch                       # the quick start (width 8, projector 1024^3)
  python -m benchmarks.compare_torch --config.model.width=64 \
      --config.model.projector=2048-2048-2048              # docs/performance.md's ResNet-18 reference
  python -m benchmarks.compare_torch --sides=jax,jax_xla_conv,torch,torch_1thread   # leads
  python -m benchmarks.compare_torch --sides=jax_xla,jax_onednn,torch   # the CPU convolutions

Each side (``--sides``, from SIDES) runs in its own process, built from the
same config: benchmarks/jax_step.py is trainer.make_train_step on a 1-device
CPU mesh (variants: XLA's own conv gradient, two devices);
benchmarks/torch_step.py is the official module and loss, torch CPU,
channels_last, 2 threads (or 1). The jax sides use config.model.conv ('auto':
oneDNN's convolutions where they load) unless named for one (jax_xla,
jax_onednn; docs/onednn.md), and oneDNN's default OpenMP team per call
unless named for one (_1omp, _2omp; _passive: OMP_WAIT_POLICY=PASSIVE). Both: ResNet-18 with the CIFAR stem at
config.model.width, config.model.projector, config.batch_size, lambda, and
momentum SGD with config.optimizer's momentum and weight decay. The sides take
turns, ``--rounds`` rounds of ``--steps`` steps, the order rotating, so all see
the same load on a shared machine. Prints one JSON line: img/s of each side
per round and their median, the median and range over rounds of each
jax/torch ratio, each process's peak RSS, and the load average. Needs torch
(``pip install '.[torch]'``); barlow_jax itself never imports it. The jax side
also augments both views on the device and trains the online probe, which
the official step (views made by DataLoader workers) does not.
"""

import json
import os
import statistics
import subprocess
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from benchmarks import bench_worker

config_flags.DEFINE_config_file('config', 'configs/cifar_bt_cpu.py', 'Config file.',
                                lock_config=True)
flags.DEFINE_list('sides', ['jax', 'torch'], 'Workers to interleave, from SIDES.')
flags.DEFINE_integer('rounds', 5, 'Alternating timed rounds per side.')
flags.DEFINE_integer('steps', 3, 'Steps per timed round.')
FLAGS = flags.FLAGS

# name -> (worker module, its extra flags, extra environment).
SIDES = {
    'jax': ('benchmarks.jax_step', [], {}),
    # XLA's own kernel gradient instead of models/conv.py's chunks.
    'jax_xla_conv': ('benchmarks.jax_step', ['--kernel_grad_chunk=0'], {}),
    'jax_1thread': ('benchmarks.jax_step', [], {'XLA_FLAGS': '--xla_cpu_multi_thread_eigen=false'}),
    'jax_2dev': ('benchmarks.jax_step', ['--devices=2'], {}),
    # Two devices, each running its ops on one thread.
    'jax_2dev_1thread': ('benchmarks.jax_step', ['--devices=2'],
                         {'XLA_FLAGS': '--xla_cpu_multi_thread_eigen=false'}),
    # The CPU convolution (config.model.conv) and oneDNN's OpenMP team per call.
    'jax_xla': ('benchmarks.jax_step', ['--config.model.conv=xla'], {}),
    'jax_onednn': ('benchmarks.jax_step', ['--config.model.conv=onednn'], {}),
    'jax_onednn_1omp': ('benchmarks.jax_step', ['--config.model.conv=onednn'],
                        {'BARLOW_JAX_ONEDNN_THREADS': '1'}),
    # libgomp's idle threads sleep at once instead of spinning first.
    'jax_onednn_passive': ('benchmarks.jax_step', ['--config.model.conv=onednn'],
                           {'OMP_WAIT_POLICY': 'PASSIVE'}),
    'jax_8dev_xla': ('benchmarks.jax_step', ['--devices=8', '--config.model.conv=xla'], {}),
    'jax_8dev_onednn': ('benchmarks.jax_step', ['--devices=8', '--config.model.conv=onednn'], {}),
    'jax_8dev_onednn_2omp': ('benchmarks.jax_step', ['--devices=8', '--config.model.conv=onednn'],
                             {'BARLOW_JAX_ONEDNN_THREADS': '2'}),
    'torch': ('benchmarks.torch_step', ['--threads=2'], {}),
    'torch_1thread': ('benchmarks.torch_step', ['--threads=1'], {}),
}


def _worker_args(name: str, config) -> list[str]:
  """The flags of one side: the jax step reads the config itself, the torch step its numbers."""
  if SIDES[name][0] == 'benchmarks.jax_step':
    return [a for a in sys.argv[1:] if a.startswith('--config')] + ['--config.optimizer.name=sgd']
  return [f'--width={config.model.width}', f'--projector={config.model.projector}',
          f'--batch={config.batch_size}', f'--lambd={config.lambd}',
          f'--lr={config.optimizer.lr}', f'--momentum={config.optimizer.momentum}',
          f'--weight_decay={config.optimizer.weight_decay}']


class Worker:
  """One side's process, answering requests (bench_worker.serve)."""

  def __init__(self, name: str, args: list[str]):
    module, extra_args, extra_env = SIDES[name]
    self.process = subprocess.Popen([sys.executable, '-m', module] + args + extra_args,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                    env={**os.environ, **extra_env})
    self.name = name

  def request(self, line: str) -> dict:
    self.process.stdin.write(line + '\n')
    self.process.stdin.flush()
    return self.read()

  def read(self) -> dict:
    for line in self.process.stdout:
      if line.startswith(bench_worker.MARKER):
        return json.loads(line[len(bench_worker.MARKER):])
    raise RuntimeError(f'{self.name} ended without answering (exit {self.process.wait()}).')


def _rounds(workers: dict, batch: int) -> dict:
  """img/s of each side per round; the order rotates every round."""
  speeds = {name: [] for name in workers}
  names = list(workers)
  for r in range(FLAGS.rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      answer = workers[name].request(str(FLAGS.steps))
      # Examples per second (each seen as two views), as trainer's Progress counts.
      speeds[name].append(batch * answer['steps'] / answer['seconds'])
  return speeds


def _ratios(speeds: dict) -> dict:
  """Median, min and max over rounds of each jax side's img/s over each torch side's."""
  out = {}
  for a in (n for n in speeds if n.startswith('jax')):
    for b in (n for n in speeds if n.startswith('torch')):
      r = [x / y for x, y in zip(speeds[a], speeds[b])]
      out[f'{a}/{b}'] = {'median': round(statistics.median(r), 3),
                         'min': round(min(r), 3), 'max': round(max(r), 3)}
  return out


def main(_):
  config = FLAGS.config
  load_before = os.getloadavg()[0]
  workers = {name: Worker(name, _worker_args(name, config)) for name in FLAGS.sides}
  warmup = {name: w.read()['warmup_seconds'] for name, w in workers.items()}
  speeds = _rounds(workers, config.batch_size)
  rss = {name: w.request('quit')['peak_rss_mib'] for name, w in workers.items()}
  for w in workers.values():
    w.process.wait()
  print(json.dumps({
      'setting': f'resnet18 width {config.model.width}, projector {config.model.projector}, '
                 f'batch {config.batch_size}, {FLAGS.rounds} rounds of {FLAGS.steps} steps',
      'img_per_s': {k: [round(v, 1) for v in s] for k, s in speeds.items()},
      'median_img_per_s': {k: round(statistics.median(s), 1) for k, s in speeds.items()},
      'ratio': _ratios(speeds),
      'peak_rss_mib': {k: round(v) for k, v in rss.items()},
      'warmup_seconds': {k: round(v, 1) for k, v in warmup.items()},
      'load_average_1min': [round(load_before, 1), round(os.getloadavg()[0], 1)],
  }))


if __name__ == '__main__':
  app.run(main)
