"""Classification metrics of every results table.

Definitions (Ghosh, Ghosh & Das (2022) report "micro" and "macro" scores):
  * micro = accuracy over all test examples (equal to micro-averaged F1 for
    single-label classification);
  * macro = macro-averaged F1 (unweighted mean of per-class F1). On CIFAR-10's
    balanced test set the macro-averaged *recall* equals the accuracy, so the
    paper's distinct macro numbers must be F1 (or precision); we use F1.
"""

import numpy as np
from sklearn import metrics as skm


def classification_metrics(scores: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
  """Top-1/top-5, micro (accuracy) and macro-F1, per-class accuracy, confusion matrix."""
  pred = scores.argmax(-1)
  top5 = np.argsort(-scores, axis=-1)[:, :min(5, num_classes)]
  confusion = skm.confusion_matrix(labels, pred, labels=np.arange(num_classes))
  per_class = confusion.diagonal() / np.maximum(confusion.sum(1), 1)
  return {
      'top1': float((pred == labels).mean()),
      'top5': float((top5 == labels[:, None]).any(-1).mean()),
      'micro': float(skm.f1_score(labels, pred, average='micro')),
      'macro': float(skm.f1_score(labels, pred, average='macro')),
      'per_class_accuracy': per_class.tolist(),
      'confusion_matrix': confusion.tolist(),
      'num_examples': int(len(labels)),
  }
