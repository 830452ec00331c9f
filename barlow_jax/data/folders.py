"""A folder of image files as a dataset: ``config.dataset=folder:/path/to/root``.

Layout (TFDS's ImageFolder convention): ``<root>/<split>/<class>/<file>``,
e.g. ``train/cat/001.jpg``, ``test/dog/7.png``; files may sit deeper inside a
class folder. Images directly under ``<root>/<split>/`` are unlabelled (label
-1, as STL-10's unlabelled split): pretraining uses them, the probe and the
supervised losses leave them out. Class names are the folder names, sorted.
JPEG and PNG of any size and mode (grayscale, RGBA, palette) become RGB.

Why the folder is prepared once into a TFDS dataset rather than read by TFDS's
own ``ImageFolder`` builder: ImageFolder decodes the files at every pass and
has no TFRecord files, so the training stream (data/pipeline.py) could not open
windows of the shard at file offsets; a resume would re-read every image seen
before it, and the stream would not be the pure function of (seed, step) that
makes resuming exact. Prepared, a folder is read exactly as cifar10 or
imagenet2012 are: per-process shares (``tfds.split_for_jax_process``),
balanced label fractions, O(1) exact resume, host crops of variable-size
images. The copy is JPEG at the original size (RGB JPEG files keep their
bytes; others are converted to RGB and encoded at quality 95, 4:4:4), so every
folder takes ImageNet's variable-size path (training crops cut on the host
from the whole image; evaluation resized and centre-cropped to the crop size).

The copy lives in ``<data_dir>/barlow_jax_folders/<root name>_<fingerprint>``
(data_dir: config.data_dir, else TFDS_DATA_DIR or ~/tensorflow_datasets). The
fingerprint hashes every image file's relative path, size and modification
time, so a changed folder is prepared again into a new copy (the old one is
left; delete it by hand). Files that cannot be decoded are skipped and counted
in the log (``bad_images='skip'``) or stop the preparation naming the file
(``'fatal'``); the skipped ones are listed in the copy's barlow_jax_folder.json.
"""

import dataclasses
import hashlib
import io
import json
import os
import re
from typing import Optional

from absl import logging
from PIL import Image
import tensorflow_datasets as tfds

from barlow_jax.errors import ConfigError
from barlow_jax.runtime import distributed

PREFIX = 'folder:'
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')
BAD_IMAGES = ('skip', 'fatal')
_JPEG_QUALITY = 95
_INFO_FILE = 'barlow_jax_folder.json'


@dataclasses.dataclass(frozen=True)
class Scan:
  """What the folder holds: every image file of every split, and the class names."""
  root: str
  classes: tuple[str, ...]
  # split -> ((path relative to root, label), ...); label -1: directly under the split.
  files: dict
  fingerprint: str
  ignored: int  # Files that are not .jpg/.jpeg/.png.


def _walk_images(top: str) -> tuple[list[str], int]:
  """Image files under ``top`` (absolute, sorted) and the count of other files."""
  images, other = [], 0
  for dirpath, dirnames, filenames in os.walk(top):
    dirnames.sort()
    for name in sorted(filenames):
      if name.startswith('.'):
        continue
      if name.lower().endswith(IMAGE_SUFFIXES):
        images.append(os.path.join(dirpath, name))
      else:
        other += 1
  return images, other


def scan(root: str) -> Scan:
  """Reads the layout of ``root`` (file names and stats only).

  Raises:
    ConfigError: naming the path: no root, no image files, a split name TFDS
      refuses, class folders that differ between splits.
  """
  key = f'config.dataset={PREFIX}{root}'
  if not os.path.isdir(root):
    raise ConfigError(f'{key}: {root} is not a directory.')
  files, classes_of, ignored, digest = {}, {}, 0, hashlib.sha256()
  for split in sorted(os.listdir(root)):
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir) or split.startswith('.'):
      continue
    images, other = _walk_images(split_dir)
    ignored += other
    if not images:
      continue
    if not re.fullmatch(r'[A-Za-z0-9_]+', split):
      raise ConfigError(f'{key}: split folder {split_dir!r}: a split name is letters, digits and '
                        "'_' (e.g. train, test).")
    classes = sorted({os.path.relpath(p, split_dir).split(os.sep)[0] for p in images
                      if os.path.dirname(p) != split_dir})
    classes_of[split] = classes
    files[split] = []
    for path in images:
      rel = os.path.relpath(path, root)
      parts = rel.split(os.sep)
      files[split].append((rel, classes.index(parts[1]) if len(parts) > 2 else -1))
      stat = os.stat(path)
      digest.update(f'{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n'.encode())
  if not files:
    raise ConfigError(f'{key}: no image files ({", ".join(IMAGE_SUFFIXES)}) under {root}; the '
                      'layout is <root>/<split>/<class>/<image> (e.g. train/cat/1.jpg).')
  labelled = {s: c for s, c in classes_of.items() if c}
  classes = next(iter(labelled.values()), [])
  reference = 'train' if 'train' in labelled else next(iter(labelled), None)
  if reference:
    classes = labelled[reference]
    for split, other in labelled.items():
      if other != classes:
        only_ref = sorted(set(classes) - set(other))
        only_other = sorted(set(other) - set(classes))
        raise ConfigError(
            f'{key}: the class folders of {reference!r} and {split!r} differ: only in '
            f'{reference!r}: {only_ref or "none"}; only in {split!r}: {only_other or "none"}.')
    # The label index is the position in the one shared class list.
    files = {s: [(rel, classes.index(rel.split(os.sep)[1]) if label >= 0 else -1)
                 for rel, label in f] for s, f in files.items()}
  return Scan(root, tuple(classes), {s: tuple(f) for s, f in files.items()},
              digest.hexdigest()[:16], ignored)


def jpeg_bytes(path: str) -> bytes:
  """The file as RGB JPEG: its own bytes if it is one (nothing lost), else re-encoded.

  Raises:
    OSError, ValueError, SyntaxError: PIL cannot decode it.
  """
  with open(path, 'rb') as f:
    data = f.read()
  with Image.open(io.BytesIO(data)) as image:
    image.load()  # Decodes it all: a truncated file fails here, not in training.
    if image.format == 'JPEG' and image.mode == 'RGB':
      return data
    out = io.BytesIO()
    # 4:4:4 (no chroma subsampling): small images keep their colour edges.
    image.convert('RGB').save(out, format='JPEG', quality=_JPEG_QUALITY, subsampling=0)
    return out.getvalue()


class _BadImage(Exception):
  pass


class ImageFolderCopy(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """The TFDS dataset a folder is prepared into (see the module docstring)."""
  name = 'image_folder'
  VERSION = tfds.core.Version('1.0.0')

  def __init__(self, *, folder: Scan, bad_images: str = 'skip', **kwargs):
    self.folder = folder
    self.bad_images = bad_images
    self.skipped: list[str] = []
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'Images of {self.folder.root} (fingerprint {self.folder.fingerprint}).',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(names=list(self.folder.classes) or ['unlabelled']),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(files) for split, files in self.folder.files.items()}

  def _generate_examples(self, files):
    for rel, label in files:
      path = os.path.join(self.folder.root, rel)
      try:
        image = jpeg_bytes(path)
      except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for undecodable files.
        if self.bad_images == 'fatal':
          raise _BadImage(f'{path}: {e}') from None
        self.skipped.append(rel)
        continue
      yield rel, {'image': image, 'label': label}


@dataclasses.dataclass(frozen=True)
class Prepared:
  builder: ImageFolderCopy
  stats_file: str  # Where the channel statistics of the copy are kept.


def copy_dir(root: str, fingerprint: str, data_dir: Optional[str]) -> str:
  """Where the prepared copy of this state of the folder lives."""
  base = data_dir or os.environ.get('TFDS_DATA_DIR') or os.path.expanduser('~/tensorflow_datasets')
  name = os.path.basename(os.path.normpath(root)) or 'root'
  return os.path.join(base, 'barlow_jax_folders', f'{name}_{fingerprint}')


def prepare(root: str, data_dir: Optional[str], bad_images: str = 'skip') -> Prepared:
  """The folder's TFDS copy, prepared now unless a copy of the same files exists.

  Process 0 prepares; the others wait for it and read the same copy (each its
  own share, as from any TFDS dataset).

  Raises:
    ConfigError: as scan; an undecodable file with ``bad_images='fatal'``
      (named; nothing is kept of the copy); an unknown ``bad_images``. On the
      other processes of a run, WorkdirError when process 0 stopped on one
      (distributed.agree).
  """
  if bad_images not in BAD_IMAGES:
    raise ConfigError(f'config.bad_images={bad_images!r} is not one of {list(BAD_IMAGES)}.')
  root = os.path.abspath(os.path.expanduser(root))
  folder = scan(root)
  where = copy_dir(root, folder.fingerprint, data_dir)
  builder = ImageFolderCopy(folder=folder, bad_images=bad_images, data_dir=where)
  info_file = os.path.join(where, _INFO_FILE)

  def prepare_once() -> int:
    if builder.is_prepared():
      return 0
    logging.info('Preparing %s (%s) into %s.', root,
                 ', '.join(f'{s}: {len(f)} images' for s, f in folder.files.items()), where)
    try:
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          compute_stats=tfds.download.ComputeStatsMode.SKIP))
    except Exception as e:  # TFDS may wrap the generator's error.
      bad = e if isinstance(e, _BadImage) else e.__cause__ or e.__context__
      if isinstance(bad, _BadImage) or 'not a decodable image' in str(e):
        raise ConfigError(f'config.dataset={PREFIX}{root}: not a decodable image: {bad} '
                          "(config.bad_images='fatal'; 'skip' leaves such files out).") from None
      raise
    with open(info_file, 'w') as f:
      json.dump({'root': root, 'fingerprint': folder.fingerprint, 'skipped': builder.skipped,
                 'ignored': folder.ignored}, f, indent=1)
    return 0

  # Process 0 prepares; the others wait for it, and stop too (exit 2) when it
  # stops on a bad image, instead of waiting for it at a barrier for ever.
  distributed.agree(prepare_once, f'preparing {PREFIX}{root}')
  # Made again: a builder made before process 0 wrote the copy (on the
  # processes that waited) keeps the empty splits it read then.
  builder = ImageFolderCopy(folder=folder, bad_images=bad_images, data_dir=where)
  with open(info_file) as f:
    skipped = json.load(f)['skipped']
  if skipped:
    if bad_images == 'fatal':
      raise ConfigError(f'config.dataset={PREFIX}{root}: not a decodable image: '
                        f'{os.path.join(root, skipped[0])} and {len(skipped) - 1} more '
                        "(config.bad_images='fatal').")
    logging.warning('%s: %d undecodable file(s) skipped: %s%s', root, len(skipped),
                    ', '.join(skipped[:5]), ' ...' if len(skipped) > 5 else '')
  if folder.ignored:
    logging.info('%s: %d file(s) that are not .jpg/.jpeg/.png ignored.', root, folder.ignored)
  return Prepared(builder, os.path.join(where, 'channel_stats.json'))


def source_root(builder) -> Optional[str]:
  """The folder a prepared copy was made from; None for other builders."""
  return builder.folder.root if isinstance(builder, ImageFolderCopy) else None
