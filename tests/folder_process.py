"""One process of a 2-process run reading an image folder: for test_folders.

    python tests/folder_process.py PORT PROCESS_ID ROOT DATA_DIR

Starts the distributed runtime (2 processes, 1 CPU device each), then resolves
``folder:ROOT`` twice into DATA_DIR, as a stage does on every process:

1. with ``bad_images='fatal'`` (the folder holds an undecodable file):
   process 0, which prepares the copy, stops on it; the other must stop too,
   not wait for process 0 at a barrier;
2. with ``bad_images='skip'``: process 0 prepares the copy once, and each
   process reads its own share of the training images.

Prints ``refused <error class>`` and then ``share <tfds ids of its share>``.
"""

import sys

from barlow_jax.runtime import distributed

port, process_id, root, data_dir = sys.argv[1:]
distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2,
                       process_id=int(process_id))

import jax  # noqa: E402  (after the runtime: nothing may touch a device before it)

from barlow_jax import errors  # noqa: E402
from barlow_jax.data import datasets  # noqa: E402
from barlow_jax.data import pipeline  # noqa: E402


def resolve(bad_images: str) -> datasets.Dataset:
  return datasets.resolve(f'folder:{root}', data_dir=data_dir, download=False, crop_size=32,
                          bad_images=bad_images)


try:
  resolve('fatal')
  print('refused nothing', flush=True)
except errors.BadInput as e:
  print(f'refused {type(e).__name__}', flush=True)
data = pipeline.load_train_data(resolve('skip'), 'train')
ids = pipeline._scan_labels(data.builder, data.split)[0]  # pylint: disable=protected-access
print('share', ' '.join(str(i) for i in sorted(ids.tolist())), flush=True)
jax.distributed.shutdown()
