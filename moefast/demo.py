"""Demo: train a small mixture-of-experts classifier on scikit-learn's handwritten digits.

    python -m moefast.demo [--epochs 40] [--experts 8] [--top-k 2] [--router softmax_topk]

The data ships inside scikit-learn (1,797 8x8 images, 10 classes), so nothing is downloaded. The
model is a residual MoE block between an input projection and a linear classifier; it trains with
AdamW on 80% of the images and reports accuracy on the held-out 20%, the experts' share of the
held-out tokens, and a dense MLP of the same per-token cost trained the same way, for comparison.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from . import ops
from .nn import MoE


class MoEClassifier(nn.Module):
    def __init__(self, n_in: int, n_classes: int, d_model: int, block: nn.Module) -> None:
        super().__init__()
        self.proj = nn.Linear(n_in, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.block = block
        self.head = nn.Linear(d_model, n_classes)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.proj(x))
        h = h + self.block(self.norm(h))
        return self.head(h)


def load_digits_split(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        data.data, data.target, test_size=0.2, random_state=seed, stratify=data.target
    )
    x_tr = torch.tensor(x_tr, dtype=torch.float32) / 16.0
    x_te = torch.tensor(x_te, dtype=torch.float32) / 16.0
    return x_tr, torch.tensor(y_tr), x_te, torch.tensor(y_te)


def train(model, x_tr, y_tr, epochs, batch_size, lr, aux_coef, seed, desc):
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    moe = model.block if isinstance(model.block, MoE) else None
    bar = tqdm(range(epochs), desc=desc, unit="epoch")
    for _ in bar:
        model.train()
        perm = torch.randperm(x_tr.shape[0], generator=gen)
        total = 0.0
        for i in range(0, x_tr.shape[0], batch_size):
            idx = perm[i : i + batch_size]
            loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
            if moe is not None:
                loss = loss + aux_coef * moe.aux_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * idx.numel()  # host-ok: CPU training loop
        sched.step()
        bar.set_postfix(loss=f"{total / x_tr.shape[0]:.4f}")


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return (model(x).argmax(dim=1) == y).float().mean().item()  # host-ok: evaluation


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--router", default="softmax_topk", choices=ops.ROUTER_MODES)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--d-hidden", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--aux-coef", type=float, default=1e-2, help="weight of the balance loss")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    k = args.experts if args.router == "dense" else (1 if args.router == "hard" else args.top_k)

    torch.manual_seed(args.seed)
    x_tr, y_tr, x_te, y_te = load_digits_split(args.seed)
    print(
        f"digits: {x_tr.shape[0]} training and {x_te.shape[0]} held-out images, "
        f"{x_tr.shape[1]} features, 10 classes"
    )
    moe = MoE(args.d_model, args.d_hidden, args.experts, k=k, router=args.router, activation="gelu")
    model = MoEClassifier(x_tr.shape[1], 10, args.d_model, moe)
    t0 = time.perf_counter()
    train(
        model,
        x_tr,
        y_tr,
        args.epochs,
        args.batch_size,
        args.lr,
        args.aux_coef,
        args.seed,
        f"MoE ({args.experts} experts, top-{k}, {args.router})",
    )
    moe_time = time.perf_counter() - t0
    moe_acc = accuracy(model, x_te, y_te)
    counts = moe.last_routing.counts.float()
    load = (counts / counts.sum()).tolist()  # host-ok: printed report

    # A dense MLP with the same per-token cost: k experts' worth of hidden units.
    torch.manual_seed(args.seed)
    dense = nn.Sequential(
        nn.Linear(args.d_model, k * args.d_hidden),
        nn.GELU(),
        nn.Linear(k * args.d_hidden, args.d_model),
    )
    baseline = MoEClassifier(x_tr.shape[1], 10, args.d_model, dense)
    train(
        baseline,
        x_tr,
        y_tr,
        args.epochs,
        args.batch_size,
        args.lr,
        0.0,
        args.seed,
        f"dense MLP (hidden {k * args.d_hidden})",
    )
    dense_acc = accuracy(baseline, x_te, y_te)

    print(f"MoE held-out accuracy:       {moe_acc:.4f}  (trained in {moe_time:.1f} s)")
    print(f"dense MLP held-out accuracy: {dense_acc:.4f}")
    print("share of held-out token slots per expert: " + " ".join(f"{v:.2f}" for v in load))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
