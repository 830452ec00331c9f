"""Reading what a W&B run wrote offline: its run-<id>.wandb file, record by record.

wandb 0.31 reads these files in its Go core only, so this is a reader of the
documented container (LevelDB's log format behind a 7-byte ':W&B' header:
32 KiB blocks of chunks, each a CRC, a length and a type, FULL or FIRST,
MIDDLE... LAST) whose records are parsed with wandb's own protobuf classes.
"""

import glob
import json
import os
import struct

from wandb.proto import wandb_internal_pb2

_BLOCK = 32768
_HEADER = 7  # CRC32C (4), length (2), type (1).
_FULL, _LAST = 1, 4


def _chunks(data: bytes):
  """The records' bytes, chunks of a record joined."""
  assert data[:4] == b':W&B', data[:7]
  pos, pending = 7, b''
  while pos + _HEADER <= len(data):
    left = _BLOCK - pos % _BLOCK
    if left < _HEADER:  # A block's zero-filled tail.
      pos += left
      continue
    _, length, kind = struct.unpack('<IHB', data[pos:pos + _HEADER])
    pending += data[pos + _HEADER:pos + _HEADER + length]
    pos += _HEADER + length
    if kind in (_FULL, _LAST):
      yield pending
      pending = b''


def read(path: str) -> dict:
  """{'run_id', 'name', 'history': [{key: value, '_step': step}], 'dir', 'files'} of a run.

  Args:
    path: the run's .wandb file; 'files' are the paths under its directory
      ('dir') of what the run saved (media/images/...).
  """
  out = {'run_id': None, 'name': None, 'history': []}
  with open(path, 'rb') as f:
    data = f.read()
  for chunk in _chunks(data):
    record = wandb_internal_pb2.Record()
    record.ParseFromString(chunk)
    kind = record.WhichOneof('record_type')
    if kind == 'run':
      out['run_id'], out['name'] = record.run.run_id, record.run.display_name
    elif kind == 'history':
      out['history'].append({item.key or '/'.join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
  run_dir = out['dir'] = os.path.dirname(path)
  out['files'] = sorted(os.path.relpath(p, run_dir)
                        for p in glob.glob(os.path.join(run_dir, 'files', '**', '*'),
                                           recursive=True) if os.path.isfile(p))
  return out


def offline_runs(workdir) -> list[dict]:
  """Every offline run under ``workdir``/wandb, oldest first."""
  paths = sorted(glob.glob(os.path.join(str(workdir), 'wandb', 'offline-run-*', 'run-*.wandb')))
  return [read(p) for p in paths]
