"""Fixed train/held-out splits of scikit-learn's bundled datasets.

The builder trains on the train part; tests score the exported models on the held-out
part, so both must come from here to stay disjoint.
"""

from typing import NamedTuple

import numpy as np
import numpy.typing as npt
from sklearn.datasets import load_digits, load_iris
from sklearn.model_selection import train_test_split

_SPLIT_SEED = 0


class Split(NamedTuple):
    """Features and labels, divided into a training and a held-out part."""

    x_train: npt.NDArray[np.float32]
    x_test: npt.NDArray[np.float32]
    y_train: npt.NDArray[np.int64]
    y_test: npt.NDArray[np.int64]


def _split(x: npt.NDArray[np.float64], y: npt.NDArray[np.int64], test_size: float) -> Split:
    # FP32 is what clients send to Triton, so train on exactly those values.
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float32),
        y.astype(np.int64),
        test_size=test_size,
        random_state=_SPLIT_SEED,
        stratify=y,
    )
    return Split(x_train, x_test, y_train, y_test)


def digits_split() -> Split:
    """8x8 handwritten digits as 64 raw pixel intensities (0-16), labels 0-9."""
    x, y = load_digits(return_X_y=True)
    return _split(x, y, test_size=0.25)


def iris_split() -> Split:
    """Four iris flower measurements in cm, labels 0-2."""
    x, y = load_iris(return_X_y=True)
    return _split(x, y, test_size=0.3)
