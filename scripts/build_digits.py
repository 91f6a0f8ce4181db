"""Rebuild gpunn/data/digits.npz from scikit-learn's copy of the UCI optical digits (8×8) data.

    pip install scikit-learn && python scripts/build_digits.py

gpunn itself never imports scikit-learn; this script is only for regenerating the embedded file.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import pathlib

import numpy

DST = pathlib.Path(__file__).resolve().parents[1] / "gpunn" / "data" / "digits.npz"


def main() -> None:
    import sklearn.datasets  # imported after --help
    src = pathlib.Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"
    with gzip.open(src, "rt") as fh:
        raw = numpy.loadtxt(fh, delimiter=",")
    images = raw[:, :64].astype(numpy.uint8)   # pixel counts 0..16
    labels = raw[:, 64].astype(numpy.uint8)
    assert images.shape == (1797, 64) and images.max() == 16 and set(labels) == set(range(10))
    numpy.savez_compressed(DST, images=images, labels=labels)
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    print(f"wrote {DST} ({DST.stat().st_size} bytes); content sha256 {digest}")



if __name__ == "__main__":      # --help: the docstring; no other argument
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
