"""Adaptive fusion of pretrained representations (Resheff, Lieder, Hope, ICPRAM 2019) as layers.

Several frozen pretrained networks each give a feature vector per input; one small head per
representation (an *expert*) maps its features to an output, and a gate looks at the input itself
(a thumbnail of the image) and says, per input, how much to trust each expert. The combine is
:func:`moefast.mixture`: ``out[b] = sum_e softmax(gate_logits[b])[e] * expert_out[e, b]``, fused
forward and backward.

- :class:`ThumbnailGate`: the miniature CNN gate, thumbnail ``[B, C, h, w]`` -> logits ``[B, E]``.
- :class:`ExpertHead`: a small MLP head on one representation.
- :class:`LabelEmbeddingHead`: a head that predicts into a label-embedding space (word vectors of
  the class names) and classifies by cosine similarity to the label embeddings.
- :class:`AdaptiveFusion`: experts + gate + mixture, with the mixing modes of :data:`MIX_MODES`
  and the gate kinds of :data:`GATE_KINDS` (the adaptive gate and the two input-independent
  baselines).

Every mode returns *scores* whose ``log_softmax`` is the model's log-probability, so
``F.cross_entropy(model(...), y)`` trains all of them and ``argmax`` predicts:

- ``mix="prob"``: the experts' softmax outputs are mixed; the result is a probability vector and
  the model returns its logarithm (``log_softmax`` of it is itself).
- ``mix="logit"``: the experts' raw logits are mixed; the result is returned as logits.
- ``mix="embedding"``: the experts' label-space embeddings are mixed, and the mixed embedding is
  scored against the label embeddings (the multi-modal variant).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import ops, reference

MIX_MODES = ("prob", "logit", "embedding")
GATE_KINDS = ("adaptive", "static", "uniform")

__all__ = [
    "GATE_KINDS",
    "MIX_MODES",
    "AdaptiveFusion",
    "ExpertHead",
    "LabelEmbeddingHead",
    "LabelSimilarity",
    "ThumbnailGate",
]


class ThumbnailGate(nn.Module):
    """A miniature CNN that looks at a thumbnail of the input and scores the experts.

    ``forward(thumb [B, in_channels, h, w]) -> [B, num_experts]`` gate logits; :meth:`weights`
    gives their softmax (the mixing weights, summing to one per input). Two 3x3 conv blocks
    (``width`` and ``2 * width`` channels, ReLU, 2x2 max-pool after the first), global average
    pooling and a linear layer; any thumbnail size of at least 2x2 works.
    """

    def __init__(
        self, num_experts: int, in_channels: int = 1, width: int = 8, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if num_experts < 1 or in_channels < 1 or width < 1:
            raise ValueError(
                "ThumbnailGate: num_experts, in_channels and width must be positive, got "
                f"{num_experts}, {in_channels}, {width}"
            )
        self.num_experts = num_experts
        self.in_channels = in_channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(dropout),
        )
        self.out = nn.Linear(2 * width, num_experts)
        # Start from the uniform mixture: the gate first learns which expert to prefer.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, thumb: Tensor) -> Tensor:
        if thumb.dim() != 4 or thumb.shape[1] != self.in_channels:
            raise ValueError(
                f"ThumbnailGate: thumb must be [B, {self.in_channels}, h, w], "
                f"got shape {tuple(thumb.shape)}"
            )
        return self.out(self.features(thumb))

    def weights(self, thumb: Tensor) -> Tensor:
        """The mixing weights ``softmax(gate logits)``, ``[B, num_experts]``, rows summing to one."""
        return torch.softmax(self(thumb), dim=-1)


class ExpertHead(nn.Module):
    """The head of one expert: ``Linear -> ReLU -> Dropout -> Linear`` on one representation.

    ``hidden=0`` makes it a single linear layer. Inputs are expected standardised (zero mean, unit
    variance per feature), which :class:`AdaptiveFusion` does not do for you.
    """

    def __init__(
        self, in_features: int, out_features: int, hidden: int = 128, dropout: float = 0.2
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        if hidden:
            self.net = nn.Sequential(
                nn.Linear(in_features, hidden),
                nn.ReLU(),
                nn.Dropout(dropout),
                nn.Linear(hidden, out_features),
            )
        else:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, out_features))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class LabelSimilarity(nn.Module):
    """Scores label-space embeddings against fixed label vectors by scaled cosine similarity.

    ``forward(z [B, D]) -> [B, C]``: ``scale * <z / |z|, L_c / |L_c|>`` for the ``C`` label
    vectors ``L [C, D]`` (a buffer, not trained); the scale (a temperature) is learned, in log
    space. With ``center=True`` the label vectors' mean is subtracted first: word vectors of
    related names (the digits ``"one"`` ... ``"nine"``) share a large common component, and
    removing it spreads the labels apart on the sphere.
    """

    def __init__(
        self, label_vectors: Tensor, init_scale: float = 10.0, center: bool = True
    ) -> None:
        super().__init__()
        if label_vectors.dim() != 2 or label_vectors.shape[0] < 1:
            raise ValueError(
                f"LabelSimilarity: label_vectors must be [C, D], got {tuple(label_vectors.shape)}"
            )
        v = label_vectors.detach().float()
        if center and v.shape[0] > 1:
            v = v - v.mean(dim=0, keepdim=True)
        self.register_buffer("labels", F.normalize(v, dim=-1))
        self.log_scale = nn.Parameter(torch.tensor(float(init_scale)).log())

    @property
    def dim(self) -> int:
        return self.labels.shape[1]

    def forward(self, z: Tensor) -> Tensor:
        return self.log_scale.exp() * F.normalize(z, dim=-1) @ self.labels.to(z.dtype).t()


class LabelEmbeddingHead(nn.Module):
    """An expert head that predicts a point in a label-embedding space, then classifies by
    similarity to the label embeddings (pretrained word vectors of the class names).

    :meth:`embed` maps features ``[B, in_features]`` to ``[B, D]``; :meth:`classify` scores an
    embedding against the labels; ``forward = classify(embed(x))``. Pass ``similarity`` to share
    one :class:`LabelSimilarity` (and its learned scale) between several heads.
    """

    def __init__(
        self,
        in_features: int,
        label_vectors: Tensor | None = None,
        hidden: int = 128,
        dropout: float = 0.2,
        similarity: LabelSimilarity | None = None,
    ) -> None:
        super().__init__()
        if (label_vectors is None) == (similarity is None):
            raise ValueError("LabelEmbeddingHead: pass exactly one of label_vectors, similarity")
        self.similarity = similarity if similarity is not None else LabelSimilarity(label_vectors)
        self.proj = ExpertHead(in_features, self.similarity.dim, hidden, dropout)
        self.in_features = in_features
        self.out_features = self.similarity.labels.shape[0]

    def embed(self, x: Tensor) -> Tensor:
        return self.proj(x)

    def classify(self, z: Tensor) -> Tensor:
        return self.similarity(z)

    def forward(self, x: Tensor) -> Tensor:
        return self.classify(self.embed(x))


class AdaptiveFusion(nn.Module):
    """Experts on several representations mixed per input by a gate, through :func:`moefast.mixture`.

    Args:
        heads: one head per representation (:class:`ExpertHead`, or :class:`LabelEmbeddingHead`
            for ``mix="embedding"``, which must all share one :class:`LabelSimilarity`).
        gate: the gate network for ``gate="adaptive"`` (default: a :class:`ThumbnailGate` with
            ``thumb_channels`` input channels).
        mix: ``"prob"``, ``"logit"`` or ``"embedding"`` (see the module docstring).
        gate_kind: ``"adaptive"`` (per-input gate), ``"static"`` (learned input-independent
            logits, one per expert) or ``"uniform"`` (fixed equal weights).
        fused: ``True`` combines with the fused :func:`moefast.mixture`; ``False`` with the plain
            PyTorch :func:`moefast.reference.mixture` (for checking the two agree).

    ``forward(features, thumb=None)``: ``features`` is a sequence of ``[B, d_e]`` tensors, one per
    expert in the order of ``heads``; ``thumb`` the thumbnails ``[B, c, h, w]`` (needed by the
    adaptive gate only). Returns scores ``[B, C]`` for ``F.cross_entropy``. After each call
    ``last_weights`` holds the mixing weights ``[B, E]`` (detached).
    """

    def __init__(
        self,
        heads: Sequence[nn.Module],
        gate: nn.Module | None = None,
        mix: str = "prob",
        gate_kind: str = "adaptive",
        thumb_channels: int = 1,
        fused: bool = True,
        eps: float = 1e-7,
    ) -> None:
        super().__init__()
        if mix not in MIX_MODES:
            raise ValueError(f"AdaptiveFusion: mix must be one of {MIX_MODES}, got {mix!r}")
        if gate_kind not in GATE_KINDS:
            raise ValueError(
                f"AdaptiveFusion: gate_kind must be one of {GATE_KINDS}, got {gate_kind!r}"
            )
        if len(heads) < 1:
            raise ValueError("AdaptiveFusion: needs at least one head")
        if mix == "embedding":
            sims = {id(getattr(h, "similarity", None)) for h in heads}
            if not all(isinstance(h, LabelEmbeddingHead) for h in heads) or len(sims) != 1:
                raise ValueError(
                    "AdaptiveFusion: mix='embedding' needs LabelEmbeddingHeads sharing one "
                    "LabelSimilarity"
                )
        self.heads = nn.ModuleList(heads)
        self.num_experts = len(heads)
        self.mix = mix
        self.gate_kind = gate_kind
        self.fused = fused
        self.eps = eps
        if gate_kind == "adaptive":
            self.gate = gate if gate is not None else ThumbnailGate(len(heads), thumb_channels)
        else:
            self.gate = None
        # Input-independent logits: trained for "static", frozen at zero for "uniform".
        self.static_logits = nn.Parameter(
            torch.zeros(len(heads)), requires_grad=gate_kind == "static"
        )
        self.last_weights: Tensor | None = None

    def gate_logits(self, batch: int, thumb: Tensor | None, like: Tensor) -> Tensor:
        if self.gate_kind == "adaptive":
            if thumb is None:
                raise ValueError("AdaptiveFusion: the adaptive gate needs thumb")
            return self.gate(thumb).to(like.dtype)
        return self.static_logits.to(like.dtype).expand(batch, -1)

    def expert_outputs(self, features: Sequence[Tensor]) -> Tensor:
        """The experts' outputs to mix, stacked ``[E, B, C]`` (``[E, B, D]`` for embeddings)."""
        if len(features) != self.num_experts:
            raise ValueError(
                f"AdaptiveFusion: expected {self.num_experts} feature tensors, got {len(features)}"
            )
        if self.mix == "embedding":
            outs = [h.embed(x) for h, x in zip(self.heads, features, strict=True)]
        else:
            outs = [h(x) for h, x in zip(self.heads, features, strict=True)]
            if self.mix == "prob":
                outs = [torch.softmax(o, dim=-1) for o in outs]
        return torch.stack(outs, dim=0)

    def forward(self, features: Sequence[Tensor], thumb: Tensor | None = None) -> Tensor:
        return self.combine(self.expert_outputs(features), thumb)

    def combine(self, expert_out: Tensor, thumb: Tensor | None = None) -> Tensor:
        """Gates and mixes already computed expert outputs ``[E, B, C]`` (as made by
        :meth:`expert_outputs`: probabilities, logits or embeddings by ``mix``); this is how
        the gate is trained on held-out (out-of-fold) expert outputs."""
        if expert_out.dim() != 3 or expert_out.shape[0] != self.num_experts:
            raise ValueError(
                f"AdaptiveFusion: expert_out must be [{self.num_experts}, B, C], "
                f"got {tuple(expert_out.shape)}"
            )
        logits = self.gate_logits(expert_out.shape[1], thumb, expert_out)
        combine = ops.mixture if self.fused else reference.mixture
        mixed = combine(logits.contiguous(), expert_out.contiguous())
        self.last_weights = torch.softmax(logits.detach(), dim=-1)
        if self.mix == "prob":
            return mixed.clamp_min(self.eps).log()
        if self.mix == "embedding":
            return self.heads[0].classify(mixed)
        return mixed

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, mix={self.mix!r}, gate_kind={self.gate_kind!r}"
