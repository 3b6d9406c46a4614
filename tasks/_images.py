"""Image classification read pixel by pixel: the shared machinery of `sequential_mnist.py`
and `sequential_digits.py` (not a task itself: files starting with `_` are not scanned by
the registry).

An image of R x C pixels becomes a sequence of R*C steps, one pixel per step in raster order
(row by row, left to right), or in a fixed permuted order. The input is the pixel
intensity scaled to [0, 1]; the target is the image's class at the last step, scored by
cross-entropy; the metric is the accuracy there.

Splits. Every dataset has a training file and, where it ships one, a test file.
``training`` is the training file less its last ``holdout`` examples; ``validation`` is
those held-out examples (or, with ``holdout=0``, the test file); ``test`` is the test file
(or, for a dataset without one, the validation split). ``sample`` draws training examples
uniformly with replacement; ``validation_batch`` draws from the validation split without
replacement (the fixed validation set the training loop evaluates on); ``test_batch``
returns the test split in order.
"""

from __future__ import annotations

import gzip
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from seqtest.errors import ConfigError, require
from seqtest.tasks._base import Batch
from seqtest.tasks._common import AccuracyTask

SPLITS = ("training", "validation", "test")


@dataclass
class ImageData:
    """A dataset held on the CPU: uint8 pixels [N, R*C], int64 labels [N]."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor | None
    test_labels: torch.Tensor | None
    max_value: float  # the intensity that maps to 1.0
    num_classes: int


# ------------------------------------------------------------------------------- IDX files

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), plain or gzip-compressed (by a `.gz` suffix)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as file:
        data = file.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ConfigError(f"{path} is not an IDX file (bad magic number {data[:4].hex()})")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise ConfigError(
            f"{path} is truncated or corrupt: {len(data)} bytes, its header announces {expected}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzip-compressed when the name ends in `.gz`)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    data = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.tobytes()
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as file:
        file.write(data)


MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

_MNIST_CACHE: dict[str, ImageData] = {}


def load_mnist(data_dir: str | Path | None) -> ImageData:
    """The four standard MNIST IDX files from `data_dir` (each plain or `.gz`), cached per
    process. A missing folder or file is a ConfigError that names what is expected."""
    expected = ", ".join(MNIST_FILES.values())
    if data_dir is None or str(data_dir) == "":
        raise ConfigError(
            "task.data_dir is required: the folder holding the MNIST IDX files "
            f"{expected} (each may also end in .gz): pass task.data_dir=/path/to/mnist or set "
            "SEQTEST_MNIST_DIR"
        )
    folder = Path(data_dir).expanduser().resolve()
    key = str(folder)
    if key in _MNIST_CACHE:
        return _MNIST_CACHE[key]
    if not folder.is_dir():
        raise ConfigError(
            f"task.data_dir={str(data_dir)!r} is invalid: no such folder (expected a folder "
            f"holding the MNIST IDX files {expected}, each may also end in .gz)"
        )
    paths, missing = {}, []
    for role, name in MNIST_FILES.items():
        found = [folder / name, folder / f"{name}.gz"]
        found = [p for p in found if p.is_file()]
        if found:
            paths[role] = found[0]
        else:
            missing.append(name)
    if missing:
        raise ConfigError(
            f"task.data_dir={str(data_dir)!r} is invalid: expected a folder holding the MNIST "
            f"IDX files {expected} (each may also end in .gz); missing: {', '.join(missing)}"
        )
    arrays = {role: read_idx(path) for role, path in paths.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ConfigError(
                f"{paths[f'{split}_images']} and {paths[f'{split}_labels']} do not match: "
                f"images {images.shape}, labels {labels.shape} (expected [N, rows, cols] and [N])"
            )
        if labels.size and labels.max() > 9:
            raise ConfigError(f"{paths[f'{split}_labels']} holds labels above 9: not MNIST digits")
    data = ImageData(
        train_images=torch.from_numpy(
            arrays["train_images"].reshape(len(arrays["train_images"]), -1).copy()
        ),
        train_labels=torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        test_images=torch.from_numpy(
            arrays["test_images"].reshape(len(arrays["test_images"]), -1).copy()
        ),
        test_labels=torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        max_value=255.0,
        num_classes=10,
    )
    _MNIST_CACHE[key] = data
    return data


# ------------------------------------------------------------------------------- the task


def permutation(num_pixels: int, seed: int) -> torch.Tensor:
    """The fixed pixel order of a permuted task: a uniform permutation drawn from `seed`."""
    return torch.randperm(num_pixels, generator=torch.Generator().manual_seed(seed))


class ImageSequenceTask(AccuracyTask):
    """Base of the pixel-by-pixel tasks. A subclass is a dataclass with the fields
    `permute`, `permutation_seed`, `holdout` and `solved_accuracy`, and implements `load()`."""

    loss_kind = "cross_entropy"
    metric_name = "accuracy"
    scored_steps = slice(-1, None)  # the last step alone
    baseline_formula = "H(labels) = -sum_c p_c ln p_c over the training split (about ln 10)"
    input_size = 1

    permute: bool
    permutation_seed: int
    holdout: int
    solved_accuracy: float

    def load(self) -> ImageData:
        raise NotImplementedError

    def __post_init__(self) -> None:
        require(isinstance(self.permute, bool), "task.permute", self.permute, "true or false")
        require(
            isinstance(self.permutation_seed, int) and not isinstance(self.permutation_seed, bool),
            "task.permutation_seed",
            self.permutation_seed,
            "an integer",
        )
        require(
            0 < self.solved_accuracy <= 1,
            "task.solved_accuracy",
            self.solved_accuracy,
            "a number in (0, 1]",
        )
        data = self.load()
        n = len(data.train_labels)
        least = 0 if data.test_images is not None else 1
        require(
            isinstance(self.holdout, int) and least <= self.holdout < n,
            "task.holdout",
            self.holdout,
            f"an integer in [{least}, {n}) (held-out training examples)",
        )
        self._data = data
        self._order = permutation(self.seq_len, self.permutation_seed) if self.permute else None
        self._on_device: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self.output_size = data.num_classes

    @property
    def seq_len(self) -> int:
        return self._data.train_images.shape[1]

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """CPU (pixels uint8 [N, R*C], labels [N]) of the split `name` (see module docstring)."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {name!r}")
        data, n = self._data, len(self._data.train_labels)
        has_test = data.test_images is not None
        if name == "training":
            return data.train_images[: n - self.holdout], data.train_labels[: n - self.holdout]
        if name == "test" and has_test:
            return data.test_images, data.test_labels
        if self.holdout > 0:  # validation, or test for a dataset without a test file
            return data.train_images[n - self.holdout :], data.train_labels[n - self.holdout :]
        return data.test_images, data.test_labels  # validation with holdout=0

    def _split_on(self, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (name, torch.device(device))
        if key not in self._on_device:
            images, labels = self.split(name)
            self._on_device[key] = (images.to(device), labels.to(device))
        return self._on_device[key]

    def _batch(self, images: torch.Tensor, labels: torch.Tensor) -> Batch:
        batch_size, T, device = len(labels), self.seq_len, images.device
        x = images.float() / self._data.max_value
        if self._order is not None:
            x = x[:, self._order.to(device)]
        y = torch.zeros(batch_size, T, dtype=torch.long, device=device)
        y[:, -1] = labels
        return Batch(x.unsqueeze(-1), y, self.scored_steps_mask(batch_size, device))

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """`batch_size` training examples drawn uniformly with replacement."""
        images, labels = self._split_on("training", generator.device)
        index = torch.randint(
            0, len(labels), (batch_size,), generator=generator, device=generator.device
        )
        return self._batch(images[index], labels[index])

    def validation_batch(self, size: int, generator: torch.Generator) -> Batch:
        """min(size, split size) examples of the validation split, drawn without replacement
        in an order fixed by `generator`: the fixed validation set."""
        images, labels = self._split_on("validation", generator.device)
        index = torch.randperm(len(labels), generator=generator, device=generator.device)[:size]
        return self._batch(images[index], labels[index])

    def test_batch(self, device: torch.device | str = "cpu") -> Batch:
        """The whole test split, in order."""
        images, labels = self._split_on("test", torch.device(device))
        return self._batch(images, labels)

    @property
    def baseline_loss(self) -> float:
        labels = self.split("training")[1]
        p = torch.bincount(labels, minlength=self._data.num_classes).double() / len(labels)
        p = p[p > 0]
        return float(-(p * p.log()).sum())

    def informative_positions(self, x: torch.Tensor) -> torch.Tensor:
        """The pixels that are not background (intensity above zero)."""
        return x[..., 0] > 0
