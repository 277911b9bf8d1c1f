"""A synthetic, realistic 30-feature tabular dataset: one CSV per site, nothing downloaded.

Usage::

    python -m fedseal_example_tabular.data site-a.csv --rows 600 --seed 1
    fl-client data prepare site-a.csv data/ --label diagnosis

The columns follow the layout of the Wisconsin diagnostic breast-cancer data (Street, Wolberg,
Mangasarian 1993): ten measurements of cell nuclei (radius, texture, perimeter, area,
smoothness, compactness, concavity, concave points, symmetry, fractal dimension), each as a
mean, a standard error and a "worst" value, in their natural units, so the scales differ by
four orders of magnitude (area in the hundreds, fractal dimension near 0.06). The label
``diagnosis`` is 1 (malignant) or 0 (benign). The values are *generated*: a latent severity and
a latent size drive correlated measurements with noise, so the classes overlap (a good model
scores about 95% accuracy, not 100%). No patient's data is involved.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = ["COLUMNS", "LABEL", "MEASUREMENTS", "synthetic_rows", "write_csv"]

MEASUREMENTS = (
    "radius", "texture", "perimeter", "area", "smoothness",
    "compactness", "concavity", "concave_points", "symmetry", "fractal_dimension",
)  # fmt: skip
COLUMNS = tuple(f"{m}_{kind}" for kind in ("mean", "se", "worst") for m in MEASUREMENTS)
LABEL = "diagnosis"


def synthetic_rows(
    rows: int, *, seed: int, prevalence: float = 0.37
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """``rows`` generated patients: features ``(rows, 30)`` in :data:`COLUMNS` order, labels.

    Args:
        rows: Number of rows.
        seed: Seed of the generator (one per site gives each site its own patients).
        prevalence: Expected share of malignant rows.
    """
    if rows < 1 or not 0.0 < prevalence < 1.0:
        raise ValueError("rows must be positive and prevalence in (0, 1)")
    rng = np.random.default_rng(seed)
    y = (rng.random(rows) < prevalence).astype(np.int64)
    severity = rng.normal(0.0, 1.0, rows) + 2.8 * y  # drives shape irregularity
    size = rng.normal(0.0, 1.0, rows) + 1.3 * y + 0.3 * severity  # drives radius, area

    def noise(scale: float = 1.0) -> npt.NDArray[np.float64]:
        return rng.normal(0.0, scale, rows)

    radius = np.clip(12.0 + 2.4 * size + noise(0.8), 6.0, None)
    texture = np.clip(18.5 + 1.6 * severity + noise(3.5), 9.0, None)
    perimeter = 2 * np.pi * radius * (1.0 + 0.04 * severity + noise(0.02))
    area = np.pi * radius**2 * (1.0 + noise(0.05))
    smoothness = np.clip(0.094 + 0.006 * severity + noise(0.012), 0.05, None)
    compactness = np.clip(0.085 + 0.03 * severity + noise(0.03), 0.02, None)
    concavity = np.clip(0.06 + 0.05 * severity + noise(0.04), 0.0, None)
    concave_points = np.clip(0.035 + 0.025 * severity + noise(0.012), 0.0, None)
    symmetry = np.clip(0.178 + 0.01 * severity + noise(0.025), 0.1, None)
    fractal = np.clip(0.062 + noise(0.007), 0.045, None)
    means = np.stack(
        [
            radius,
            texture,
            perimeter,
            area,
            smoothness,
            compactness,
            concavity,
            concave_points,
            symmetry,
            fractal,
        ],
        axis=1,
    )
    # Standard errors: about 5-10% of the mean, larger for irregular nuclei.
    se = means * np.clip(
        0.07 + 0.012 * severity[:, None] + rng.normal(0, 0.02, means.shape), 0.01, None
    )
    # Worst values: the mean of the three largest nuclei, above the mean, more so when severe.
    worst = means * np.clip(
        1.2 + 0.07 * severity[:, None] + rng.normal(0, 0.05, means.shape), 1.0, None
    )
    return np.concatenate([means, se, worst], axis=1), y


def write_csv(path: Path, rows: int, *, seed: int, prevalence: float = 0.37) -> Path:
    """Write :func:`synthetic_rows` as a CSV (header: :data:`COLUMNS`, then ``diagnosis``)."""
    x, y = synthetic_rows(rows, seed=seed, prevalence=prevalence)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow([*COLUMNS, LABEL])
        for features, label in zip(x, y, strict=True):
            out.writerow([*(f"{v:.6g}" for v in features), int(label)])
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a synthetic 30-feature tabular CSV.")
    parser.add_argument("out", type=Path, help="CSV file to write")
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0, help="one seed per site")
    parser.add_argument("--prevalence", type=float, default=0.37, help="share of label 1")
    args = parser.parse_args(argv)
    write_csv(args.out, args.rows, seed=args.seed, prevalence=args.prevalence)
    print(f"wrote {args.rows} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
