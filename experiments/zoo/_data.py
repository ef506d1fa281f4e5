"""Digits tasks: scikit-learn's bundled 8x8 digits under fixed input transforms.

Each *task* is the 10-class digit problem seen through one transform of the
image (a rotation, a flip, an inversion, a fixed pixel permutation, ...). The
transforms move the same information to different pixels or signs, so the
tasks share a label space but need different input features: fine-tunes on
them genuinely conflict when their backbones are merged.

The data are split once (by a PRNG key) into a *pre-training* part, used only
for the base model, and a disjoint *task* part divided into train, validation
(for choosing merge hyperparameters) and test (for reporting).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

IMAGE = 8
NUM_CLASSES = 10


class Split(NamedTuple):
  """Images ``x`` ``[N, 64]`` float32 in [0, 1] and labels ``y`` ``[N]`` int32."""
  x: np.ndarray
  y: np.ndarray


class Digits(NamedTuple):
  """The four disjoint splits of the digits data (untransformed)."""
  pretrain: Split
  train: Split
  val: Split
  test: Split


def load_digits(key: jax.Array, *, pretrain_frac: float = 0.4,
                val_frac: float = 0.1, test_frac: float = 0.3) -> Digits:
  """Loads scikit-learn's digits and splits them with a PRNG key.

  Args:
    key: PRNG key for the shuffle.
    pretrain_frac: fraction of the 1797 images reserved for the base model.
    val_frac: fraction for the validation split (merge hyperparameters).
    test_frac: fraction for the test split (reported accuracies).

  Returns:
    `Digits` with pixel values scaled to [0, 1]; the task-train split gets the
    remainder.
  """
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  d = datasets.load_digits()
  x = (d.data / 16.0).astype(np.float32)
  y = d.target.astype(np.int32)
  perm = np.asarray(jax.random.permutation(key, len(x)))
  x, y = x[perm], y[perm]
  n = len(x)
  n_pre, n_val, n_test = (int(round(f * n)) for f in (pretrain_frac, val_frac,
                                                       test_frac))
  if n_pre + n_val + n_test >= n:
    raise ValueError(f'pretrain_frac + val_frac + test_frac must be < 1, got '
                     f'{pretrain_frac} + {val_frac} + {test_frac}.')
  cuts = np.cumsum([n_pre, n_val, n_test])
  pre, val, test, train = np.split(np.arange(n), cuts)
  return Digits(*(Split(x[i], y[i]) for i in (pre, train, val, test)))


def _img(x):
  return x.reshape(x.shape[:-1] + (IMAGE, IMAGE))


def _flat(x):
  return x.reshape(x.shape[:-2] + (IMAGE * IMAGE,))


def _shift(x, dy, dx):
  # Shift with zero fill (not wrap-around), so information is partly lost.
  img = np.roll(_img(x), (dy, dx), axis=(-2, -1))
  if dy > 0:
    img[..., :dy, :] = 0
  elif dy < 0:
    img[..., dy:, :] = 0
  if dx > 0:
    img[..., :, :dx] = 0
  elif dx < 0:
    img[..., :, dx:] = 0
  return _flat(img)


def _permutation(key):
  return np.asarray(jax.random.permutation(key, IMAGE * IMAGE))


def make_transform(name: str, key: jax.Array) -> Callable[[np.ndarray],
                                                          np.ndarray]:
  """Returns the deterministic input transform ``x [N, 64] -> [N, 64]`` named ``name``.

  Names: ``identity``, ``rot90``, ``rot180``, ``rot270``, ``hflip``, ``vflip``,
  ``transpose``, ``invert`` (1 - x), ``permute`` (a fixed pixel permutation
  drawn from ``key``), ``shift`` (2 pixels right and down), ``noise`` (fixed
  per-pixel Gaussian noise drawn from ``key`` per image index, sigma 0.3,
  clipped), ``quadrants`` (swap the four 4x4 quadrants diagonally).

  Raises:
    ValueError: for an unknown name, listing the known ones.
  """
  if name == 'identity':
    return lambda x: x
  if name in ('rot90', 'rot180', 'rot270'):
    k = int(name[3:]) // 90
    return lambda x: _flat(np.rot90(_img(x), k, axes=(-2, -1)).copy())
  if name == 'hflip':
    return lambda x: _flat(_img(x)[..., :, ::-1].copy())
  if name == 'vflip':
    return lambda x: _flat(_img(x)[..., ::-1, :].copy())
  if name == 'transpose':
    return lambda x: _flat(np.swapaxes(_img(x), -1, -2).copy())
  if name == 'invert':
    return lambda x: 1.0 - x
  if name == 'permute':
    perm = _permutation(key)
    return lambda x: x[..., perm]
  if name == 'shift':
    return lambda x: _shift(x, 2, 2)
  if name == 'quadrants':
    h = IMAGE // 2
    return lambda x: _flat(np.roll(_img(x), (h, h), axis=(-2, -1)).copy())
  if name == 'noise':
    def noise(x):
      eps = np.asarray(jax.random.normal(key, x.shape, jnp.float32))
      return np.clip(x + 0.3 * eps, 0.0, 1.0).astype(np.float32)
    return noise
  raise ValueError(f'Unknown task transform {name!r}; known: {TASK_NAMES}.')


TASK_NAMES = ('identity', 'rot90', 'rot180', 'rot270', 'hflip', 'vflip',
              'transpose', 'invert', 'permute', 'shift', 'noise', 'quadrants')


class Task(NamedTuple):
  """One task: its name and its transformed train/val/test splits."""
  name: str
  train: Split
  val: Split
  test: Split


def make_tasks(digits: Digits, names: Sequence[str], key: jax.Array
               ) -> list[Task]:
  """Applies each named transform to the task splits (one key per task).

  Example:
    >>> import jax
    >>> from experiments import zoo
    >>> d = zoo.load_digits(jax.random.key(0))
    >>> tasks = zoo.make_tasks(d, ['rot90', 'invert'], jax.random.key(1))
    >>> [t.name for t in tasks], tasks[0].train.x.shape[1]
    (['rot90', 'invert'], 64)
  """
  if len(set(names)) != len(names):
    raise ValueError(f'Task names must be distinct, got {list(names)}.')
  tasks = []
  for name, k in zip(names, jax.random.split(key, len(names))):
    ks = jax.random.split(k, 3)
    splits = []
    for split, kk in zip((digits.train, digits.val, digits.test), ks):
      # The transform's own randomness (permutation) comes from the task key;
      # noise differs per split so that test noise is never seen in training.
      f = make_transform(name, k if name == 'permute' else kk)
      splits.append(Split(np.asarray(f(split.x), np.float32), split.y))
    tasks.append(Task(name, *splits))
  return tasks


def augment(x: np.ndarray, key: jax.Array, *, max_shift: int = 1,
            noise: float = 0.1, contrast: float = 0.2) -> np.ndarray:
  """Generic augmentations for pre-training: random shifts, noise and contrast.

  These are *not* the task transforms: the base learns digits in general,
  robust to small perturbations, but never sees a rotated or inverted digit.
  """
  n = x.shape[0]
  k1, k2, k3, k4 = jax.random.split(key, 4)
  dy = np.asarray(jax.random.randint(k1, (n,), -max_shift, max_shift + 1))
  dx = np.asarray(jax.random.randint(k2, (n,), -max_shift, max_shift + 1))
  out = np.empty_like(x)
  for sy in range(-max_shift, max_shift + 1):
    for sx in range(-max_shift, max_shift + 1):
      sel = (dy == sy) & (dx == sx)
      if sel.any():
        out[sel] = _shift(x[sel], sy, sx)
  c = 1.0 + contrast * np.asarray(jax.random.uniform(k3, (n, 1), minval=-1.0,
                                                      maxval=1.0))
  eps = noise * np.asarray(jax.random.normal(k4, x.shape))
  return np.clip(out * c + eps, 0.0, 1.0).astype(np.float32)
