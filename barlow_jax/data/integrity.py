"""Damaged prepared data: named before a run starts where sizes tell, and when reading fails.

TFDS records in dataset_info.json each split's example count and payload
bytes (``num_bytes``, the sum of the serialized examples); a TFRecord file
frames each record with 16 bytes (length, its CRC, the data's CRC). A split
whose files hold fewer than ``num_bytes + 16 * num_examples`` bytes is
truncated (a copy interrupted, a disk that filled while preparing):
``check_files`` finds that, and missing files, with one stat per file before
anything is read or compiled (local data dirs; on an object store the stats
would cost a request each and are skipped).

Damage that keeps the size (overwritten bytes) shows only when the records
are read: TFRecord's checksums fail (DataLossError), or a window of the
training stream ends short (pipeline's cardinality check). ``checked`` turns
these into ``DatasetCorruptError`` naming the dataset, its files and what to do,
where TensorFlow's error names neither.

Either way the advice is the same: delete the dataset's directory and prepare
it again.
"""

import glob
import os
import re
from typing import Iterator, Optional, TypeVar

import tensorflow as tf

from barlow_jax.errors import DatasetCorruptError

_FRAMING_BYTES = 16  # Per TFRecord record: uint64 length, its masked CRC32C, the data's.
# What reading damaged TFRecord files raises: a failed checksum or a short
# record, a file gone, a training window that ended short (its cardinality).
_READ_ERRORS = (tf.errors.DataLossError, tf.errors.NotFoundError,
                tf.errors.FailedPreconditionError)
_T = TypeVar('_T')


def _advice(name: str, directory: str) -> str:
  return (f'Delete {directory} and prepare {name!r} again (config.download=True fetches it, '
          f'or `tfds build {name} --data_dir=...`).')


def damaged(name: str, directory: str, problem: str) -> DatasetCorruptError:
  """The error for dataset ``name`` prepared in ``directory``: the problem, then what to do."""
  return DatasetCorruptError(f'Dataset {name!r} in {directory} is damaged: {problem}\n'
                             f'{_advice(name, directory)}')


def unreadable_metadata(name: str, data_dir: Optional[str], error: Exception) -> DatasetCorruptError:
  """TFDS could not open the metadata of ``name`` (a garbled dataset_info.json or features.json)."""
  root = os.path.expanduser(str(data_dir or os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets')))
  files = sorted(glob.glob(os.path.join(root, name, '*', 'dataset_info.json')))
  directory = os.path.dirname(files[-1]) if files else os.path.join(root, name)
  detail = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
  return damaged(name, directory, f'its metadata cannot be read ({type(error).__name__}: '
                 f'{detail}); files: {", ".join(files) or "none"}.')


def _split_problem(split, files: list[str]) -> Optional[str]:
  """What is wrong with the files of one split (a tfds SplitInfo), judged by their sizes."""
  missing = [f for f in files if not os.path.isfile(f)]
  if missing:
    return f'split {split.name!r}: {len(missing)} of its {len(files)} files missing: {missing[0]}'
  have = sum(os.path.getsize(f) for f in files)
  want = int(split.num_bytes) + _FRAMING_BYTES * split.num_examples
  if not split.num_bytes or have >= want:
    return None
  which = files[0] if len(files) == 1 else f'one or more of its {len(files)} files ({files[0]} ...)'
  return (f'split {split.name!r}: {which} holds {have} bytes, {want - have} fewer than its '
          f'{split.num_examples} examples take (dataset_info.json): truncated.')


def check_files(builder) -> None:
  """DatasetCorruptError if a file of a prepared local dataset is missing or truncated.

  One stat per file (see the module docstring); a dataset on an object store
  is not checked here.

  Args:
    builder: a prepared TFDS builder.
  """
  directory = str(builder.data_dir)
  if '://' in directory:
    return
  for split in builder.info.splits.values():
    problem = _split_problem(split, [str(f) for f in split.filepaths])
    if problem:
      raise damaged(builder.name, directory, problem)


def _tf_message(error: Exception) -> str:
  """TensorFlow's error message without its node and op decorations."""
  text = getattr(error, 'message', None) or str(error)
  text = re.sub(r'\{\{function_node [^}]*\}\}\s*', '', text)
  return re.sub(r'\s*\[Op:[^\]]*\].*$', '', text, flags=re.S).strip()[:300]


def checked(iterator: Iterator[_T], builder, split: str) -> Iterator[_T]:
  """``iterator`` (of ``split`` of ``builder``), with read errors of damaged files as
  DatasetCorruptError naming the dataset, the split's files and what to do.

  A FailedPreconditionError counts only when it is a cardinality check's (a
  window of the split that ended short); others are re-raised.
  """
  try:
    yield from iterator
  except _READ_ERRORS as e:
    if isinstance(e, tf.errors.FailedPreconditionError) and 'expected to contain' not in str(e):
      raise
    check_files(builder)  # A truncated or missing file: named with its size.
    files = sorted({i.filename for i in builder.info.splits[split].file_instructions})
    which = files[0] if len(files) == 1 else f'one of its {len(files)} files ({files[0]} ...)'
    raise damaged(builder.name, str(builder.data_dir),
                  f'reading split {split!r} failed in {which}: {_tf_message(e)}.') from None
