"""What the notebook and TensorBoard show: tables, neighbours, image grids, the image hook."""

import flax.linen as nn
import jax
import matplotlib
import numpy as np

from barlow_jax.data import datasets
from barlow_jax import inspection
from barlow_jax import plots
from barlow_jax.models import factory
from barlow_jax.runtime import loop
from barlow_jax.runtime import workdir as workdir_lib
from barlow_jax.stages import pretrain
from barlow_jax.runtime import state as state_lib
from conftest import tiny_config


class _DenseBN(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(5)(x)
    return nn.BatchNorm(use_running_average=not train)(x)


def test_param_table_counts_a_hand_counted_model():
  variables = _DenseBN().init(jax.random.PRNGKey(0), np.zeros((1, 3)))
  rows = inspection.param_table(variables['params'])
  # Dense 3 -> 5: kernel 3x5 + bias 5; BatchNorm(5): scale 5 + bias 5.
  assert rows == [('BatchNorm_0/bias', (5,), 5), ('BatchNorm_0/scale', (5,), 5),
                  ('Dense_0/bias', (5,), 5), ('Dense_0/kernel', (3, 5), 15)]


def test_param_table_of_the_model_sums_to_its_size_in_name_order():
  config = tiny_config()
  model = factory.create_model(config, datasets.num_classes(config))
  shapes = state_lib.variable_shapes(model, 32)
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes['params'])
  rows = inspection.param_table(params)
  assert len(rows) == len(jax.tree.leaves(params))
  assert sum(r[2] for r in rows) == sum(x.size for x in jax.tree.leaves(params))
  names = [r[0] for r in rows]
  blocks = [n.split('/')[1] for n in names if '/BasicBlock_' in n]
  # BasicBlock_2 before BasicBlock_10 (not string order), each block's arrays together.
  numbers = [int(b.split('_')[1]) for b in dict.fromkeys(blocks)]
  assert numbers == sorted(numbers) and len(numbers) == 8


def test_batchnorm_table_against_numpy():
  rng = np.random.default_rng(0)
  stats = {'block_10': {'bn': {'mean': rng.normal(size=3), 'var': rng.uniform(0.5, 2, size=3)}},
           'block_2': {'bn': {'mean': rng.normal(size=4), 'var': rng.uniform(0.5, 2, size=4)}}}
  layers = inspection.batchnorm_stats(stats)
  assert [name for name, _, _ in layers] == ['block_2/bn', 'block_10/bn']
  table = inspection.batchnorm_table(layers)
  for row, key in zip(table, ('block_2', 'block_10')):
    mean, var = stats[key]['bn']['mean'], stats[key]['bn']['var']
    np.testing.assert_allclose(row[1:], [len(mean), np.mean(np.abs(mean)), np.mean(var),
                                         np.min(var), np.max(var)])


def test_markdown_table():
  text = workdir_lib.markdown_table(['a', 'shape', 'x'], [('w', (3, 3, 8), 0.123456), ('b', (), 2)])
  assert text.splitlines() == ['| a | shape | x |', '|---|---|---|', '| w | 3x3x8 | 0.1235 |',
                               '| b | scalar | 2 |']


def test_nearest_neighbours_equal_brute_force():
  rng = np.random.default_rng(1)
  features = rng.normal(size=(40, 6))
  queries = [0, 7, 39]
  got = inspection.nearest_neighbours(features, queries, k=5)
  for q, row in zip(queries, got):
    similarity = [float(np.dot(features[q], f) / np.linalg.norm(features[q]) / np.linalg.norm(f))
                  for f in features]
    expected = [i for _, i in sorted((-s, i) for i, s in enumerate(similarity) if i != q)][:5]
    assert list(row) == expected


def test_image_grid_places_every_image_with_white_gaps():
  rng = np.random.default_rng(2)
  rows = [rng.uniform(0, 0.9, size=(n, 4, 5, 3)).astype(np.float32) for n in (3, 2)]
  grid = plots.image_grid(rows, pad=1)
  assert grid.shape == (2 * 4 + 1, 3 * 5 + 2, 3)
  for i, row in enumerate(rows):
    for j, image in enumerate(row):
      np.testing.assert_array_equal(grid[i * 5:i * 5 + 4, j * 6:j * 6 + 5], image)
  assert (grid[4] == 1).all() and (grid[:, 5] == 1).all()  # The gaps.
  assert (grid[5:, 12:] == 1).all()  # The second row has one image fewer.


def test_heatmap_rgb_uses_the_png_colours_and_enlarges_small_matrices():
  c = np.array([[1.0, -1.0], [0.0, 0.5]])
  rgb = plots.heatmap_rgb(c, min_side=10)
  assert rgb.shape == (10, 10, 3) and rgb.min() >= 0 and rgb.max() <= 1
  cmap = matplotlib.colormaps['RdBu_r']
  np.testing.assert_allclose(rgb[0, 0], cmap(1.0)[:3], atol=1e-6)  # +1: dark red.
  np.testing.assert_allclose(rgb[0, 9], cmap(0.0)[:3], atol=1e-6)  # -1: dark blue.
  np.testing.assert_allclose(rgb[9, 9], cmap(0.75)[:3], atol=1e-6)


def test_image_hook_writes_views_at_step_1_and_c_at_every_checkpoint():
  calls = []

  def two_views(variables, step):
    calls.append(step)
    view = np.full((10, 4, 4, 3), step / 10.0)
    return pretrain.TwoViews(np.eye(3), view, view, step)

  hook = pretrain.make_image_hook(lambda: two_views, save_every=4, total_steps=10, num_shown=8)
  state = type('State', (), {'params': {}, 'batch_stats': {}})()
  out = {step: hook(step, state) for step in range(1, 11)}
  assert calls == [1, 4, 8, 10]
  assert set(out[1]) == {'augment/two_views'}
  assert out[1]['augment/two_views'].shape == (1, 10, 46, 3)  # 8 images: 8 x (4 + 2) - 2 px.
  for step in (4, 8, 10):
    assert set(out[step]) == {'pretrain/cross_correlation'}
    assert out[step]['pretrain/cross_correlation'].shape[:2] == (1, 258)  # 3 x 86 px.
  assert out[2] is None and out[9] is None


class _Writer:

  def __init__(self):
    self.scalars, self.images = {}, {}

  def write_scalars(self, step, scalars):
    self.scalars[step] = scalars

  def write_images(self, step, images):
    self.images[step] = images


def test_loop_writes_hook_images_as_images_and_the_rest_as_scalars():
  image = np.zeros((1, 8, 8, 3))
  writer = _Writer()
  progress = loop.Progress(10, 4, 0, ())
  hooks = [lambda step, state: {'knn': 0.5}, lambda step, state: {'grid': image}]
  loop._run_hooks(hooks, 3, None, writer, progress)  # pylint: disable=protected-access
  assert writer.scalars == {3: {'knn': 0.5}} and list(writer.images) == [3]
  assert writer.images[3]['grid'] is image
