"""A before/after strip of toy-world BEV frames: the reference renderer (the renderer as first
written, ``tests/envs/reference_render.py``) above the package's renderer, and where they differ;
with ``--compiled``, the package's renderer above the same renderer compiled as ``--compile-world``
compiles it.

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
from training.envs.toy.config import ToyWorldConfig
from training.envs.toy.render import RenderInputs, render_bev, render_layout
from training.envs.toy.viz import bev_to_rgb

FRAMES = ((0.0, 0), (0.5, 3), (1.0, 5), (1.0, 9))  # (difficulty, world)
STEPS = 6


Renderer = Callable[[RenderInputs, ToyWorldConfig], torch.Tensor]


def compiled_renderer() -> Renderer:
    """``render_bev`` compiled with its layout passed in, as the compiled world step runs it."""
    compiled = torch.compile(render_bev, fullgraph=True, dynamic=False)

    def render(inputs: RenderInputs, cfg: ToyWorldConfig) -> torch.Tensor:
        boxes = inputs.vehicle_boxes.shape[1], inputs.obstacle_boxes.shape[1]
        return compiled(inputs, cfg, render_layout(cfg, inputs.ego_s.device, *boxes))

    return render


def draw_strip(out: Path, *, compiled: bool = False) -> None:
    before_renderer: Renderer = render_bev if compiled else reference_render_bev
    after_renderer: Renderer = compiled_renderer() if compiled else render_bev
    labels = (
        ("eager", "compiled (--compile-world)")
        if compiled
        else ("before (reference)", "after (scanline fill)")
    )
    fig, axes = plt.subplots(3, len(FRAMES), figsize=(2.2 * len(FRAMES), 7.0))
    for column, (difficulty, world) in enumerate(FRAMES):
        cfg = ToyWorldConfig(num_envs=16, difficulty=difficulty)
        # the render inputs of 16 worlds after ``STEPS`` noisy expert steps
        inputs = inputs_of_driven_worlds(cfg, DEV_SEED_START + 1000 * column, steps=STEPS, noise_m=0.5)[-1]
        before = before_renderer(inputs, cfg)[world]
        after = after_renderer(inputs, cfg)[world]
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
