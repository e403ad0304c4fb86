#!/usr/bin/env python3
"""Writes scikit-learn's handwritten digits (UCI ML optical recognition, 1,797 8x8 images,
pixel values 0-16, BSD-licensed with scikit-learn) to pipelines/data/digits.csv: one image per
line, the label first, then the 64 pixels row by row. Federated training reads it.

    .venv/bin/python pipelines/data/export_digits.py
"""
import os

from sklearn.datasets import load_digits


def main():
    digits = load_digits()
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits.csv")
    with open(path, "w") as f:
        f.write("# label,pixel_0..pixel_63 (8x8, values 0-16); scikit-learn load_digits\n")
        for label, pixels in zip(digits.target, digits.data.astype(int)):
            f.write(f"{label}," + ",".join(str(p) for p in pixels) + "\n")
    print(f"wrote {len(digits.target)} images to {path}")


if __name__ == "__main__":
    main()
