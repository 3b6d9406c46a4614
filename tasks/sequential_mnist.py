"""Sequential and permuted MNIST (Le et al. 2015).

Definition. Each 28 x 28 MNIST image is read one pixel per step, in raster order (row by
row, left to right): 784 steps, one input channel, the intensity scaled to [0, 1]. The
target is the digit, one of 10 classes, at the last step, scored by cross-entropy; the
metric is the accuracy there. Permuted MNIST (``permuted_mnist``, or ``permute=true``)
reads the pixels in one fixed order, a uniform random permutation drawn from
``permutation_seed``, the same for every image and every run with that seed: the
permutation spreads the strokes over the whole sequence, so dependencies span hundreds of
steps. (Files of another image size work too: R x C pixels give R*C steps.)

Data. The standard IDX files, read from ``data_dir``: train-images-idx3-ubyte,
train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each plain or
gzip-compressed (``.gz``), as distributed by the MNIST site and its mirrors. Nothing is
downloaded. Splits (``_images.py``): the last ``holdout`` (5000) training images are the
validation split; the t10k files the test split (``holdout=0`` validates on the test
split). ``sample`` draws training images; ``validation_batch`` the held-out ones.

Example, the first row of a "7" (28 steps of the 784)::

    input   0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0  ... 0
    target                                                               7 (last step)

Baseline: the entropy of the training split's labels, -sum_c p_c ln p_c, about 2.301 for
MNIST (ln 10 = 2.303 were the classes balanced). A predictor that remembers nothing
outputs the class frequencies.

Solved: accuracy at the last step (``val_metric``) of at least ``solved_accuracy``: 0.97
sequential, 0.90 permuted (LSTM results reported in the literature: about 98% and 88-92%,
e.g. Arjovsky et al. 2016, Cooijmans et al. 2017).
"""

from __future__ import annotations

from dataclasses import dataclass

from seqtest.tasks._base import register_task
from seqtest.tasks._images import ImageData, ImageSequenceTask, load_mnist


@register_task("sequential_mnist")
@dataclass
class SequentialMNISTTask(ImageSequenceTask):
    data_dir: str | None = None
    permute: bool = False
    permutation_seed: int = 0
    holdout: int = 5000
    solved_accuracy: float = 0.97

    def load(self) -> ImageData:
        return load_mnist(self.data_dir)


@register_task("permuted_mnist")
@dataclass
class PermutedMNISTTask(SequentialMNISTTask):
    """Permuted MNIST: `sequential_mnist` with the pixels in a fixed random order."""

    permute: bool = True
    solved_accuracy: float = 0.90
