"""Datasets as normalised tensors on the training device, split into train, validation and test.

Everything fits in memory (MNIST in float32 is 220 MB), so each split is loaded once and a batch is
a gather with an index tensor: no DataLoader, no per-sample Python transforms in the hot loop.
"""

from __future__ import annotations

import hashlib
import math
import struct
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fa_cli.config import DataError, FilesDatasetConfig, SyntheticDatasetConfig


@dataclass(frozen=True)
class ImageShape:
    channels: int
    size: int  # images are size x size
    num_classes: int


@dataclass(frozen=True)
class Source:
    """A torchvision dataset, named by its class in ``torchvision.datasets``, whose files _read() checks
    and downloads: idx files (MNIST's layout) or CIFAR's python batches."""

    class_name: str
    shape: ImageShape
    idx_files: bool

    @property
    def cls(self) -> type[Any]:
        # Imported here, not at the top: torchvision takes a second to import, which a config error,
        # ``--cfg job`` or a run on generated data need not wait for.
        from torchvision import datasets

        return getattr(datasets, self.class_name)


SOURCES = {
    "mnist": Source("MNIST", ImageShape(1, 28, 10), idx_files=True),
    "fashion_mnist": Source("FashionMNIST", ImageShape(1, 28, 10), idx_files=True),
    "cifar10": Source("CIFAR10", ImageShape(3, 32, 10), idx_files=False),
}

# Generated datasets are fixed tasks: the run's seed changes the split, the weights and the batch
# order, never the images themselves.
SYNTHETIC_SEED = 0


@dataclass
class Split:
    inputs: Tensor  # (N, C, H, W) float32, normalised
    targets: Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.targets)


@dataclass
class Data:
    train: Split
    val: Split | None  # None when dataset.val_fraction is 0
    test: Split
    shape: ImageShape
    # The normalisation, per channel, shape (1, C, 1, 1): pixel value p in [0, 1] is (p - mean) / std in
    # the splits. Pixel-space quantities (an attack's epsilon, the valid image range) convert through it.
    mean: Tensor
    std: Tensor

    def pixel_bounds(self) -> tuple[Tensor, Tensor]:
        """The normalised values of pixels 0 and 1, per channel, on the splits' device: computed as the
        splits were, so every example lies within them exactly."""
        device = self.test.inputs.device
        return ((0.0 - self.mean) / self.std).to(device), ((1.0 - self.mean) / self.std).to(device)


def shift_images(images: Tensor, offsets: Tensor, max_shift: int) -> Tensor:
    """``images`` (N, C, H, W) each translated by its ``offsets`` row (dy, dx), integers in
    [-max_shift, max_shift]; the border pixels extend into the space uncovered (for MNIST, background).
    Two gathers on the images' device: no Python per image."""
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (max_shift,) * 4, mode="replicate")
    rows = torch.arange(h, device=images.device) + max_shift - offsets[:, :1]  # (N, H)
    cols = torch.arange(w, device=images.device) + max_shift - offsets[:, 1:]  # (N, W)
    padded = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * max_shift))
    return padded.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def shape_of(cfg: FilesDatasetConfig | SyntheticDatasetConfig) -> ImageShape:
    """The images' shape and class count, known before any data loads (models are built from it)."""
    if isinstance(cfg, SyntheticDatasetConfig):
        return ImageShape(cfg.channels, cfg.image_size, cfg.num_classes)
    return SOURCES[cfg.name].shape


def load(cfg: FilesDatasetConfig | SyntheticDatasetConfig, device: torch.device, seed: int) -> Data:
    """Train, validation and test splits on ``device``, normalised with the training split's per-channel
    mean and std. Validation is a seeded random ``val_fraction`` of the (first ``subset``) training
    examples; test is the official test set."""
    if isinstance(cfg, SyntheticDatasetConfig):
        (train_x, train_y), (test_x, test_y) = _synthetic(cfg)
    else:
        (train_x, train_y), (test_x, test_y) = _read(cfg)
    if cfg.subset is not None:
        if cfg.subset > len(train_y):
            raise DataError(f"dataset.subset={cfg.subset} is more than the {len(train_y)} training examples")
        train_x, train_y = train_x[: cfg.subset], train_y[: cfg.subset]

    order = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))
    num_val = math.ceil(cfg.val_fraction * len(train_y))  # at least one example when val_fraction > 0
    if num_val >= len(train_y):
        raise DataError(f"dataset.val_fraction={cfg.val_fraction} leaves no training examples")
    val_index, train_index = order[:num_val], order[num_val:]

    images = train_x[train_index].float().div_(255)
    mean = images.mean(dim=(0, 2, 3), keepdim=True)
    std = images.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)

    def split(x: Tensor, y: Tensor) -> Split:
        x = (x.float().div_(255) - mean) / std
        return Split(x.contiguous().to(device), y.long().to(device))

    return Data(
        train=split(train_x[train_index], train_y[train_index]),
        val=split(train_x[val_index], train_y[val_index]) if num_val else None,
        test=split(test_x, test_y),
        shape=shape_of(cfg),
        mean=mean,
        std=std,
    )


def _read(cfg: FilesDatasetConfig) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """(images uint8 (N, C, H, W), labels) for the official train and test sets, downloading them if
    files are missing and the network is there."""
    source = SOURCES[cfg.name]
    root = Path(cfg.root).expanduser().resolve()
    folder, missing = _missing_files(source, root)
    if missing:
        _download(cfg.name, source, root, folder, missing)
    _check_files(source, folder)
    splits = []
    for train in (True, False):
        try:
            dataset = source.cls(str(root), train=train, download=False)
        except Exception as e:  # unreadable or corrupt files: say which dataset and where
            raise DataError(f"dataset {cfg.name}: cannot read files in {folder}: {e}") from e
        images = torch.as_tensor(dataset.data)
        images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)  # to (N, C, H, W)
        labels = torch.as_tensor(dataset.targets)
        shape = source.shape
        if images.shape[1:] != (shape.channels, shape.size, shape.size) or len(labels) != len(images):
            raise DataError(
                f"dataset {cfg.name}: files in {folder} hold {len(images)} images of shape "
                f"{tuple(images.shape[1:])} and {len(labels)} labels; expected {shape.channels}x{shape.size}x"
                f"{shape.size} images, one label each"
            )
        splits.append((images, labels))
    return splits[0], splits[1]


def _missing_files(source: Source, root: Path) -> tuple[Path, list[str]]:
    """The folder torchvision reads the dataset from, and which of its files are not there."""
    cls = source.cls
    if source.idx_files:  # MNIST, FashionMNIST: decompressed idx files
        folder = root / cls.__name__ / "raw"
        names = [Path(url).name.removesuffix(".gz") for url, _ in cls.resources]
    else:  # CIFAR10: the unpacked python batches
        folder = root / cls.base_folder
        names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return folder, [name for name in names if not (folder / name).is_file()]


def _check_files(source: Source, folder: Path) -> None:
    """Each file of the dataset, checked on its own so that a truncated or corrupt one is named (torchvision
    only says that something in the folder is wrong). MNIST and FashionMNIST: the idx headers against
    the file sizes, image against label counts, and the labels' range; CIFAR-10: each file's MD5
    against the release's."""
    if source.idx_files:
        size, classes = source.shape.size, source.shape.num_classes
        for prefix in ("train", "t10k"):
            images = folder / f"{prefix}-images-idx3-ubyte"
            labels = folder / f"{prefix}-labels-idx1-ubyte"
            num_images = _idx_count(images, (size, size))
            num_labels = _idx_count(labels, ())
            if num_images != num_labels:
                raise DataError(
                    f"{images} holds {num_images} images but {labels} holds {num_labels} labels: "
                    "the two files are from different sets; download them again"
                )
            largest = max(labels.read_bytes()[8:], default=0)
            if largest >= classes:
                message = f"{labels} holds label {largest}; labels must be 0 to {classes - 1}: corrupt file"
                raise DataError(message)
    else:
        cls = source.cls
        for name, md5 in [*cls.train_list, *cls.test_list, (cls.meta["filename"], cls.meta["md5"])]:
            digest = hashlib.md5((folder / name).read_bytes()).hexdigest()
            if digest != md5:
                raise DataError(
                    f"{folder / name} is truncated or corrupt (MD5 {digest}, the release's is {md5}); "
                    "replace it with the file from the release"
                )


def _idx_count(path: Path, item_shape: tuple[int, ...]) -> int:
    """How many items of ``item_shape`` the idx file (unsigned bytes) at ``path`` holds, after checking
    that its header says so and that its size agrees with the header."""
    ndim = 1 + len(item_shape)
    with open(path, "rb") as f:
        magic = f.read(4)
        dims_bytes = f.read(4 * ndim)
    if magic[:2] == b"\x1f\x8b":
        raise DataError(f"{path} is gzip-compressed: gunzip it (fa-train reads the decompressed idx files)")
    if len(magic) < 4 or magic[:3] != b"\0\0\x08" or magic[3] != ndim or len(dims_bytes) < 4 * ndim:
        start = magic.hex() or "nothing: it is empty"
        raise DataError(
            f"{path} is not an idx file of {ndim}-d unsigned bytes (it starts with {start}): corrupt or "
            "truncated; download it again"
        )
    count, *shape = struct.unpack(f">{ndim}I", dims_bytes)
    if tuple(shape) != item_shape:
        raise DataError(f"{path} holds items of shape {tuple(shape)}, expected {item_shape}")
    expected = 4 + 4 * ndim + count * math.prod(item_shape)
    actual = path.stat().st_size
    if actual != expected:
        what = "truncated" if actual < expected else "longer than its header says"
        raise DataError(
            f"{path} is {what}: its header announces {count} items ({expected} bytes), the file has "
            f"{actual} bytes; download it again"
        )
    return count


def _download(name: str, source: Source, root: Path, folder: Path, missing: list[str]) -> None:
    cls = source.cls
    url = cls.mirrors[0] if hasattr(cls, "mirrors") else cls.url
    if not _online(url):
        raise DataError(
            f"dataset.root={root}: {', '.join(missing)} not found in {folder} and no network to download "
            f"them; put the files there, or point dataset.root= (or FA_DATA_DIR) at the folder that holds "
            f"{folder.relative_to(root)}/"
        )
    try:
        cls(str(root), train=True, download=True)  # fetches the train and test files together
    except Exception as e:
        raise DataError(f"dataset {name}: download into {root} failed: {e}") from e


def _online(url: str, timeout: float = 3.0) -> bool:
    """Whether ``url``'s server answers within ``timeout`` seconds (through any configured proxy), so
    that an offline machine fails fast instead of hanging on a download."""
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # the server answered, even if not with 200 for a HEAD on a folder
    except (OSError, ValueError):
        return False
    return True


def _synthetic(cfg: SyntheticDatasetConfig) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """A smooth random template per class (a low-resolution pattern upsampled to image size) plus
    Gaussian pixel noise: learnable by any model in a few epochs, with image structure for convs."""
    g = torch.Generator().manual_seed(SYNTHETIC_SEED)
    coarse = torch.randn(cfg.num_classes, cfg.channels, 7, 7, generator=g)
    templates = torch.nn.functional.interpolate(coarse, size=cfg.image_size, mode="bilinear")
    templates = templates / templates.std()

    def sample(n: int) -> tuple[Tensor, Tensor]:
        labels = torch.randint(cfg.num_classes, (n,), generator=g)
        pixels = templates[labels] + cfg.noise * torch.randn(n, *templates.shape[1:], generator=g)
        # To uint8 like the real datasets (so every source is normalised alike), 3 std either side of 128.
        pixels = pixels / math.sqrt(1 + cfg.noise**2) * 40 + 128
        return pixels.round_().clamp_(0, 255).to(torch.uint8), labels

    return sample(cfg.train_size), sample(cfg.test_size)
