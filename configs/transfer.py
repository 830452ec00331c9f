r"""The transfer table: one pretrained encoder, a linear probe and kNN on each of several datasets.

As SimCLR's (Chen et al., 2020, Table 8) and Barlow Twins' (Zbontar et al.,
2021, Table 4) transfer results, at this repository's linear protocol
(configs/cifar_linear.py, paper App. B.1: the frozen encoder's clean features,
a softmax classifier for 100 epochs, kNN with k=20 and 200). A row per
dataset of ``datasets`` (comma-separated: tuned names, any TFDS name,
``folder:/path``): linear and kNN top-1 on its test split (``test_split``
None: each dataset's own, 'test' or 'validation'), trained on
``train_split`` of each. Images are standardised with the encoder's
statistics, as the official evaluation standardises every dataset with
ImageNet's; variable-size images are cut at the encoder's crop size,
fixed-size ones keep their side.

  python -m barlow_jax.main --config=configs/transfer.py --config.pretrained_workdir=runs/bt \
      --config.datasets=cifar10,cifar100,stl10,folder:/data/mine --workdir=runs/transfer
"""

from ml_collections import config_dict

from barlow_jax.config_files import sibling

cifar_linear = sibling(__file__, 'cifar_linear')


def get_config():
  config = cifar_linear.get_config()
  config.mode = 'transfer'
  del config['dataset']  # One dataset is the linear stage's; here, config.datasets.
  config.datasets = config_dict.placeholder(str)
  return config
