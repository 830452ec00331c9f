r"""The γ sweep of Ramyaa (2022), Table 4.2: supervised + Barlow Twins runs for each γ and seed.

The argument after ':' names the supervised config each run uses (default
``cifar_supervised_bt``), with that config's own argument after a second ':'
(encoder and/or ablation): ``:cifar_supervised_bt:vgg16,crop``,
``:stl10_supervised_bt``, ``:cifar_supervised_bt_cpu``. Overrides of the
runs go under ``config.run``.

Runs the ``run`` config once per γ in ``gammas`` and seed in run.seed,
run.seed + 1, ... (barlow_jax/experiments/sweep.py), and writes a table of
train / test / augmented-test accuracy (mean ± sample std over seeds; γ = 0
is the cross-entropy baseline), the difference of the best γ to the baseline
in standard errors, and PCA / t-SNE figures of γ = 0 beside the best γ.
Finished runs are reused and interrupted ones resume.

Expected (Ramyaa 2022, Table 4.2, ResNet-18, 1000 epochs): 82.78 ± 0.26 for
γ = 0 and 83.63 ± 0.38 for γ = 1e-3. CPU-scale numbers: docs/reproduce.md,
"Does CE + BT beat CE alone?".

  python -m barlow_jax.main --config=configs/supervised_bt_sweep.py --workdir=runs/sweep
  python -m barlow_jax.main --config=configs/supervised_bt_sweep.py:cifar_supervised_bt_cpu \
      --config.gammas=0,1e-2 --config.num_seeds=3 --workdir=runs/sweep_cpu
"""

import ml_collections

from barlow_jax.config_files import sibling


def get_config(arg: str = 'cifar_supervised_bt') -> ml_collections.ConfigDict:
  """``arg``: 'name[:its argument]' of the supervised config of every run."""
  name, _, run_arg = arg.partition(':')
  run = sibling(__file__, name or 'cifar_supervised_bt')
  config = ml_collections.ConfigDict()
  config.mode = 'sweep'
  config.gammas = (0.0, 1e-4, 1e-3, 1e-2)  # γ values; 0 is the baseline.
  config.num_seeds = 3  # Seeds run.seed, run.seed + 1, ...
  config.run = run.get_config(run_arg)  # Each run; gamma and seed set per run.
  return config
