"""A before/after strip of toy-world BEV frames: the reference renderer (the renderer as first
written, ``tests/envs/reference_render.py``) above the package's renderer, and where they differ;
with ``--compiled``, the eager renderer's images of a compiled world's states above the images its
compiled step (``--compile-world``) returned.

    python -m benchmarks.render_strip [--out docs/img/bev_before_after.png]
    python -m benchmarks.render_strip --compiled [--out docs/img/bev_compiled.png]

Run from the repository root (the reference lives with the tests). The frames are worlds driven by
the expert's plan plus noise for a few steps, at difficulties 0, 0.5 and 1 (development seeds).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from tests.envs.reference_render import inputs_of_driven_worlds, reference_render_bev
from training.common.seeds import DEV_SEED_START
from training.envs.toy import ToyWaypointEnv
from training.envs.toy.config import ToyWorldConfig
from training.envs.toy.render import render_bev
from training.envs.toy.viz import bev_to_rgb

FRAMES = ((0.0, 0), (0.5, 3), (1.0, 5), (1.0, 9))  # (difficulty, world)
STEPS = 6


def reference_frames(cfg: ToyWorldConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's and the renderer's images of 16 worlds after ``STEPS`` noisy expert steps."""
    inputs = inputs_of_driven_worlds(cfg, seed, steps=STEPS, noise_m=0.5)[-1]
    return reference_render_bev(inputs, cfg), render_bev(inputs, cfg)


def compiled_frames(cfg: ToyWorldConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager renderer's and the compiled step's images of the same states: a compiled world
    (``--compile-world``) driven ``STEPS`` noisy expert steps, and its state rendered eagerly."""
    compiled, eager = ToyWaypointEnv(cfg, compile_step=True), ToyWaypointEnv(cfg)
    compiled.reset(seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        noise = torch.randn(cfg.num_envs, cfg.num_waypoints, 2, generator=generator)
        after = compiled.step(compiled.expert_waypoints() + 0.5 * noise).obs.bev
    st = compiled.state
    return eager._render(st.vehicle, st.scenarios, st.frenet, st.time_s).bev, after


def draw_strip(out: Path, *, compiled: bool = False) -> None:
    frames: Callable[[ToyWorldConfig, int], tuple[torch.Tensor, torch.Tensor]]
    frames = compiled_frames if compiled else reference_frames
    labels = ("eager", "compiled step") if compiled else ("before (reference)", "after (scanline fill)")
    fig, axes = plt.subplots(3, len(FRAMES), figsize=(2.2 * len(FRAMES), 7.0))
    for column, (difficulty, world) in enumerate(FRAMES):
        cfg = ToyWorldConfig(num_envs=16, difficulty=difficulty)
        before, after = (images[world] for images in frames(cfg, DEV_SEED_START + 1000 * column))
        difference = (after.int() - before.int()).abs()
        differing = int((difference > 0).any(dim=0).sum())
        axes[0, column].imshow(bev_to_rgb(before))
        axes[1, column].imshow(bev_to_rgb(after))
        axes[2, column].imshow(
            difference.amax(dim=0).numpy().astype(np.float32), cmap="magma", vmin=0, vmax=255
        )
        axes[0, column].set_title(f"difficulty {difficulty}", fontsize=9)
        axes[2, column].set_xlabel(f"{differing} of {difference[0].numel()} pixels differ", fontsize=8)
    for row, label in enumerate((*labels, "|difference|, 0-255")):
        axes[row, 0].set_ylabel(label, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="default: docs/img/bev_before_after.png")
    parser.add_argument(
        "--compiled", action="store_true", help="eager against compiled (docs/img/bev_compiled.png)"
    )
    args = parser.parse_args(argv)
    out = args.out or Path("docs/img/bev_compiled.png" if args.compiled else "docs/img/bev_before_after.png")
    draw_strip(out, compiled=args.compiled)
    print(out)


if __name__ == "__main__":
    main()
