"""The modules of a hard mixture of experts (Gross, Ranzato, Szlam, CVPR 2017).

- :class:`Trunk`: a small CNN (``lower``: convolutions, ``upper``: two linear layers, ``head``:
  the label decoder) trained on the task first; its own head is the baseline.
- :class:`ClusterGater`: assigns each example to exactly one expert from trunk features: k-means
  (scikit-learn's ``KMeans``), balanced k-means (capacity-constrained assignment steps), a tree of
  2-means splits (``ceil(log2 E)`` dot products per example instead of ``E`` distances) or a hash.
- :class:`GroupedExperts`: ``E`` experts, each a stack of linear layers, stored as
  :class:`moefast.nn.GroupedLinear` layers so that all experts run as one grouped GEMM per layer.
- :class:`HardMoE`: gater -> :func:`moefast.routing_from_ids` -> :func:`moefast.permute` ->
  experts -> :func:`moefast.unpermute` -> one shared decoder, in one batched pass with no Python
  loop over experts.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import ops
from ..nn import GroupedLinear

GATERS = ("kmeans", "balanced", "tree", "hash")


# ----------------------------------------------------------------------------- trunk


class Trunk(nn.Module):
    """CNN trunk: ``lower`` (3 strided convolutions, pooled to 4x4) -> ``upper`` (linear, ReLU,
    linear to the label-embedding space) -> ``head`` (the decoder, embedding -> label logits).

    With ``tiles=True`` the convolutions see one cell of the 2x2 composite at a time (the same
    filters for every cell, pooled to 2x2 per cell) and the features are the four cells'
    features side by side, in row-major cell order. The features of a composite are then exactly
    those of its tiles put together (:meth:`assemble`), so :class:`TileFeatureBank` can produce
    trunk features for millions of composites from one pass over the base images.
    """

    def __init__(
        self,
        num_labels: int,
        width: int = 16,
        hidden: int = 128,
        embed: int = 64,
        tiles: bool = False,
    ) -> None:
        super().__init__()
        w = width
        self.tiles = tiles
        self.lower = nn.Sequential(
            nn.Conv2d(1, w, 5, stride=2, padding=2),
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2 if tiles else 4),
            nn.Flatten(),
        )
        self.feature_dim = 4 * w * 16
        self.dims = (self.feature_dim, hidden, embed)
        self.upper = nn.Sequential(
            nn.Linear(self.feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, embed)
        )
        self.head = nn.Linear(embed, num_labels)

    def tile_features(self, t: Tensor) -> Tensor:
        """Features of single tiles ``[n, 1, s, s]`` (``tiles=True``): ``[n, feature_dim / 4]``."""
        if not self.tiles:
            raise RuntimeError("Trunk.tile_features needs a trunk built with tiles=True")
        return self.lower(t)

    @staticmethod
    def assemble(tile_feats: Tensor) -> Tensor:
        """Composite features from the features of its four cells ``[B, 4, f]``: ``[B, 4 f]``."""
        return tile_feats.reshape(tile_feats.shape[0], -1)

    def features(self, x: Tensor) -> Tensor:
        if not self.tiles:
            return self.lower(x)
        B, C, S, _ = x.shape
        s = S // 2
        cells = x.view(B, C, 2, s, 2, s).permute(0, 2, 4, 1, 3, 5).reshape(B * 4, C, s, s)
        return self.assemble(self.lower(cells).view(B, 4, -1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.upper(self.features(x)))


class TileFeatureBank:
    """Trunk features of composites, produced on demand from a table of tile features.

    ``table [T + 1, f]`` holds the features of every base image as a tile
    (:meth:`Trunk.tile_features`), its last row those of a blank cell; ``grid [N, 4]`` names the
    base image in each cell of each composite (-1: blank). Row ``i`` of the bank is
    ``Trunk.assemble(table[grid[i]])``, equal to ``trunk.features`` of the rendered composite
    (for a ``tiles=True`` trunk), at the cost of one gather. Indexing with an int64 tensor of
    row numbers returns those rows as a tensor ``[n, 4 f]``; :meth:`select` returns a smaller
    bank; :meth:`chunks` yields the rows in blocks. Tensor-like enough for the gater, the expert
    trainer and the evaluation (``shape``, ``len``, ``dtype``).
    """

    chunk_rows = 32768  # rows per block of :meth:`chunks` (and :func:`feature_chunks`)

    def __init__(self, table: Tensor, grid: Tensor) -> None:
        if table.dim() != 2 or grid.dim() != 2 or grid.shape[1] != 4:
            raise ValueError(
                f"TileFeatureBank: need table [T, f] and grid [N, 4], got table "
                f"{tuple(table.shape)} and grid {tuple(grid.shape)}"
            )
        self.table = table
        # blank cells (-1) read the last row of the table
        self.grid = torch.where(grid < 0, table.shape[0] - 1, grid).long()

    @classmethod
    @torch.no_grad()
    def build(
        cls, trunk: Trunk, base: Tensor, grid: Tensor, batch_size: int = 4096
    ) -> TileFeatureBank:
        """The bank of composites ``grid`` over base images ``base [T, 1, s, s]``."""
        trunk.eval()
        feats = [
            trunk.tile_features(base[i : i + batch_size]) for i in range(0, len(base), batch_size)
        ]
        blank = trunk.tile_features(torch.zeros_like(base[:1]))
        return cls(torch.cat([*feats, blank]), grid)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.grid.shape[0], 4 * self.table.shape[1]))

    @property
    def dtype(self) -> torch.dtype:
        return self.table.dtype

    def __len__(self) -> int:
        return int(self.grid.shape[0])

    def __getitem__(self, rows: Tensor) -> Tensor:
        return Trunk.assemble(self.table[self.grid[rows]])

    def select(self, rows: Tensor) -> TileFeatureBank:
        """The bank of rows ``rows`` (a boolean mask or int64 row numbers)."""
        bank = TileFeatureBank.__new__(TileFeatureBank)
        bank.table, bank.grid = self.table, self.grid[rows]
        bank.chunk_rows = self.chunk_rows
        return bank

    def chunks(self, size: int | None = None):
        size = size or self.chunk_rows
        for i in range(0, len(self), size):
            yield self[torch.arange(i, min(i + size, len(self)))]


def feature_chunks(features, size: int | None = None):
    """The rows of ``features`` (a tensor or a :class:`TileFeatureBank`) in blocks."""
    if isinstance(features, TileFeatureBank):
        yield from features.chunks(size)
    else:
        size = size or TileFeatureBank.chunk_rows
        for i in range(0, features.shape[0], size):
            yield features[i : i + size]


def select_rows(features, rows: Tensor):
    """Rows ``rows`` (mask or indices) of a tensor, or a smaller :class:`TileFeatureBank`."""
    return features.select(rows) if isinstance(features, TileFeatureBank) else features[rows]


# ----------------------------------------------------------------------------- experts


class GroupedExperts(nn.Module):
    """``E`` experts, each ``Linear -> ReLU -> ... -> Linear`` through ``dims``, as grouped layers.

    ``forward(x [N, dims[0]], offs [E])`` applies expert ``e`` to rows ``offs[e-1]:offs[e]`` (the
    layout of :func:`moefast.permute`); every layer is one :func:`moefast.grouped_mm` call.
    """

    def __init__(self, num_experts: int, dims: tuple[int, ...] | list[int]) -> None:
        super().__init__()
        if len(dims) < 2:
            raise ValueError(f"GroupedExperts: dims needs at least 2 sizes, got {dims}")
        self.num_experts = num_experts
        self.dims = tuple(int(d) for d in dims)
        self.layers = nn.ModuleList(
            GroupedLinear(num_experts, a, b) for a, b in itertools.pairwise(self.dims)
        )

    def forward(self, x: Tensor, offs: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, offs)
            if i + 1 < len(self.layers):
                x = F.relu(x)
        return x

    @classmethod
    def from_linears(cls, num_experts: int, linears: list[nn.Linear]) -> GroupedExperts:
        """``E`` copies of the stack ``linears`` (with ReLU between them): every expert starts
        from the same weights, e.g. the trunk's upper layers."""
        dims = [linears[0].in_features] + [lin.out_features for lin in linears]
        experts = cls(num_experts, dims)
        with torch.no_grad():
            for layer, lin in zip(experts.layers, linears, strict=True):
                layer.weight.copy_(lin.weight.t().unsqueeze(0).expand_as(layer.weight))
                layer.bias.copy_(lin.bias.unsqueeze(0).expand_as(layer.bias))
        return experts

    def expert_state(self, e: int) -> dict[str, Tensor]:
        """The parameters of expert ``e`` alone (a state dict of a 1-expert ``GroupedExperts``)."""
        return {k: v[e : e + 1].detach().clone() for k, v in self.state_dict().items()}

    def load_expert(self, e: int, state: dict[str, Tensor]) -> None:
        """Writes a 1-expert state (from :meth:`expert_state`) into expert ``e``."""
        own = self.state_dict()
        if set(state) != set(own):
            raise ValueError(f"expert state has keys {sorted(state)}, expected {sorted(own)}")
        with torch.no_grad():
            for k, v in own.items():
                v[e : e + 1].copy_(state[k])

    def single(self, e: int) -> GroupedExperts:
        """A standalone 1-expert copy of expert ``e`` (what one worker trains)."""
        one = GroupedExperts(1, self.dims)
        one.load_state_dict(self.expert_state(e))
        return one

    @staticmethod
    def macs_per_example(dims: tuple[int, ...]) -> int:
        return int(sum(a * b for a, b in itertools.pairwise(dims)))


class ModuleExperts(nn.Module):
    """Arbitrary per-expert modules (any ``nn.Module`` mapping ``[n, d_in] -> [n, d_out]``).

    The escape hatch for experts that are not linear stacks: it runs the permuted rows of each
    expert through its own module, so it *does* loop over experts in Python (and reads ``offs`` on
    the host). :class:`GroupedExperts` is the default and the fast path.
    """

    def __init__(self, modules: list[nn.Module]) -> None:
        super().__init__()
        self.experts = nn.ModuleList(modules)
        self.num_experts = len(modules)

    def forward(self, x: Tensor, offs: Tensor) -> Tensor:
        # Arbitrary per-expert modules need each group's rows as Python slices: a deliberate sync
        # on this (non-default) path; GroupedExperts stays on the device.
        ends = offs.tolist()  # host-ok: slicing for arbitrary per-expert modules
        starts = [0, *ends[:-1]]
        parts = [m(x[s:t]) for m, s, t in zip(self.experts, starts, ends, strict=True)]
        return torch.cat(parts, 0)


# ----------------------------------------------------------------------------- gater


def balanced_assignment(dist: Tensor, capacity: int) -> Tensor:
    """Assigns each row of ``dist [N, E]`` to a column, at most ``capacity`` rows per column.

    Rounds of proposals: every unassigned row proposes its nearest column that is not full; each
    column accepts its closest proposers up to its remaining room. Each round fills a column or
    places every row, so at most ``E`` rounds run, all vectorised. Needs ``capacity * E >= N``.
    """
    N, E = dist.shape
    if capacity * E < N:
        raise ValueError(f"capacity {capacity} x {E} columns cannot hold {N} rows")
    ids = torch.full((N,), -1, dtype=torch.long)
    load = torch.zeros(E, dtype=torch.long)
    while True:
        todo = (ids < 0).nonzero().squeeze(1)
        if todo.numel() == 0:
            return ids
        d = dist[todo].clone()
        d[:, load >= capacity] = math.inf
        choice = d.argmin(1)
        best = d.gather(1, choice.unsqueeze(1)).squeeze(1)
        by_dist = best.argsort(stable=True)
        order = by_dist[choice[by_dist].argsort(stable=True)]  # by column, then by distance
        sorted_choice = choice[order]
        first = torch.searchsorted(sorted_choice, sorted_choice, right=False)
        rank = torch.arange(order.numel()) - first
        accept = rank < (capacity - load)[sorted_choice]
        rows = order[accept]
        ids[todo[rows]] = choice[rows]
        load += torch.bincount(choice[rows], minlength=E)


class ClusterGater(nn.Module):
    """Assigns each example to one of ``num_experts`` experts from its trunk features.

    Methods:
        - ``"kmeans"``: scikit-learn ``KMeans`` (k-means++ seeding, ``n_init`` restarts) on
          L2-normalised features; an example goes to its nearest centroid.
        - ``"balanced"``: the k-means centroids refined by Lloyd steps whose assignment step is
          capacity-constrained (:func:`balanced_assignment`, at most
          ``ceil(balance * N / E)`` examples per expert), so that no expert starves. The training
          examples keep their balanced assignment; new examples go to the nearest centroid.
        - ``"tree"``: hierarchical (bisecting) k-means. The root splits the training rows in two
          with 2-means, and leaves are split breadth first (the most populated leaf of the
          shallowest level next) until there are ``E``; the tree is ``ceil(log2 E)`` deep. Each
          split is one hyperplane, the bisector of its two centroids, so routing an example costs
          one dot product per level: ``ceil(log2 E) * d`` multiply-adds instead of flat
          k-means' ``E * d``. This is the gater whose cost stays (nearly) flat as ``E`` grows.
        - ``"hash"``: a fixed random hash of the quantised features; the assignment ignores what
          the example looks like (the ablation baseline).

    :meth:`fit` returns the training assignment; :meth:`forward` assigns new examples (int64
    ``[B]``) in one batched distance computation. With ``fit_rows > 0``, scikit-learn's k-means
    runs on a random sample of at most that many training rows (the k-means++ seeding and Lloyd
    iterations are what cost); every training row is then assigned to its nearest centroid (or,
    for ``"balanced"``, by the capacity-constrained steps over all rows).
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        method: str = "kmeans",
        balance: float = 1.0,
        n_init: int = 2,
        seed: int = 0,
        fit_rows: int = 0,
    ) -> None:
        super().__init__()
        if method not in GATERS:
            raise ValueError(f"ClusterGater: method must be one of {GATERS}, got {method!r}")
        self.num_experts = num_experts
        self.method = method
        self.balance = balance
        self.n_init = n_init
        self.seed = seed
        self.fit_rows = fit_rows
        self.register_buffer("centroids", torch.zeros(num_experts, in_features))
        # tree: internal node n sends x right when <x, node_w[n]> > node_b[n]; node_child[n, side]
        # is the next internal node (>= 0) or a leaf, encoded -(expert + 1).
        nodes = max(num_experts - 1, 0) if method == "tree" else 0
        self.register_buffer("node_w", torch.zeros(nodes, in_features))
        self.register_buffer("node_b", torch.zeros(nodes))
        self.register_buffer("node_child", torch.full((nodes, 2), -1, dtype=torch.long))
        self.depth = (
            math.ceil(math.log2(num_experts)) if method == "tree" and num_experts > 1 else 0
        )
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer(
            "hash_coef", torch.randint(1, 2**31 - 1, (in_features,), generator=gen)
        )

    @staticmethod
    def _normalize(x: Tensor) -> Tensor:
        return F.normalize(x.float(), dim=1)

    def fit(self, features) -> Tensor:
        """Fits the gater on training features ``[N, d]`` (a tensor or a
        :class:`TileFeatureBank`); returns their expert ids ``[N]``."""
        E = self.num_experts
        N = features.shape[0]
        if self.method == "hash":
            return self.assign(features)
        if E == 1:
            total = sum(self._normalize(c).sum(0) for c in feature_chunks(features))
            self.centroids.copy_(total.unsqueeze(0) / max(N, 1))
            return torch.zeros(N, dtype=torch.long)
        from sklearn.cluster import KMeans

        rows = torch.arange(N)
        if 0 < self.fit_rows < N:
            gen = torch.Generator().manual_seed(self.seed)
            rows = torch.randperm(N, generator=gen)[: self.fit_rows]
        if self.method == "tree":
            self._fit_tree(self._normalize(features[rows]))
            return self.assign(features)
        km = KMeans(n_clusters=E, n_init=self.n_init, random_state=self.seed)
        km.fit(self._normalize(features[rows]).numpy())
        self.centroids.copy_(torch.from_numpy(km.cluster_centers_).float())
        if self.method == "kmeans":
            return self.assign(features)
        capacity = math.ceil(self.balance * N / E)
        ids = torch.zeros(N, dtype=torch.long)
        for _ in range(10):
            dist = torch.cat(
                [torch.cdist(self._normalize(c), self.centroids) for c in feature_chunks(features)]
            )
            ids = balanced_assignment(dist, capacity)
            sums = torch.zeros_like(self.centroids)
            start = 0
            for c in feature_chunks(features):
                sums.index_add_(0, ids[start : start + c.shape[0]], self._normalize(c))
                start += c.shape[0]
            counts = torch.bincount(ids, minlength=E).clamp(min=1).unsqueeze(1)
            new = sums / counts
            moved = (new - self.centroids).norm(dim=1).max()
            self.centroids.copy_(new)
            if moved < 1e-5:
                break
        return ids

    def _fit_tree(self, x: Tensor) -> None:
        """Builds the split tree on normalised rows ``x`` (see ``"tree"`` in the class doc)."""
        from sklearn.cluster import KMeans

        E = self.num_experts
        if x.shape[0] < E:
            raise ValueError(f"ClusterGater(tree): {x.shape[0]} rows cannot make {E} clusters")
        # leaves: (depth, rows, parent node, side); split the shallowest, then the largest
        leaves = [(0, torch.arange(x.shape[0]), -1, 0)]
        n_nodes = 0
        while len(leaves) < E:
            i = min(range(len(leaves)), key=lambda j: (leaves[j][0], -leaves[j][1].numel()))
            depth, rows, parent, side = leaves.pop(i)
            if rows.numel() < 2:
                raise ValueError("ClusterGater(tree): a leaf with fewer than 2 rows cannot split")
            km = KMeans(n_clusters=2, n_init=self.n_init, random_state=self.seed + n_nodes)
            lab = torch.from_numpy(km.fit_predict(x[rows].numpy())).long()
            c = torch.from_numpy(km.cluster_centers_).float()
            node = n_nodes
            n_nodes += 1
            self.node_w[node] = c[1] - c[0]
            self.node_b[node] = 0.5 * (c[1].square().sum() - c[0].square().sum())
            if parent >= 0:
                self.node_child[parent, side] = node
            # the hyperplane decides, so that training rows follow the path new rows will take
            right = x[rows] @ self.node_w[node] > self.node_b[node]
            if right.all() or not right.any():  # degenerate split: fall back to the labels
                right = lab == 1
            leaves.append((depth + 1, rows[~right], node, 0))
            leaves.append((depth + 1, rows[right], node, 1))
        leaves.sort(key=lambda leaf: (leaf[2], leaf[3]))
        for e, (_, rows, parent, side) in enumerate(leaves):
            self.node_child[parent, side] = -(e + 1)
            self.centroids[e] = x[rows].mean(0) if rows.numel() else 0.0

    def _route_tree(self, x: Tensor) -> Tensor:
        w, b = self.node_w.to(x.dtype), self.node_b.to(x.dtype)
        return ops.tree_route(x, w, b, self.node_child, self.depth).long()

    @torch.no_grad()
    def assign(self, features) -> Tensor:
        """:meth:`forward` over many rows (a tensor or a :class:`TileFeatureBank`), in blocks."""
        parts = [self(c) for c in feature_chunks(features)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    def forward(self, features: Tensor) -> Tensor:
        """Expert id of each example, int64 ``[B]``."""
        if self.method == "hash":
            # in blocks of rows: the int64 temporaries of a whole batch (8 bytes per feature)
            # would be large enough for the allocator to map and unmap them on every call
            parts = []
            for f in features.split(256):
                q = (f.float() * 1000).round().long()
                h = (q * self.hash_coef).sum(1)
                h = (h ^ (h >> 17)) * 0x2545F491
                parts.append(torch.remainder(h ^ (h >> 13), self.num_experts))
            if not parts:
                return torch.zeros(0, dtype=torch.long, device=features.device)
            return torch.cat(parts)
        x = self._normalize(features)
        if self.method == "tree":  # E = 1: a tree with no nodes, every row to expert 0
            return self._route_tree(x)
        return torch.cdist(x, self.centroids.to(x.dtype)).argmin(1)

    def macs_per_example(self) -> int:
        """Multiply-adds of the routing decision per example (the normalisation not counted)."""
        d = self.centroids.shape[1]
        if self.method == "hash":
            return 0
        if self.method == "tree":
            return self.depth * d
        return self.num_experts * d


# ----------------------------------------------------------------------------- the MoE


class HardMoE(nn.Module):
    """Hard mixture of experts: each example runs through exactly one expert.

    ``forward(x)`` takes images when ``trunk`` (a module with ``features``) is given, else trunk
    features ``[B, d]``; it returns label logits ``[B, L]``. The gater's ids become a
    :class:`moefast.Routing` (:func:`moefast.routing_from_ids`), the features are grouped by
    expert (:func:`moefast.permute`), every expert layer is one grouped GEMM, the rows go back in
    example order (:func:`moefast.unpermute`) and one shared ``decoder`` maps the experts' common
    embedding space to labels. With ``decoder=None`` the experts end in their own decoders (the
    per-expert-decoder ablation).
    """

    def __init__(
        self,
        gater: ClusterGater,
        experts: nn.Module,
        decoder: nn.Linear | None,
        trunk: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.gater = gater
        self.experts = experts
        self.decoder = decoder
        self.trunk = trunk
        self.num_experts = gater.num_experts

    def routing(self, features: Tensor) -> ops.Routing:
        return ops.routing_from_ids(self.gater(features), self.num_experts)

    def forward(self, x: Tensor) -> Tensor:
        features = self.trunk.features(x) if self.trunk is not None else x
        routing = self.routing(features)
        y = self.experts(ops.permute(features, routing), routing.offs)
        emb = ops.unpermute(y, routing)
        return self.decoder(emb) if self.decoder is not None else emb
