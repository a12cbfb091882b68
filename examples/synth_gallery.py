"""Montage of synthetic Sezary-like cells: both classes at several background-signal strengths.

Each row is one class at one ``signal`` (the probability that a cell's surroundings carry
the class-specific cue); each tile is a 64 x 64 crop centred on a cell, as the pipeline's
crops stage cuts it. Cells whose cue was planted are framed in orange. The last column
shows a whole 256 x 256 field of view of one patient.

Run::

    python examples/synth_gallery.py [--out examples/synth_gallery.png] [--mode rgb|gray]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cellbg.synth import CLASSES, random_stain, synth_field  # noqa: E402

CROP = 64
SIGNALS = (0.0, 0.5, 1.0)
TILES = 6


def crop(image: np.ndarray, r: float, c: float, size: int = CROP) -> np.ndarray:
    """A size x size crop centred at (r, c), padded with white where it leaves the field."""
    h, w = image.shape[:2]
    r0, c0 = int(round(r)) - size // 2, int(round(c)) - size // 2
    pad = ((size, size), (size, size)) + ((0, 0),) * (image.ndim - 2)
    padded = np.pad(image, pad, constant_values=255 if image.ndim == 3 else 0)
    return padded[r0 + size : r0 + 2 * size, c0 + size : c0 + 2 * size]


def main(out: Path, mode: str = "rgb", seed: int = 0) -> Path:
    stain = random_stain(seed)
    rows = [(s, cls) for s in SIGNALS for cls in CLASSES]
    fig, axes = plt.subplots(
        len(rows),
        TILES + 1,
        figsize=(1.25 * (TILES + 1) + 1.3, 1.3 * len(rows)),
        gridspec_kw={"width_ratios": [1] * TILES + [1.6]},
    )
    for i, (signal, cls) in enumerate(rows):
        fov = synth_field(cls, n_cells=TILES, cue_probability=signal, mode=mode, stain=stain, seed=[seed, i])
        cmap = None if mode == "rgb" else "gray"
        for j, cell in enumerate(fov.cells.itertuples()):
            ax = axes[i, j]
            ax.imshow(crop(fov.image, cell.centre_r, cell.centre_c), cmap=cmap, vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_color("tab:orange" if cell.cue else "0.8")
                spine.set_linewidth(2.5 if cell.cue else 0.8)
        axes[i, 0].set_ylabel(f"{cls}\nsignal {signal:g}", fontsize=9)
        ax = axes[i, TILES]
        ax.imshow(fov.image, cmap=cmap, vmin=0, vmax=255)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, TILES].set_title("field of view", fontsize=9)
    fig.suptitle("cellbg synth: healthy lymphocytes vs Sezary cells (orange frame: cue planted)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=95)
    plt.close(fig)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("synth_gallery.png"))
    parser.add_argument("--mode", choices=["rgb", "gray"], default="rgb")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = main(args.out, mode=args.mode, seed=args.seed)
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")
