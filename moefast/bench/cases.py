"""The benchmark shapes (named after real models, scaled to the device) and their inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ROUTINGS = ("uniform", "zipf")
ZIPF_EXPONENT = 1.2


@dataclass(frozen=True)
class MoeShape:
    """One MoE layer size: ``T`` tokens of width ``d``, ``E`` experts of hidden width ``h``, top-``k``."""

    name: str
    T: int
    d: int
    h: int
    E: int
    k: int

    @property
    def label(self) -> str:
        return f"T{self.T} d{self.d} h{self.h} E{self.E} k{self.k}"

    @property
    def info(self) -> dict:
        return {"T": self.T, "d": self.d, "h": self.h, "E": self.E, "k": self.k}


@dataclass(frozen=True)
class MixtureShape:
    """The adaptive-fusion combine: ``B`` examples, ``E`` models, ``C`` outputs each."""

    name: str
    B: int
    E: int
    C: int

    @property
    def label(self) -> str:
        return f"B{self.B} E{self.E} C{self.C}"

    @property
    def info(self) -> dict:
        return {"B": self.B, "E": self.E, "C": self.C}


# The real layers (d, h, E, k): Mixtral-8x7B, Qwen3-30B-A3B, DeepSeek-V3 (routed experts only).
MODELS = {
    "mixtral-8x7b": dict(d=4096, h=14336, E=8, k=2),
    "qwen3-30b-a3b": dict(d=2048, h=768, E=128, k=8),
    "deepseek-v3": dict(d=7168, h=2048, E=256, k=8),
}

# The full set on a GPU: the real widths and expert counts, scaled down by token count only.
CUDA_SHAPES = {
    "mixtral-8x7b": MoeShape("mixtral-8x7b", T=4096, **MODELS["mixtral-8x7b"]),
    "qwen3-30b-a3b": MoeShape("qwen3-30b-a3b", T=4096, **MODELS["qwen3-30b-a3b"]),
    "deepseek-v3": MoeShape("deepseek-v3", T=2048, **MODELS["deepseek-v3"]),
}
# On a CPU the widths are scaled down too (same E and k, same h/d ratio, roughly), so that the
# quick set runs in a few minutes on 2 cores; the full CPU set doubles the tokens.
CPU_QUICK_SHAPES = {
    "mixtral-8x7b": MoeShape("mixtral-8x7b", T=256, d=256, h=896, E=8, k=2),
    "qwen3-30b-a3b": MoeShape("qwen3-30b-a3b", T=128, d=128, h=48, E=128, k=8),
    "deepseek-v3": MoeShape("deepseek-v3", T=128, d=224, h=64, E=256, k=8),
}
CPU_FULL_SHAPES = {
    "mixtral-8x7b": MoeShape("mixtral-8x7b", T=1024, d=512, h=1792, E=8, k=2),
    "qwen3-30b-a3b": MoeShape("qwen3-30b-a3b", T=512, d=256, h=96, E=128, k=8),
    "deepseek-v3": MoeShape("deepseek-v3", T=512, d=448, h=128, E=256, k=8),
}
# The quick set times two (dtype, routing) pairs per model instead of all four.
QUICK_COMBOS = (("float32", "uniform"), ("bfloat16", "zipf"))
# mixture (adaptive fusion): B examples, E pretrained models, C outputs.
CPU_MIXTURE_SHAPES = {"fusion-E8": MixtureShape("fusion-E8", B=2048, E=8, C=512)}
CUDA_MIXTURE_SHAPES = {"fusion-E8": MixtureShape("fusion-E8", B=65536, E=8, C=1024)}


def shapes_for(device: str, quick: bool) -> tuple[dict, dict]:
    if device == "cuda":
        return CUDA_SHAPES, CUDA_MIXTURE_SHAPES
    return (CPU_QUICK_SHAPES if quick else CPU_FULL_SHAPES), CPU_MIXTURE_SHAPES


# ----------------------------------------------------------------------------- inputs


def zipf_probabilities(E: int) -> Tensor:
    p = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** ZIPF_EXPONENT
    return (p / p.sum()).float()


def expert_ids(shape: MoeShape, routing: str, seed: int = 0) -> Tensor:
    """``[T, k]`` int32 distinct experts per token: uniform, or Zipf-skewed towards low indices."""
    gen = torch.Generator().manual_seed(seed)
    if routing == "uniform":
        p = torch.ones(shape.E)
    elif routing == "zipf":
        p = zipf_probabilities(shape.E)
    else:
        raise ValueError(f"unknown routing {routing!r}")
    ids = torch.multinomial(p.expand(shape.T, shape.E), shape.k, replacement=False, generator=gen)
    return ids.to(torch.int32)


def randn(*size, dtype, scale=1.0, seed=0, device="cpu") -> Tensor:
    """Seeded normal noise, made on ``device`` (large GPU weights are not drawn on the host)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = torch.randn(*size, generator=gen, device=device, dtype=torch.float32)
    return (out.mul_(scale) if scale != 1.0 else out).to(dtype)
