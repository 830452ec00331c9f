"""Pictures of results: confusion matrices, cross-correlation matrices, embeddings."""

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


def confusion_matrix_png(confusion, class_names, path: str, title: str = '') -> None:
  confusion = np.asarray(confusion)
  rates = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
  fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(class_names), 0.8 + 0.5 * len(class_names)))
  im = ax.imshow(rates, cmap='Blues', vmin=0, vmax=1)
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


def cross_correlation_png(c, path: str, title: str = 'cross-correlation C') -> None:
  """Heatmap of C in [-1, 1]; Barlow Twins pushes it towards the identity."""
  c = np.asarray(c)
  fig, ax = plt.subplots(figsize=(5.5, 4.8))
  im = ax.imshow(c, cmap='RdBu_r', vmin=-1, vmax=1, interpolation='nearest')
  ax.set_title(f'{title}\nmean diagonal {np.diag(c).mean():.2f}', fontsize=9)
  ax.set_xlabel('feature j (view 2)'), ax.set_ylabel('feature i (view 1)')
  fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  save(fig, path)


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


def embeddings_png(panels, path: str, class_names=None, title: str = '') -> None:
  """Scatter plots of 2-D embeddings coloured by class, side by side.

  Args:
    panels: sequence of (points [n, 2], labels [n], panel title); one panel
      per run, e.g. gamma = 0 next to the best gamma (seed 001, Figs. 4.1-4.20).
    path: the PNG to write.
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
  save(fig, path)
