"""Image data that ships inside packages, shared by the research systems (moefast.hardmoe,
moefast.fusion): Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, read from its
idx files with no download. ``MOEFAST_FASHION_MNIST_DIR`` points elsewhere."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np


def fashion_mnist_dir() -> Path:
    """Where the Fashion-MNIST idx files are (Debian's package by default)."""
    return Path(os.environ.get("MOEFAST_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))


def fashion_mnist_available() -> bool:
    return (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").exists()


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (the MNIST format, gzip-compressed) as a uint8 array of its stated shape."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images [N, 28, 28] uint8, labels [N] int64)`` of split ``"train"`` or ``"t10k"``."""
    if split not in ("train", "t10k"):
        raise ValueError(f"split must be 'train' or 't10k', got {split!r}")
    root = fashion_mnist_dir()
    images = read_idx(root / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(root / f"{split}-labels-idx1-ubyte.gz").astype(np.int64)
    return images, labels
