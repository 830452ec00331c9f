"""Pictures of results: confusion matrices, cross-correlation matrices, embeddings, images.

The ``*_figure`` functions return a matplotlib figure (a notebook shows it
with ``png_bytes``); the ``*_png`` functions write one to a file.
"""

import io

from etils import epath
import matplotlib

matplotlib.use('Agg')  # Files only; no display needed on servers and in CI.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save(fig, path) -> None:
  """Writes ``fig`` as a PNG to ``path`` (local or ``gs://``, through epath) and closes it."""
  with epath.Path(path).open('wb') as f:
    fig.savefig(f, format='png', dpi=100)
  plt.close(fig)


# Confusion matrices name their classes on the axes up to this many classes.
NAMED_CLASSES = 100


def confusion_matrix_png(confusion, class_names, path: str, title: str = '') -> None:
  """The row-normalised confusion matrix; class names on the axes up to NAMED_CLASSES classes.

  Beyond, a figure of 20 classes' size, without names (ImageNet's 1000 made a
  550-inch figure; a 56-inch one of 1000 rows took 10 s to write).
  """
  confusion = np.asarray(confusion)
  rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
  side = len(class_names) if len(class_names) <= NAMED_CLASSES else 20
  fig, ax = plt.subplots(figsize=(1.0 + 0.55 * side, 0.8 + 0.5 * side))
  im = ax.imshow(rates, cmap='Blues', vmin=0, vmax=1)
  if len(class_names) <= NAMED_CLASSES:
    ax.set_xticks(range(len(class_names)), class_names, rotation=60, ha='right')
    ax.set_yticks(range(len(class_names)), class_names)
  ax.set_xlabel('predicted'), ax.set_ylabel('true'), ax.set_title(title)
  if len(class_names) <= 20:
    for i, j in np.ndindex(confusion.shape):
      ax.text(j, i, confusion[i, j], ha='center', va='center', fontsize=7,
              color='white' if rates[i, j] > 0.5 else 'black')
  fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  save(fig, path)


def png_bytes(fig) -> bytes:
  """``fig`` as PNG bytes, freed (for IPython.display.Image in a notebook)."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=100)
  plt.close(fig)
  return buffer.getvalue()


def cross_correlation_figure(c, title: str = 'cross-correlation C'):
  """Heatmap of C in [-1, 1]; Barlow Twins pushes it towards the identity."""
  c = np.asarray(c)
  fig, ax = plt.subplots(figsize=(5.5, 4.8))
  im = ax.imshow(c, cmap='RdBu_r', vmin=-1, vmax=1, interpolation='nearest')
  ax.set_title(f'{title}\nmean diagonal {np.diag(c).mean():.2f}', fontsize=9)
  ax.set_xlabel('feature j (view 2)'), ax.set_ylabel('feature i (view 1)')
  fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  return fig


def cross_correlation_png(c, path: str, title: str = 'cross-correlation C') -> None:
  save(cross_correlation_figure(c, title), path)


def heatmap_rgb(c, min_side: int = 256) -> np.ndarray:
  """C in [-1, 1] as an [H, W, 3] image in [0, 1] (the colours of the PNG), for TensorBoard.

  Each entry becomes a square of pixels, so that small matrices are not a
  blur of a few pixels.
  """
  c = np.asarray(c, np.float32)
  rgb = plt.get_cmap('RdBu_r')((np.clip(c, -1, 1) + 1) / 2)[..., :3].astype(np.float32)
  scale = max(1, -(-min_side // max(c.shape)))
  return rgb.repeat(scale, 0).repeat(scale, 1)


def image_grid(rows, pad: int = 2) -> np.ndarray:
  """Rows of images ([n, H, W, 3] each, same H and W) as one [H', W', 3] image, white gaps.

  Args:
    rows: sequence of image batches; row r is rows[r], left to right.
    pad: pixels between images.
  """
  rows = [np.asarray(r, np.float32) for r in rows]
  n = max(len(r) for r in rows)
  h, w, ch = rows[0].shape[1:]
  grid = np.ones((len(rows) * (h + pad) - pad, n * (w + pad) - pad, ch), np.float32)
  for i, row in enumerate(rows):
    for j, image in enumerate(row):
      grid[i * (h + pad):i * (h + pad) + h, j * (w + pad):j * (w + pad) + w] = image
  return grid


def image_grid_figure(rows, row_titles=(), title: str = ''):
  """``image_grid`` drawn with a label per row (e.g. 'view 1', 'view 2' or 'query')."""
  grid = image_grid(rows)
  h = np.asarray(rows[0]).shape[1]
  fig, ax = plt.subplots(figsize=(min(16, 1.0 + grid.shape[1] / 28), 0.6 + grid.shape[0] / 28))
  ax.imshow(grid, interpolation='nearest')
  ax.set_yticks([(h + 2) * i + h / 2 for i in range(len(row_titles))], row_titles)
  ax.set_xticks([]), ax.set_title(title, fontsize=10)
  fig.tight_layout()
  return fig


def batchnorm_figure(names, means, variances, title: str = 'BatchNorm running statistics'):
  """Per layer, the spread over channels of the running mean and variance (box plots)."""
  fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 0.35 * len(names) + 3), 4.2), sharey=False)
  for ax, values, label in ((axes[0], means, 'running mean'), (axes[1], variances, 'running var')):
    ax.boxplot([np.asarray(v) for v in values], showfliers=False)
    ax.set_xticks(range(1, len(names) + 1), names, rotation=90, fontsize=6)
    ax.set_title(label, fontsize=10)
  axes[1].set_yscale('log')
  fig.suptitle(title)
  fig.tight_layout()
  return fig


def project_2d(features, method: str = 'pca', seed: int = 0) -> np.ndarray:
  """2-D PCA or t-SNE (scikit-learn) of [n, d] features, for plotting.

  Args:
    features: [n, d] array, n >= 3.
    method: 'pca' or 'tsne'.
    seed: random state of the projection (t-SNE is stochastic).

  Returns:
    [n, 2] float32.
  """
  from sklearn import decomposition, manifold  # Only the plotting paths need sklearn.
  features = np.asarray(features, np.float32)
  if method == 'pca':
    return decomposition.PCA(2, random_state=seed).fit_transform(features).astype(np.float32)
  if method == 'tsne':
    # Perplexity must stay below the number of points; 30 is sklearn's default.
    perplexity = float(min(30.0, max(2.0, (len(features) - 1) / 3)))
    tsne = manifold.TSNE(2, perplexity=perplexity, init='pca', random_state=seed)
    return tsne.fit_transform(features).astype(np.float32)
  raise ValueError(f"method={method!r} is not 'pca' or 'tsne'.")


def embeddings_figure(panels, class_names=None, title: str = ''):
  """Scatter plots of 2-D embeddings coloured by class, side by side.

  Args:
    panels: sequence of (points [n, 2], labels [n], panel title); one panel
      per run, e.g. gamma = 0 next to the best gamma (seed 001, Figs. 4.1-4.20).
    class_names: legend labels, indexed by class; default the class ids.
    title: figure title.
  """
  fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels) + 1.6, 4.6), squeeze=False)
  cmap = plt.get_cmap('tab10' if max(int(np.max(p[1])) for p in panels) < 10 else 'tab20')
  for ax, (points, labels, panel_title) in zip(axes[0], panels):
    points, labels = np.asarray(points), np.asarray(labels)
    for c in np.unique(labels):
      name = class_names[c] if class_names is not None else str(c)
      ax.scatter(*points[labels == c].T, s=4, alpha=0.7, color=cmap(int(c) % cmap.N), label=name)
    ax.set_title(panel_title, fontsize=10)
    ax.set_xticks([]), ax.set_yticks([])
  axes[0, -1].legend(loc='center left', bbox_to_anchor=(1.02, 0.5), markerscale=3, fontsize=8,
                     frameon=False)
  fig.suptitle(title)
  fig.tight_layout()
  return fig


def embeddings_png(panels, path: str, class_names=None, title: str = '') -> None:
  """``embeddings_figure`` written to ``path``."""
  save(embeddings_figure(panels, class_names, title), path)
