"""Datamodules: Fashion-MNIST from the Debian package (IDX files) and any ImageFolder tree."""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from .errors import ConfigError, InputNotFoundError

__all__ = [
    "DEFAULT_FMNIST_DIR",
    "FMNIST_MEAN",
    "FMNIST_STD",
    "FashionMNISTDataModule",
    "ImageFolderDataModule",
    "read_idx",
]

#: Where ``apt-get install dataset-fashion-mnist`` puts the files; override with ``PQV_FMNIST_DIR``.
DEFAULT_FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_MEAN, FMNIST_STD, FMNIST_PAD = 0.2860, 0.3530, 2

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: str | Path) -> torch.Tensor:
    """Read an IDX file (optionally gzip-compressed) of unsigned bytes into a uint8 tensor."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise ValueError(f"{path}: IDX type 0x{data[2]:02x} is not supported (only unsigned byte, 0x08)")
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    expected = 4 + 4 * ndim + int(torch.tensor(dims).prod())
    if len(data) != expected:
        raise ValueError(f"{path}: {len(data)} bytes, expected {expected} for shape {dims}")
    return torch.frombuffer(bytearray(data[4 + 4 * ndim :]), dtype=torch.uint8).reshape(dims)


def fmnist_preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 32, 32): /255, normalize, pad 2 px with normalized black."""
    x = images.float().div_(255.0).sub_(FMNIST_MEAN).div_(FMNIST_STD).unsqueeze(1)
    return F.pad(x, (FMNIST_PAD,) * 4, value=-FMNIST_MEAN / FMNIST_STD)


class _ShiftFlip(Dataset):
    """Random translation of up to ``shift`` px (edge filled with black) and horizontal flips.

    In the main process (``num_workers=0``) one generator seeded with ``seed`` runs on across epochs.
    A DataLoader worker gets a pickled copy of that generator; every worker, and every epoch's new
    workers, would replay the same draws. So inside a worker the generator is reseeded from the
    worker's own seed (base seed from the loader's generator, new each epoch, plus the worker id):
    different per worker and per epoch, reproducible for a seeded loader.
    """

    def __init__(self, base: Dataset, shift: int = 2, seed: int = 0):
        self.base, self.shift = base, shift
        self.fill = -FMNIST_MEAN / FMNIST_STD
        self.gen = torch.Generator().manual_seed(seed)
        self._worker_seed: int | None = None

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        worker = torch.utils.data.get_worker_info()
        if worker is not None and worker.seed != self._worker_seed:
            self._worker_seed = worker.seed
            self.gen.manual_seed(worker.seed)
        x, y = self.base[i]
        s = self.shift
        dx, dy = torch.randint(-s, s + 1, (2,), generator=self.gen).tolist()
        padded = F.pad(x, (s, s, s, s), value=self.fill)
        h, w = x.shape[-2:]
        x = padded[..., s + dy : s + dy + h, s + dx : s + dx + w]
        if torch.rand((), generator=self.gen) < 0.5:
            x = x.flip(-1)
        return x, y


class FashionMNISTDataModule(pl.LightningDataModule):
    """Fashion-MNIST as 1x32x32 tensors, preprocessed like ``vit_tiny_fmnist.pt`` was trained.

    Args:
        data_dir: folder with the four ``*-ubyte.gz`` files; default ``$PQV_FMNIST_DIR`` or
            ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).
        batch_size, num_workers: DataLoader settings.
        val_size: images held out from the end of the training set for validation.
        train_subset / test_subset: use only the first N images (quick runs); None = all.
        augment: random shifts of up to 2 px and horizontal flips on the training set.
        shuffle: shuffle the training set every epoch.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 256,
        num_workers: int = 0,
        val_size: int = 5000,
        train_subset: int | None = None,
        test_subset: int | None = None,
        augment: bool = True,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.data_dir = Path(data_dir or os.environ.get("PQV_FMNIST_DIR", DEFAULT_FMNIST_DIR))
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1")
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_size, self.train_subset, self.test_subset = val_size, train_subset, test_subset
        self.augment, self.shuffle, self.seed = augment, shuffle, seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def check_files(self, splits: tuple[str, ...] = ("train", "test")) -> None:
        """Raise ``FileNotFoundError`` naming the folder and the missing files (reads nothing)."""
        missing = [f for split in splits for f in _FILES[split] if not (self.data_dir / f).is_file()]
        if missing:
            raise InputNotFoundError(
                f"Fashion-MNIST files {missing} not found in data_dir={str(self.data_dir)!r}; install the Debian "
                "package 'dataset-fashion-mnist' or pass data_dir= / set PQV_FMNIST_DIR"
            )

    def split_digest(self, split: str = "test") -> str:
        """sha256 of the whole ``"train"`` or ``"test"`` split as decoded (images, then labels, with their
        shapes), whatever ``train_subset`` / ``test_subset`` say: equal digests, equal data, however the
        files were compressed."""
        self.check_files((split,))
        digest = hashlib.sha256()
        for name in _FILES[split]:
            tensor = read_idx(self.data_dir / name)
            digest.update(repr(tuple(tensor.shape)).encode())
            digest.update(tensor.contiguous().numpy().tobytes())
        return digest.hexdigest()

    def _load(self, split: str) -> TensorDataset:
        self.check_files((split,))
        images = read_idx(self.data_dir / _FILES[split][0])
        labels = read_idx(self.data_dir / _FILES[split][1]).long()
        return TensorDataset(fmnist_preprocess(images), labels)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            full = self._load("train")
            n_train = len(full) - self.val_size
            train_idx = range(n_train if self.train_subset is None else min(self.train_subset, n_train))
            train: Dataset = Subset(full, list(train_idx))
            self.train_set = _ShiftFlip(train, seed=self.seed) if self.augment else train
            self.val_set = Subset(full, list(range(n_train, len(full))))
        if stage in (None, "test", "predict") and self.test_set is None:
            test = self._load("test")
            n = len(test) if self.test_subset is None else min(self.test_subset, len(test))
            self.test_set = Subset(test, list(range(n)))

    def dataset(self, name: str) -> Dataset:
        """The ``"train"``, ``"val"`` or ``"test"`` split (after :meth:`setup`)."""
        found = getattr(self, f"{name}_set")
        if found is None:
            raise RuntimeError(f"the {name} split is not loaded: call setup() first (the Trainer does)")
        return found

    def size(self, name: str) -> int:
        """How many samples the ``"train"``, ``"val"`` or ``"test"`` split holds (after :meth:`setup`)."""
        return len(self.dataset(name))  # type: ignore[arg-type]  # every split here is sized

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset("train"),
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
            drop_last=True,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset("val"), batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset("test"), batch_size=self.batch_size, num_workers=self.num_workers)


class ImageFolderDataModule(pl.LightningDataModule):
    """``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg`` (torchvision ImageFolder), resized
    and center-cropped to ``image_size``, normalized with ``mean``/``std`` (ImageNet by default)."""

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 2,
        mean: tuple[float, ...] = (0.485, 0.456, 0.406),
        std: tuple[float, ...] = (0.229, 0.224, 0.225),
    ) -> None:
        super().__init__()
        self.root, self.image_size = Path(root), image_size
        self.batch_size, self.num_workers, self.mean, self.std = batch_size, num_workers, mean, std

    def _folder(self, split: str, train: bool):
        from torchvision import datasets
        from torchvision import transforms as T

        path = self.root / split
        if not path.is_dir():
            raise InputNotFoundError(
                f"ImageFolder split {str(path)!r} does not exist (expected {self.root}/{{train,val}}/<class>/)"
            )
        aug = (
            [T.RandomResizedCrop(self.image_size), T.RandomHorizontalFlip()]
            if train
            else [T.Resize(int(self.image_size * 256 / 224)), T.CenterCrop(self.image_size)]
        )
        return datasets.ImageFolder(str(path), T.Compose([*aug, T.ToTensor(), T.Normalize(self.mean, self.std)]))

    def setup(self, stage: str | None = None) -> None:
        self.train_set = self._folder("train", True)
        self.val_set = self._folder("val", False)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, self.batch_size, shuffle=True, num_workers=self.num_workers, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
