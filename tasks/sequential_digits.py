"""Sequential digits: the sequential-MNIST task on the 8 x 8 digits shipped with
scikit-learn (``sklearn.datasets.load_digits``; 1797 images of 10 classes, no download).
Needs the ``digits`` extra (scikit-learn).

Definition. Each 8 x 8 image is read one pixel per step in raster order: 64 steps, one
input channel, the intensity (0..16) divided by 16. The target is the digit at the last
step, scored by cross-entropy; the metric is the accuracy there. ``permute=true`` reads
the pixels in a fixed random order drawn from ``permutation_seed``.

Splits (``_images.py``): the first 1797 - ``holdout`` images (1437 with the default 360)
are the training split; the last ``holdout`` are both the validation and the test split
(the dataset has no separate test set).

Example, the first row of a "0" (8 of the 64 steps; the digit is scored at step 63)::

    input   0 0 0.31 0.81 0.56 0.06 0 0  ...
    target                                 0 (last step)

Baseline: the entropy of the training split's labels, -sum_c p_c ln p_c (within 0.1% of
ln 10: the classes are nearly balanced). A predictor that remembers nothing outputs the
class frequencies.

Solved: accuracy at the last step (``val_metric``) of at least ``solved_accuracy`` (0.9).

Measured with the default LSTM (hidden 128, Adam 1e-3, batch 64, clip 1), seed 0, CPU:
held-out accuracy 0.73 after 500 steps, 0.84 after 2000, first at least 0.9 at step 2600,
0.91 at 3000, while the training split reaches 0.996: the 1437 training images are few.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seqtest.errors import ConfigError
from seqtest.tasks._base import register_task
from seqtest.tasks._images import ImageData, ImageSequenceTask

_DIGITS: list[ImageData] = []


def load_digits() -> ImageData:
    """scikit-learn's 8 x 8 digits as uint8 pixels (0..16), cached per process."""
    if not _DIGITS:
        try:
            from sklearn.datasets import load_digits as sklearn_digits
        except ImportError as error:
            raise ConfigError(
                "task=sequential_digits needs scikit-learn: pip install 'seqtest[digits]' "
                "(or pip install scikit-learn)"
            ) from error
        digits = sklearn_digits()
        _DIGITS.append(
            ImageData(
                train_images=torch.from_numpy(digits.data.astype("uint8")),
                train_labels=torch.from_numpy(digits.target.astype("int64")),
                test_images=None,
                test_labels=None,
                max_value=16.0,
                num_classes=10,
            )
        )
    return _DIGITS[0]


@register_task("sequential_digits")
@dataclass
class SequentialDigitsTask(ImageSequenceTask):
    permute: bool = False
    permutation_seed: int = 0
    holdout: int = 360
    solved_accuracy: float = 0.9

    def load(self) -> ImageData:
        return load_digits()
