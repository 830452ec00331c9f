"""barlow_jax: Barlow Twins (self-supervised and supervised) in JAX/Flax."""

import os as _os

# TensorFlow's GCS filesystem (epath and TensorBoard on gs:// go through it)
# caches file stats for an age it reads once, when TensorFlow loads. A resume
# removes a checkpoint step a preempted save left unfinished and saves that
# step again seconds later; with the cache the new save saw the removed
# directory as still there and stopped with exit 74. Off unless the user set it.
_os.environ.setdefault('GCS_STAT_CACHE_MAX_AGE', '0')
