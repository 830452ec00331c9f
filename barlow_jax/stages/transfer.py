r"""Transfer: one pretrained encoder probed on several datasets, one table with a row each.

  python -m barlow_jax.main --config=configs/transfer.py --config.pretrained_workdir=runs/bt \
      --config.datasets=cifar10,cifar100,folder:/data/mine --workdir=runs/transfer

The transfer tables of SimCLR (Chen et al., 2020, Table 8) and Barlow Twins
(Zbontar et al., 2021, Table 4): the encoder stays frozen, and each dataset
gets its own linear classifier on its training images, scored on its test
split. Each row is what the linear stage reports for that dataset alone
(``--config=configs/cifar_linear.py --config.dataset=NAME``: linear.probe_dataset,
with the same config), with the kNN classifiers beside it.

Every name is checked before anything is computed (an unknown one exits 2
naming it), then each dataset is resolved once (datasets.for_encoder: its
images standardised with the encoder's statistics, variable-size ones cut at
its crop size) and its splits checked, before the first feature is computed.
Writes ``results.json`` ({'datasets': {name: the probe's metrics}}) and
``results.md`` (the table); the pretraining workdir is only read.
"""

import jax
from etils import epath

from barlow_jax import config_validation
from barlow_jax.data import datasets
from barlow_jax.runtime import mesh as mesh_lib
from barlow_jax.runtime import workdir as workdir_lib
from barlow_jax.stages import linear


def run(config, workdir: str, allow_config_change: bool = False) -> dict:
  """Probes the encoder on every dataset of ``config.datasets``; returns (and writes) the results.

  Nothing resumes (the features are cached in memory only; the probe is not
  augmented), so ``allow_config_change`` has nothing to allow.
  """
  del allow_config_change
  names = config_validation.validate_transfer(config)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  mesh = mesh_lib.make_mesh()
  encoder, description = linear.load_encoder(config, mesh)
  resolved = [datasets.for_encoder(name, encoder.config) for name in names]
  test_splits = [linear.check_splits(config, dataset) for dataset in resolved]
  workdir_lib.record_start(workdir, config, None, [])
  rows = {}
  for dataset, test_split in zip(resolved, test_splits):
    scores, _ = linear.probe_dataset(config, encoder, dataset, test_split, workdir, mesh)
    rows[dataset.name] = {'num_classes': dataset.spec.num_classes, 'test_split': test_split,
                          **scores, 'class_names': dataset.class_names}
  results = {'encoder': description, 'pretrained_workdir': config.pretrained_workdir,
             'model': encoder.config.model.to_dict(),
             'pretrained_on': encoder.config.dataset, 'label_fraction': config.label_fraction,
             'datasets': rows}
  write_results(results, workdir, tuple(config.knn.k))
  return results


def table(rows: dict, ks) -> str:
  """The Markdown table of results.md: a row per dataset, top-1 in percent."""
  return workdir_lib.markdown_table(
      ('dataset', 'classes', 'train images', 'test images', 'linear top-1',
       *(f'kNN top-1 (k={k})' for k in ks)),
      [(name, r['num_classes'], r['num_train'], r['linear']['num_examples'],
        f"{100 * r['linear']['top1']:.2f}", *(f"{100 * r[f'knn_k{k}']['top1']:.2f}" for k in ks))
       for name, r in rows.items()])


def write_results(results: dict, workdir: str, ks) -> None:
  """results.md, then results.json (it marks the run done); process 0 only."""
  if jax.process_index() > 0:
    return
  m = results['model']
  lines = [f"# Transfer of {results['pretrained_workdir']} ({results['encoder']})", '',
           f"{m['encoder']} width {m['width']}, projector {m['projector']}, pretrained on "
           f"{results['pretrained_on']}; frozen features (standardised with its statistics), a "
           f"linear probe and kNN per dataset, labels used: fraction {results['label_fraction']}.",
           '', table(results['datasets'], ks)]
  workdir_lib.write_results(workdir, results, '\n'.join(lines) + '\n')
