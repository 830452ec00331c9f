"""notebooks/inspect_run.ipynb: committed without outputs, and it runs on a tiny workdir.

The notebook is executed by a real Jupyter kernel (nbclient), as a user's
``jupyter lab`` would, on a workdir written by conftest.pretraining_workdir
(no training); the test then reads what the cells produced.
"""

import os

import jax
import nbclient
import nbformat
import numpy as np

from barlow_jax.data import datasets
from barlow_jax.models import factory
from barlow_jax.runtime import state as state_lib
from conftest import DATA_DIR, REPO, needs_cifar10, pretraining_workdir, tiny_config

NOTEBOOK = REPO / 'notebooks' / 'inspect_run.ipynb'


def test_committed_notebook_has_no_outputs():
  """Outputs stay out of git: the file is committed stripped (no pre-commit hook needed)."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert code and all(c.outputs == [] and c.execution_count is None for c in code), \
      'strip the outputs: jupyter nbconvert --clear-output --inplace ' + str(NOTEBOOK)


def _outputs(nb, mime: str) -> list[str]:
  return [out.get('data', {}).get(mime, '') for c in nb.cells if c.cell_type == 'code'
          for out in c.outputs if mime in out.get('data', {})]


@needs_cifar10
def test_notebook_runs_on_a_tiny_workdir_and_draws_everything(tmp_path):
  config = tiny_config()
  workdir = pretraining_workdir(tmp_path / 'run', config)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  env = dict(os.environ, BARLOW_JAX_WORKDIR=str(workdir), BARLOW_JAX_DATA_DIR=DATA_DIR,
             PYTHONPATH=str(REPO))  # This checkout's barlow_jax in the kernel.
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': str(tmp_path)}})
  client.execute(env=env)

  text = '\n'.join(out.get('text', '') for c in nb.cells if c.cell_type == 'code'
                   for out in c.outputs if out.get('output_type') == 'stream')
  assert 'step 2, resnet18 width 4' in text, text
  tables = _outputs(nb, 'text/markdown')
  # The parameter table sums to the model's size, counted here from its init.
  model = factory.create_model(config, datasets.num_classes(config))
  shapes = state_lib.variable_shapes(model, config.augment.crop_size)
  total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params']))
  assert any('| parameter | shape | count |' in t and f'{total:,} parameters' in t for t in tables)
  bn_layers = len(jax.tree.leaves(shapes['batch_stats'])) // 2
  bn_table = next(t for t in tables if t.startswith('| BatchNorm layer |'))
  assert len(bn_table.splitlines()) == 2 + bn_layers
  # BatchNorm, C, the two views, the PCA and the neighbours: five pictures.
  assert len(_outputs(nb, 'image/png')) == 5
  assert not [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs
              if o.get('output_type') == 'error']
