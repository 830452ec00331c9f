"""Pictures of results: confusion matrices, cross-correlation matrices, embeddings."""

import matplotlib

matplotlib.use('Agg')  # Files only; no display needed on servers and in CI.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


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
  fig.savefig(path, dpi=100)
  plt.close(fig)


def cross_correlation_png(c, path: str, title: str = 'cross-correlation C') -> None:
  """Heatmap of C in [-1, 1]; Barlow Twins pushes it towards the identity."""
  c = np.asarray(c)
  fig, ax = plt.subplots(figsize=(5.5, 4.8))
  im = ax.imshow(c, cmap='RdBu_r', vmin=-1, vmax=1, interpolation='nearest')
  ax.set_title(f'{title}  (mean diag {np.diag(c).mean():.2f})')
  ax.set_xlabel('feature j (view 2)'), ax.set_ylabel('feature i (view 1)')
  fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
