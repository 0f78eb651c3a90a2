"""Benchmark: what happens to training at epoch θ, when eq. 11 switches γ·L_c2 on.

Eq. 11 of the paper adds the decoder alignment loss γ·L_c2 (τ = 0.001, γ = 0.1) from epoch
θ on (0-based here). This script trains the same detector (tiny random CLIP backbone,
feature cache, same seed, same images) in four settings and reports, per epoch, the mean
distillation loss (eq. 9), L_c2 (eq. 10, logged even before θ) and the mean global
gradient norm (before clipping):

* ``paper``: the paper's schedule, no stabiliser (the package default);
* ``clip``: ``grad_clip_norm`` = the largest per-step gradient norm of the ``paper`` run in
  epochs 1 .. θ-1, i.e. the largest norm of settled training without L_c2. Epoch 0 is left
  out: its first steps, from the initial weights, have norms orders of magnitude above
  the rest, and clipping above them would never act; so the ``clip`` run is also clipped
  in epoch 0 (the steps clipped before θ and from θ on are counted). ``--clip`` sets the
  value instead;
* ``ramp``: ``gamma_ramp_epochs = --ramp`` (γ grows linearly over that many epochs);
* ``clip+ramp``: both;
* with ``--control``, also ``clip@θ``: the ``paper`` run up to θ, continued with the same
  clip value from θ on (the config's ``grad_clip_norm`` set on a copy of the model after θ
  epochs). It tells what clipping the θ transition does apart from clipping epoch 0.

It also measures the gradient imbalance at θ directly: on the first batch of epoch θ
(weights after θ epochs of the ``paper`` run, train mode, the epoch's noise and dropout
seed, features rounded to float16 as in the cache), the L2 norm of the gradient on the
decoder's parameters (``model.decoder``) from γ·L_c2 alone and from L_distill alone, via
``torch.autograd.grad``; the same over all trainable parameters for context.

The data are the real images of ``--data`` (MVTec layout, every category trained into one
model), decoded once and held in memory; ``--max-images`` keeps that many, evenly spaced
over the sorted list (so every category keeps its share).

The figures in ``docs/benchmarks.md`` ("The θ transition") come from::

    OMP_NUM_THREADS=1 python benchmarks/theta_transition.py --control \\
        --json /tmp/theta_transition.json --plot docs/images/theta_transition.png
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from cncad import CNCDetector
from cncad.data import AnomalyFolder
from cncad.data.sampling import epoch_batches
from cncad.files import atomic_write
from cncad.training import Trainer, epoch_seed, model_input

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TERMS = ("distill", "align_decoder", "grad_norm")


class RecordingTrainer(Trainer):
    """A [`Trainer`][cncad.training.Trainer] that also keeps every step's gradient norm."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.step_norms: list[tuple[int, float]] = []

    def step(
        self, features: Any, epoch: int, batch_index: int = 0, **split: Any
    ) -> dict[str, float]:
        values = super().step(features, epoch, batch_index, **split)
        self.step_norms.append((epoch, values["grad_norm"]))
        return values


def load_images(root: Path, image_size: int, max_images: int) -> TensorDataset:
    """The normal training images of ``root``, decoded once, as a TensorDataset."""
    folder = AnomalyFolder(root, split="train", image_size=image_size)
    indices = list(range(len(folder)))
    if 0 < max_images < len(folder):
        indices = np.linspace(0, len(folder) - 1, max_images).round().astype(int).tolist()
    images = torch.stack([folder[i]["image"] for i in indices])
    return TensorDataset(images, torch.zeros(len(indices), dtype=torch.long))


def make_trainer(args: argparse.Namespace, **overrides: Any) -> RecordingTrainer:
    detector = CNCDetector(
        backbone="tiny",
        pretrained=None,
        image_size=args.image_size,
        device="cpu",
        theta=args.theta,
        batch_size=args.batch_size,
        epochs=args.epochs,
        seed=args.seed,
        **overrides,
    )
    # Trainer is what CNCDetector.fit runs; the subclass only records the step norms.
    return RecordingTrainer(detector.model, detector.device)


def fit(trainer: Trainer, data: TensorDataset, epochs: int) -> None:
    trainer.fit(data, epochs, progress=False)


@torch.no_grad()
def _first_batch_features(trainer: Trainer, data: TensorDataset, epoch: int) -> Any:
    """Encoder features of the first batch of ``epoch``, rounded like the float16 cache."""
    config = trainer.config
    order = epoch_batches(len(data), config.batch_size, config.seed, epoch)[0]
    images = model_input(data.tensors[0][order], config.image_size, trainer.device)
    features = trainer.model.encode(images)
    return type(features)(
        *(
            None if field is None else [t.to(torch.float16).float() for t in field]
            for field in features
        )
    )


def gradient_imbalance(trainer: Trainer, data: TensorDataset, epoch: int) -> dict[str, float]:
    """Gradient norms from γ·L_c2 and from L_distill alone on the first batch of ``epoch``."""
    model, config = trainer.model, trainer.config
    features = _first_batch_features(trainer, data, epoch)
    decoder = [p for p in model.decoder.parameters() if p.requires_grad]
    everything = model.trainable_parameters()
    model.train()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(epoch_seed(config.seed, epoch))  # the epoch's noise and dropout
            terms = model.loss(model.forward_features(features), epoch)
        weighted_c2 = config.gamma * terms.align_decoder
        result = {k: float(getattr(terms, k).detach()) for k in ("distill", "align_decoder")}
        for scope, params in (("decoder", decoder), ("all", everything)):
            for name, loss in (("gamma_c2", weighted_c2), ("distill", terms.distill)):
                grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
                norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None))
                result[f"{scope}_{name}"] = norm
            result[f"{scope}_ratio"] = result[f"{scope}_gamma_c2"] / result[f"{scope}_distill"]
    finally:
        model.eval()
    return result


def choose_clip(step_norms: list[tuple[int, float]], theta: int) -> float:
    """The largest per-step gradient norm in epochs 1 .. θ-1 (all of 0 .. θ-1 if θ < 2)."""
    first = 1 if theta >= 2 else 0
    norms = [norm for epoch, norm in step_norms if first <= epoch < theta]
    if not norms:
        raise ValueError("no step before θ to choose the clip value from; pass --clip")
    return max(norms)


def format_table(histories: dict[str, list[dict[str, float]]], first: int = 0) -> str:
    """Markdown table: per epoch, distill / L_c2 / grad norm of each setting."""
    names = list(histories)
    head = "| epoch | " + " | ".join(f"{n} distill | {n} L_c2 | {n} grad" for n in names) + " |"
    lines = [head, "|---:|" + "---:|" * (3 * len(names))]
    for epoch in range(first, len(histories[names[0]])):
        cells = []
        for name in names:
            row = histories[name][epoch]
            cells += [f"{row['distill']:.3f}", f"{row['align_decoder']:.3g}"]
            cells.append(f"{row['grad_norm']:.3g}")
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_distill(histories: dict[str, list[dict[str, float]]], first: int, theta: int) -> str:
    """Markdown table of the mean distillation loss per epoch, from epoch ``first``."""
    names = list(histories)
    lines = ["| epoch | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for epoch in range(max(first, 0), len(histories[names[0]])):
        label = f"{epoch} (θ)" if epoch == theta else str(epoch)
        cells = " | ".join(f"{histories[n][epoch]['distill']:.3f}" for n in names)
        lines.append(f"| {label} | {cells} |")
    return "\n".join(lines)


def plot(histories: dict[str, list[dict[str, float]]], theta: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3), dpi=90)
    styles = {"paper": "-o", "clip": "--s", "ramp": "-^", "clip+ramp": ":d", "clip@θ": "-.x"}
    for name, history in histories.items():
        epochs = [int(row["epoch"]) for row in history]
        style = styles.get(name, "-")
        axes[0].plot(epochs, [r["distill"] for r in history], style, ms=3, label=name)
        axes[1].plot(epochs, [r["grad_norm"] for r in history], style, ms=3, label=name)
    titles = ("L_distill (eq. 9), epoch mean", "gradient norm before clipping, epoch mean")
    for ax, title in zip(axes, titles, strict=True):
        ax.axvline(theta, color="grey", lw=1, ls="--")
        ax.set_xlabel("epoch (0-based)")
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].text(theta, axes[0].get_ylim()[1], " θ", va="top", fontsize=8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MVTec-layout root")
    parser.add_argument("--max-images", type=int, default=0, help="0: all training images")
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--theta", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ramp", type=int, default=5, help="gamma_ramp_epochs of 'ramp'")
    parser.add_argument("--clip", type=float, default=None, help="default: see the docstring")
    parser.add_argument("--control", action="store_true", help="also the 'clip@θ' run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--plot", type=Path, default=None, help="PNG: distill loss, grad norm")
    args = parser.parse_args()
    if not 0 < args.theta < args.epochs:
        parser.error("need 0 < --theta < --epochs")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    data = load_images(args.data, args.image_size, args.max_images)
    print(
        f"data {args.data}: {len(data)} training images, {args.image_size} px, "
        f"batch {args.batch_size}, epochs {args.epochs}, θ {args.theta}, seed {args.seed}, "
        f"torch threads {torch.get_num_threads()}, {platform.machine()}; "
        f"loaded in {time.perf_counter() - started:.0f} s",
        flush=True,
    )

    histories: dict[str, list[dict[str, float]]] = {}
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    paper = make_trainer(args)
    fit(paper, data, args.theta)  # the run continues exactly (see cncad.training)
    imbalance = gradient_imbalance(paper, data, args.theta)
    clip = args.clip if args.clip is not None else choose_clip(paper.step_norms, args.theta)
    control = None
    if args.control:
        control = copy.deepcopy(paper)
        control.model.config = control.model.config.replace(grad_clip_norm=clip)
    fit(paper, data, args.epochs - args.theta)
    histories["paper"], seconds["paper"] = paper.state.history, time.perf_counter() - t0
    before = [n for e, n in paper.step_norms if e < args.theta]
    after = [n for e, n in paper.step_norms if e >= args.theta]
    print(
        f"paper run {seconds['paper']:.0f} s; step grad norms before θ: median "
        f"{np.median(before):.3g}, max {max(before):.3g}; from θ on: median "
        f"{np.median(after):.3g}, max {max(after):.3g}; clip value {clip:.4g}"
        + (" (--clip)" if args.clip is not None else " (max step norm, epochs 1..θ-1)"),
        flush=True,
    )

    settings = {
        "clip": {"grad_clip_norm": clip},
        "ramp": {"gamma_ramp_epochs": args.ramp},
        "clip+ramp": {"grad_clip_norm": clip, "gamma_ramp_epochs": args.ramp},
    }
    clipped_steps: dict[str, list[int]] = {"paper": [0, 0]}
    for name, overrides in settings.items():
        t0 = time.perf_counter()
        trainer = make_trainer(args, **overrides)
        fit(trainer, data, args.epochs)
        histories[name], seconds[name] = trainer.state.history, time.perf_counter() - t0
        limit = overrides.get("grad_clip_norm")
        clipped = [e < args.theta for e, n in trainer.step_norms if limit and n > limit]
        clipped_steps[name] = [sum(clipped), len(clipped) - sum(clipped)]
        print(f"{name} run {seconds[name]:.0f} s", flush=True)
    if control is not None:
        t0 = time.perf_counter()
        fit(control, data, args.epochs - args.theta)
        histories["clip@θ"] = control.state.history
        seconds["clip@θ"] = time.perf_counter() - t0  # epochs θ.. only; it shares the rest
        clipped = [e for e, n in control.step_norms if e >= args.theta and n > clip]
        clipped_steps["clip@θ"] = [0, len(clipped)]
        print(f"clip@θ run {time.perf_counter() - t0:.0f} s (from θ)", flush=True)

    print("\nPer epoch (means over the epoch's steps; grad: global norm before clipping):\n")
    print(format_table(histories))
    print("\nL_distill from θ-2 on:\n")
    print(format_distill(histories, args.theta - 2, args.theta))
    steps = len(paper.step_norms) // args.epochs
    print(f"\nsteps clipped [before θ, from θ on] (of {steps} per epoch): {clipped_steps}")
    print(
        f"\nGradient at θ (first batch of epoch {args.theta}, weights after {args.theta} "
        f"epochs of 'paper'; L_distill {imbalance['distill']:.4f}, L_c2 "
        f"{imbalance['align_decoder']:.4g}):"
    )
    for scope in ("decoder", "all"):
        print(
            f"  {scope:<8} |grad γ·L_c2| {imbalance[f'{scope}_gamma_c2']:.4g}   "
            f"|grad L_distill| {imbalance[f'{scope}_distill']:.4g}   "
            f"ratio {imbalance[f'{scope}_ratio']:.3g}"
        )
    wall = time.perf_counter() - started
    print(f"\nwall time {wall:.0f} s ({wall / 60:.1f} min)")

    if args.plot is not None:
        plot(histories, args.theta, args.plot)
        print(f"plot: {args.plot} ({args.plot.stat().st_size / 1024:.0f} KiB)")
    if args.json is not None:
        payload = {
            "args": vars(args),
            "images": len(data),
            "clip": clip,
            "clipped_steps": clipped_steps,
            "imbalance": imbalance,
            "histories": histories,
            "seconds": seconds,
            "step_norms_paper": paper.step_norms,
            "wall_seconds": wall,
        }
        with atomic_write(args.json, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=1, default=str)


if __name__ == "__main__":
    main()
