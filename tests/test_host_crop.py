"""ImageNet's host crops (data/host_crop.py) on synthetic non-square JPEGs.

The box sampler is held against the NumPy transcription of torchvision's
RandomResizedCrop.get_params in tests/test_augment_torchvision.py and against
the device's sampler (data/augment.py) on the same uniforms, the resizes
against PIL as torchvision calls it on PIL images (importing torch beside
TensorFlow crashes this process), and the pipeline's host-cropped stream is
checked for (seed, step)-purity on a tiny ImageNet-like TFDS dataset of JPEGs.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from barlow_jax.data import augment
from barlow_jax.data import datasets
from barlow_jax.data import host_crop
from barlow_jax.data import pipeline
import test_augment_torchvision as tv_ref

SCALE, RATIO = tv_ref.SCALE, tv_ref.RATIO


def _photo(height, width, seed=0):
  """A smooth random uint8 image (a JPEG of white noise would be all artefacts)."""
  noise = np.random.default_rng(seed).uniform(0, 255, (height // 16 + 1, width // 16 + 1, 3))
  return tf.cast(tf.image.resize(noise, [height, width], method='bicubic'), tf.uint8).numpy()


def _jpeg(image, chroma_downsampling=True):
  return tf.io.encode_jpeg(image, quality=90, chroma_downsampling=chroma_downsampling)


def _boxes_and_uniforms(height, width, n, scale=SCALE, ratio=RATIO, seed=0):
  """n boxes [4, n] from the host sampler, through tf.data as the pipeline runs it, and the
  [n, CROP_UNIFORMS] uniforms each was drawn from."""
  def box(i):
    key = host_crop.example_seed(seed, 0, i, 0)
    return (host_crop.random_crop_box(key, tf.constant(height), tf.constant(width), scale, ratio),
            host_crop.crop_box_uniforms(key))
  ds = tf.data.Dataset.range(n).map(box, num_parallel_calls=tf.data.AUTOTUNE)
  boxes, uniforms = next(ds.batch(n).as_numpy_iterator())
  return boxes.T.astype(np.float64), uniforms


def _boxes(height, width, n, scale=SCALE, ratio=RATIO, seed=0):
  return _boxes_and_uniforms(height, width, n, scale, ratio, seed)[0]


def _device_boxes(uniforms, height, width):
  """[4, n] boxes of the device's sampler (float32, as the train step runs it) from ``uniforms``."""
  one = lambda u: jnp.stack(augment.crop_box_from_uniforms(u, height, width, SCALE, RATIO))
  return np.asarray(jax.jit(jax.vmap(one))(uniforms.astype(np.float32)), np.float64).T


@pytest.mark.parametrize('height, width', [(375, 500), (500, 375), (32, 32)])
def test_box_distribution_matches_torchvision_and_the_device_sampler(height, width):
  ours, uniforms = _boxes_and_uniforms(height, width, tv_ref.N_BOXES)
  # The device's sampler is the same map from uniforms to boxes, in float32: the same boxes
  # (float32 could round a side or an offset across an integer; none of the 20,000 does on
  # CPU). So the two draw the same distribution; each RNG is held against torchvision's below
  # and in test_augment_torchvision.py.
  np.testing.assert_array_equal(_device_boxes(uniforms, height, width), ours)
  theirs = tv_ref._numpy_boxes(tv_ref._torchvision_box, height, width)
  y0, x0, h, w = ours
  assert np.all((y0 >= 0) & (x0 >= 0) & (h >= 1) & (w >= 1))
  assert np.all((y0 + h <= height) & (x0 + w <= width)), 'boxes lie inside the image'
  for name, a, b in zip(('area', 'aspect'), tv_ref._area_and_aspect(ours, height, width),
                        tv_ref._area_and_aspect(theirs, height, width)):
    assert tv_ref._ks(a, b) <= 0.02, (name, tv_ref._ks(a, b))
  for a, b in ((y0 / height, theirs[0] / height), (x0 / width, theirs[1] / width)):
    assert tv_ref._ks(a, b) <= 0.02
  # The crops reach every pixel of the non-square image, the four corners too (each corner is
  # in ~1 box of 2,000, here as in the transcription); a crop of the centred square never would.
  covered = np.zeros((height, width), bool)
  for y, x, hh, ww in ours.T.astype(int):
    covered[y:y + hh, x:x + ww] = True
  assert covered[0, 0] and covered[0, -1] and covered[-1, 0] and covered[-1, -1]
  assert covered.all()


@pytest.mark.parametrize('height, width, box', [(180, 320, (0, 40, 180, 240)),
                                                (320, 180, (40, 0, 240, 180))])
def test_box_falls_back_to_torchvision_centre_crop(height, width, box):
  assert tv_ref._torchvision_box(np.random.default_rng(0), height, width, (1.0, 1.0), RATIO) == box
  ours = _boxes(height, width, 16, scale=(1.0, 1.0))
  np.testing.assert_array_equal(ours, np.tile(np.array(box, np.float64)[:, None], (1, 16)))


def test_decode_and_crop_equals_decode_then_crop():
  image = _photo(375, 500)
  for subsampled in (False, True):
    jpeg = _jpeg(image, subsampled)
    full = tf.io.decode_jpeg(jpeg, channels=3).numpy().astype(int)
    for y0, x0, h, w in _boxes(375, 500, 30).T.astype(int):
      crop = tf.image.decode_and_crop_jpeg(jpeg, [y0, x0, h, w], channels=3).numpy().astype(int)
      reference = full[y0:y0 + h, x0:x0 + w]
      if not subsampled:
        np.testing.assert_array_equal(crop, reference)
      else:  # 4:2:0 (ImageNet's): libjpeg upsamples chroma at the window's edge columns alone.
        np.testing.assert_array_equal(crop[:, 1:-1], reference[:, 1:-1])


def _torchvision_resize_shape(height, width, size):
  """torchvision's Resize(size) output (h, w) (_compute_resized_output_size), transcribed."""
  short, long = min(height, width), max(height, width)
  new_short, new_long = size, int(size * long / short)
  return (new_short, new_long) if height <= width else (new_long, new_short)


def test_crop_and_resize_matches_torchvision_resized_crop():
  """crop_and_resize = torchvision's resized_crop(..., BICUBIC) on a PIL image: PIL's
  crop, then resize(BICUBIC)."""
  jpeg = _jpeg(_photo(375, 500))
  pil = Image.fromarray(tf.io.decode_jpeg(jpeg, channels=3).numpy())
  for y0, x0, h, w in _boxes(375, 500, 8).T.astype(int):
    ours = host_crop.crop_and_resize(jpeg, tf.constant([y0, x0, h, w]), 224).numpy()
    theirs = np.asarray(pil.crop((x0, y0, x0 + w, y0 + h)).resize((224, 224), Image.BICUBIC))
    assert ours.shape == theirs.shape == (224, 224, 3)
    diff = np.abs(ours.astype(int) - theirs)
    assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 4, (diff.mean(), diff.max())


@pytest.mark.parametrize('height, width', [(375, 500), (500, 375), (300, 300), (257, 1000)])
def test_eval_centre_crop_matches_torchvision_resize_and_centre_crop(height, width):
  jpeg = _jpeg(_photo(height, width))
  pil = Image.fromarray(tf.io.decode_jpeg(jpeg, channels=3).numpy())
  new_h, new_w = _torchvision_resize_shape(height, width, 256)
  assert tuple(int(v) for v in host_crop.resized_shape(height, width, 256)) == (new_h, new_w)
  # Resize(256) (bilinear on PIL), then CenterCrop(224) with torchvision's rounded offsets.
  resized = np.asarray(pil.resize((new_w, new_h), Image.BILINEAR))
  top, left = int(round((new_h - 224) / 2.0)), int(round((new_w - 224) / 2.0))
  theirs = resized[top:top + 224, left:left + 224]
  ours = host_crop.eval_centre_crop(jpeg, 256, 224).numpy()
  assert ours.shape == (224, 224, 3)
  diff = np.abs(ours.astype(int) - theirs)
  assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 4, (diff.mean(), diff.max())


def test_device_skips_its_crop_for_host_crops():
  """With the host's crops the device does the photometric ops only: everything off is identity."""
  images = np.random.default_rng(0).integers(0, 256, (4, 2, 16, 16, 3), np.uint8)
  off = augment.ViewAugment(flip=0.0, jitter=0.0, grayscale=0.0, blur=0.0, solarize=0.0)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  for index in (0, 1):
    x, view = augment.device_view(images, index, off)
    assert view.crop == 0.0
    np.testing.assert_allclose(augment.augment_batch(keys, x, view, 16),
                               images[:, index].astype(np.float32) / 255.0, atol=1e-6)


# --- The pipeline's host-cropped stream ----------------------------------------------------------

SIZES = [(120, 90), (90, 120), (64, 160), (100, 100), (75, 130), (140, 70)]


@pytest.fixture(scope='module')
def fake_imagenet(tmp_path_factory):
  """A TFDS dataset of 12 JPEGs of varying sizes, with ImageNet's spec scaled down."""
  images = [_jpeg(_photo(h, w, seed=i)).numpy() for i, (h, w) in enumerate(SIZES * 2)]
  features = tfds.features.FeaturesDict({'image': tfds.features.Image(encoding_format='jpeg'),
                                         'label': tfds.features.ClassLabel(num_classes=3)})
  examples = [{'image': tf.io.decode_jpeg(j).numpy(), 'label': i % 3} for i, j in enumerate(images)]
  builder = tfds.dataset_builders.store_as_tfds_dataset(
      name='fake_imagenet', version='1.0.0', features=features,
      data_dir=tmp_path_factory.mktemp('tfds'),
      split_datasets={'train': list(enumerate(examples))})
  spec = dataclasses.replace(datasets.DATASETS['imagenet2012'], tfds_name='fake_imagenet',
                             num_classes=3, image_size=24, eval_resize=28)
  return pipeline.TrainData(builder, 'train', None, 12, 12, spec)


CROPS = host_crop.HostCrops(16, (augment.ViewAugment(), augment.ViewAugment(crop=0.5)))


def _take(data, start, n, seed=7):
  ds = pipeline.train_dataset(data, local_batch=4, seed=seed, start_step=start, cache=False,
                              crops=CROPS)
  return [b for _, b in zip(range(n), ds.as_numpy_iterator())]


def test_host_cropped_stream_is_pure_in_seed_and_step(fake_imagenet):
  run = _take(fake_imagenet, 0, 5)  # 3 batches per epoch: into the second epoch.
  assert run[0]['image'].shape == (4, 2, 16, 16, 3) and run[0]['image'].dtype == np.uint8
  assert run[0]['image'].shape[1:] == pipeline.train_image_shape(fake_imagenet.spec, CROPS)
  assert not np.array_equal(run[0]['image'][:, 0], run[0]['image'][:, 1])  # Views differ.
  for start in (1, 3, 4):  # Resumed mid-epoch, at and past the epoch boundary: the same crops.
    for a, b in zip(_take(fake_imagenet, start, 5 - start), run[start:]):
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['label'], b['label'])
  other = _take(fake_imagenet, 0, 1, seed=8)[0]
  assert not np.array_equal(other['image'], run[0]['image'])
  with pytest.raises(ValueError, match='needs crops'):
    pipeline.train_dataset(fake_imagenet, 4, 7)


def test_eval_batches_are_resized_and_centre_cropped(fake_imagenet):
  batch = next(pipeline.eval_batches(fake_imagenet.builder, fake_imagenet.spec, 'train', 12))
  assert batch['image'].shape == (12, 24, 24, 3)
  records = fake_imagenet.builder.as_dataset(
      split='train', decoders={'image': tfds.decode.SkipDecoding()})
  first = next(iter(records))['image']
  np.testing.assert_array_equal(batch['image'][0], host_crop.eval_centre_crop(first, 28, 24))
