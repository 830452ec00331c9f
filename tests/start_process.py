"""One process of a multi-process run's start-up, with one process held back: for test_start_race.

    python tests/start_process.py PORT PROCESS_ID WORKDIR DELAYED_PROCESS DELAY_S

Starts the distributed runtime (2 processes, 2 CPU devices each), takes the
workdir lock, and then, on DELAYED_PROCESS only, sleeps DELAY_S before the
start-up proper: trainer's restore-or-init, which lists checkpoints, reads
config.json and creates the Orbax manager (a collective). The held-back
process reaches the workdir after the other one has changed it, which is the
timing of a pod whose hosts start a few seconds apart. Then every process saves
the next step together and prints ``started at S, saved T``.
"""

import sys
import time

from barlow_jax.runtime import distributed

port, process_id, workdir, delayed, delay_s = sys.argv[1:]
distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2,
                       process_id=int(process_id))

import flax.linen as nn  # noqa: E402  (after the runtime: nothing may touch a device before it)
import jax  # noqa: E402
import optax  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from barlow_jax import config_files  # noqa: E402
from barlow_jax import trainer  # noqa: E402
from barlow_jax.runtime import loop  # noqa: E402
from barlow_jax.runtime import mesh as mesh_lib  # noqa: E402


class Tiny(nn.Module):
  """params and batch_stats, as the real encoders have, at no compile cost."""

  @nn.compact
  def __call__(self, x, train: bool):
    return nn.BatchNorm(use_running_average=not train)(nn.Dense(3)(x.mean(axis=(1, 2))))


config = config_files.load('cifar_bt_cpu')
config.augment.crop_size = 4
with distributed.workdir_lock(workdir):
  if int(process_id) == int(delayed):
    time.sleep(float(delay_s))
  mesh = mesh_lib.make_mesh()
  mngr, state = trainer._restore_or_init(config, workdir, Tiny(), optax.sgd(0.1), mesh,
                                         init_variables=None, allow_config_change=False)
  start = int(state.step)
  state = state.replace(step=state.step + 1)
  mngr.save(start + 1, args=ocp.args.StandardSave(state))
  loop.finish_saves(mngr)
  print(f'process {process_id}: started at {start}, saved {start + 1}', flush=True)
jax.distributed.shutdown()
