"""Datasets as pixels: Fashion-MNIST, CIFAR-10/100, ImageFolder and a synthetic set for tests.

Every loader yields float32 images in [0, 1] (NCHW) and int64 labels. Normalisation is not
done here: it lives inside the model (`models.Classifier`) so that an exported graph takes
pixels. A validation split is held out of the training split with a fixed seed, so every run
and every ensemble member sees the same validation and test images.
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler, Subset

from training.config import DataConfig
from training.errors import UsageError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The validation split is the same for every run, whatever the training seed.
SPLIT_SEED = 0


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and an exported graph need to know about a dataset's images."""

    name: str
    classes: tuple[str, ...]
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # Training augmentation: random crop after zero padding, random horizontal flip.
    crop_padding: int = 0
    flip: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def preprocessing(self) -> dict[str, Any]:
        """The evaluation preprocessing, as recorded in reports and manifests."""
        return {
            "input": "float32 pixels in [0, 1], NCHW",
            "shape": [self.in_channels, self.image_size, self.image_size],
            "mean": list(self.mean),
            "std": list(self.std),
            "normalisation": "(x - mean) / std per channel, inside the model",
        }


class ImageTensors(Dataset[tuple[torch.Tensor, int]]):
    """A whole split held in memory as uint8 images [N, C, H, W] and int64 labels [N]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match {images.shape[0]} images")
        self.images = images
        self.labels = labels.to(torch.int64)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def take(self, indices: torch.Tensor) -> ImageTensors:
        return ImageTensors(self.images[indices], self.labels[indices])


class SizedDataset(Sized, Protocol):
    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]: ...


@dataclass
class DataSplits:
    """Train (for SGD), validation (held out of train) and test (reporting only)."""

    info: DatasetInfo
    train: SizedDataset
    val: SizedDataset
    test: SizedDataset
    # The training images without the augmentation of a dataset whose transform augments (ImageFolder);
    # None where `train` is plain pixels and only `make_batches(train=True)` augments.
    plain_train: SizedDataset | None = None

    @property
    def train_without_augmentation(self) -> SizedDataset:
        """The training images as evaluation sees them: for batch-norm statistics and training loss."""
        return self.train if self.plain_train is None else self.plain_train


# --------------------------------------------------------------------------- loading


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not, into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise UsageError(f"{path} is not an unsigned-byte IDX file; is it a Fashion-MNIST file?")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(dims)):
        raise UsageError(f"{path} is truncated: expected {int(np.prod(dims))} bytes of data")
    return array.reshape(dims)


def _find_idx(data_dir: Path, stem: str) -> Path:
    for folder in (data_dir, data_dir / "FashionMNIST" / "raw"):
        for name in (f"{stem}.gz", stem):
            if (folder / name).is_file():
                return folder / name
    raise UsageError(
        f"Fashion-MNIST file {stem}(.gz) not found in {data_dir}: install it with "
        "`apt-get install dataset-fashion-mnist` or pass --data-dir DIR holding the IDX files"
    )


FASHION_MNIST = DatasetInfo(
    name="fashion-mnist",
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
             "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    in_channels=1,
    image_size=28,
    mean=(0.2860,),
    std=(0.3530,),
    crop_padding=2,
    flip=True,
)


def _fashion_mnist(data_dir: Path | None) -> tuple[DatasetInfo, ImageTensors, ImageTensors]:
    root = data_dir or FASHION_MNIST_DIR
    if not root.is_dir():
        raise UsageError(
            f"data directory {root} does not exist: install Fashion-MNIST with "
            "`apt-get install dataset-fashion-mnist` or pass --data-dir DIR holding the IDX files"
        )

    def split(prefix: str) -> ImageTensors:
        images = read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"))
        return ImageTensors(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))

    return FASHION_MNIST, split("train"), split("t10k")


def _cifar(name: str, data_dir: Path | None, download: bool) -> tuple[DatasetInfo, ImageTensors, ImageTensors]:
    from torchvision import datasets

    if data_dir is None:
        raise UsageError(f"{name} needs --data-dir DIR (torchvision's layout, e.g. DIR/cifar-10-batches-py)")
    factory = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    try:
        train = factory(str(data_dir), train=True, download=download)
        test = factory(str(data_dir), train=False, download=download)
    except RuntimeError as error:
        raise UsageError(
            f"{name} not found under {data_dir} (expected {data_dir / folder}): "
            "point --data-dir at the folder holding it, or add --download to fetch it"
        ) from error

    def tensors(dataset: Any) -> ImageTensors:
        images = torch.from_numpy(np.asarray(dataset.data)).permute(0, 3, 1, 2).contiguous()
        return ImageTensors(images, torch.as_tensor(dataset.targets, dtype=torch.int64))

    mean, std = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)) if name == "cifar10" else (
        (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    info = DatasetInfo(name=name, classes=tuple(train.classes), in_channels=3, image_size=32,
                       mean=mean, std=std, crop_padding=4, flip=True)
    return info, tensors(train), tensors(test)


def synthetic_images(count: int, num_classes: int = 10, size: int = 16, seed: int = 0) -> ImageTensors:
    """Learnable synthetic images: a fixed random template per class, shifted, plus noise."""
    generator = torch.Generator().manual_seed(1234)  # templates are the same for every split
    templates = torch.rand(num_classes, 1, size, size, generator=generator) * 255
    generator.manual_seed(seed)
    labels = torch.randint(0, num_classes, (count,), generator=generator)
    shifts = torch.randint(-1, 2, (count, 2), generator=generator)
    images = templates[labels]
    for axis in (0, 1):
        images = torch.stack([img.roll(int(s), dims=axis + 1) for img, s in zip(images, shifts[:, axis], strict=True)])
    noise = torch.randn(images.shape, generator=generator) * 60
    return ImageTensors((images + noise).clamp(0, 255).to(torch.uint8), labels)


SYNTHETIC = DatasetInfo(
    name="synthetic", classes=tuple(f"class-{i}" for i in range(10)), in_channels=1,
    image_size=16, mean=(0.5,), std=(0.25,),
)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
GREY_MEAN, GREY_STD = (0.449,), (0.226,)
"""ImageNet's statistics for grey images (torchvision's grey pretrained models use them)."""


class ImageFiles(Dataset[tuple[torch.Tensor, int]]):
    """Image files decoded when read, as torchvision's ImageFolder reads them (Pillow; torchvision.io's decoders are
    deprecated since torchvision 0.29), as uint8 [C, H, W] in `channels` (1: grey, 3: RGB, whatever the file
    holds), then transformed."""

    def __init__(self, files: list[tuple[Path, int]], channels: int, transform: Any) -> None:
        self.files, self.channels, self.transform = files, channels, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from torchvision.transforms.v2.functional import pil_to_tensor

        path, label = self.files[index]
        return self.transform(pil_to_tensor(_decoded(path, "L" if self.channels == 1 else "RGB"))), label


def _decoded(path: Path, mode: str | None = None) -> Any:
    """The image in `path` (converted to `mode`); `UsageError` naming the file where it is not one."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.convert(mode) if mode is not None else image.copy()
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise UsageError(f"{path} is not an image that can be decoded ({str(error).splitlines()[0][:120]})"
                         ) from error


def _class_files(folder: Path, classes: tuple[str, ...] | None) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
    """The class folders of `folder` (sorted, as torchvision's ImageFolder) and their image files with labels; a
    later split must hold the training split's classes."""
    found = tuple(sorted(entry.name for entry in folder.iterdir() if entry.is_dir()))
    if classes is not None and found != classes:
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise UsageError(f"imagefolder: {folder} must hold the training split's class folders"
                         f"{f'; missing {missing}' if missing else ''}{f'; not in train {extra}' if extra else ''}")
    if not found:
        raise UsageError(f"imagefolder: {folder} holds no class folders (expected {folder}/<class>/*.png)")
    files: list[tuple[Path, int]] = []
    for label, name in enumerate(found):
        images = sorted(path for path in (folder / name).rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise UsageError(f"imagefolder: {folder / name} holds no PNG or JPEG image")
        files.extend((path, label) for path in images)
    return found, files


def _image_channels(path: Path) -> int:
    """1 for a grey image file (with or without alpha), 3 for anything with colour (an alpha channel is dropped)."""
    bands = _decoded(path).getbands()
    return 1 if bands in (("L",), ("L", "A"), ("1",), ("I",), ("F",), ("I;16",)) else 3


def _image_folder(data_dir: Path | None, image_size: int, val_size: int | None) -> DataSplits:
    """`data_dir/train/<class>/*` and, optionally, `val/` (replacing the validation split held out of train) and
    `test/` (without it a test split is held out of train as well). Grey or RGB as the first training image is."""
    from torchvision.transforms import v2

    if data_dir is None or not (data_dir / "train").is_dir():
        raise UsageError("imagefolder needs --data-dir DIR with DIR/train/<class>/*.png (or .jpg), and optionally "
                         "DIR/val/<class>/ and DIR/test/<class>/")
    if image_size < 8:
        raise UsageError(f"--image-size must be at least 8 pixels, got {image_size}")
    classes, train_files = _class_files(data_dir / "train", None)
    channels = _image_channels(train_files[0][0])
    train_tf = v2.Compose([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()])
    eval_tf = v2.Compose([v2.Resize(image_size * 8 // 7, antialias=True), v2.CenterCrop(image_size)])
    order = torch.randperm(len(train_files), generator=torch.Generator().manual_seed(SPLIT_SEED)).tolist()
    shuffled = [train_files[index] for index in order]
    if (data_dir / "test").is_dir():
        test_files = _class_files(data_dir / "test", classes)[1]
    else:
        held = max(1, len(shuffled) // 10)
        test_files, shuffled = shuffled[:held], shuffled[held:]
    if (data_dir / "val").is_dir():
        if val_size is not None:
            raise UsageError(f"imagefolder: {data_dir / 'val'} is the validation split; leave out --val-size")
        val_files = _class_files(data_dir / "val", classes)[1]
    else:
        val_size = max(1, len(shuffled) // 10) if val_size is None else val_size
        if not 0 <= val_size < len(shuffled):
            raise UsageError(f"--val-size must be between 0 and {len(shuffled) - 1}, got {val_size}")
        val_files, shuffled = shuffled[:val_size], shuffled[val_size:]
    rgb = channels == 3
    info = DatasetInfo(name="imagefolder", classes=classes, in_channels=channels, image_size=image_size,
                       mean=IMAGENET_MEAN if rgb else GREY_MEAN, std=IMAGENET_STD if rgb else GREY_STD)
    return DataSplits(info, ImageFiles(shuffled, channels, train_tf), ImageFiles(val_files, channels, eval_tf),
                      ImageFiles(test_files, channels, eval_tf), plain_train=ImageFiles(shuffled, channels, eval_tf))


DATASETS = ("fashion-mnist", "cifar10", "cifar100", "imagefolder", "synthetic")


def load_splits(
    name: str,
    data_dir: Path | None = None,
    val_size: int | None = None,
    subset: int | None = None,
    download: bool = False,
    image_size: int = 224,
) -> DataSplits:
    """Load a dataset by name and hold out `val_size` training images for validation."""
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if name == "imagefolder":
        return _image_folder(data_dir, image_size, val_size)
    if name == "fashion-mnist":
        info, full_train, test = _fashion_mnist(data_dir)
    elif name in ("cifar10", "cifar100"):
        info, full_train, test = _cifar(name, data_dir, download)
    else:
        info = SYNTHETIC
        full_train, test = synthetic_images(1200, seed=1), synthetic_images(500, seed=2)
    if val_size is None:
        val_size = 200 if name == "synthetic" else 5000
    if not 0 <= val_size < len(full_train):
        raise UsageError(f"--val-size must be between 0 and {len(full_train) - 1}, got {val_size}")
    order = torch.randperm(len(full_train), generator=torch.Generator().manual_seed(SPLIT_SEED))
    train, val = full_train.take(order[val_size:]), full_train.take(order[:val_size])
    if subset is not None:
        if subset < 1:
            raise UsageError(f"--subset must be a positive number of images, got {subset}")
        train, val, test = (s.take(torch.arange(min(subset, len(s)))) for s in (train, val, test))
    return DataSplits(info, train, val, test)


def load_data(config: DataConfig) -> DataSplits:
    """The splits a run's data configuration names (every run of one dataset sees the same validation images)."""
    return load_splits(config.dataset, config.data_dir, config.val_size, config.subset, config.download,
                       config.image_size)


# --------------------------------------------------------------------------- batching


@dataclass(frozen=True)
class Shard:
    """One process's share of a data-parallel run (`training.distributed`): process `rank` of `count`."""

    rank: int = 0
    count: int = 1

    def slice_of(self, batch: int) -> slice:
        """This process's contiguous part of a batch of `batch` items, the same size in every process.

        The global batch is a multiple of `count`; only a short last batch can leave up to `count - 1`
        items out, and a last batch shorter than `count` gives every process nothing.
        """
        size = batch // self.count
        return slice(self.rank * size, (self.rank + 1) * size)

    def batches(self, items: int, batch_size: int) -> int:
        """How many batches of an `items`-long pass give this process something."""
        full, rest = divmod(items, batch_size)
        return full + (1 if rest // self.count > 0 else 0)

    def whole_batches(self, items: int, batch_size: int) -> range:
        """The items of this process when a pass is split by whole batches, not within them: a contiguous run
        of batches (as even as possible), so each process forms exactly the batches a single process would."""
        batches = -(-items // batch_size)
        per_process, extra = divmod(batches, self.count)
        first = self.rank * per_process + min(self.rank, extra)
        last = first + per_process + (1 if self.rank < extra else 0)
        return range(min(first * batch_size, items), min(last * batch_size, items))


def subset(data: SizedDataset, items: range) -> SizedDataset:
    """The items `items` of `data` (a contiguous range), in order."""
    if isinstance(data, ImageTensors):
        return data.take(torch.arange(items.start, items.stop))
    return Subset(data, list(items))  # type: ignore[arg-type]


def augment_batch(images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop (after zero padding) and horizontal flip, drawn independently per image.

    torchvision's transforms draw one set of parameters per call; a per-image call costs more
    than the small CNN's whole step on a CPU, so in-memory splits are augmented a batch at once.
    """
    batch, _, height, width = images.shape
    if padding > 0:
        padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (batch, 1), generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (batch, 1), generator=generator)
        rows = (torch.arange(height) + dy)[:, None, :, None]  # [B, 1, H, 1]
        cols = (torch.arange(width) + dx)[:, None, None, :]  # [B, 1, 1, W]
        index = torch.arange(batch)[:, None, None, None]
        channel = torch.arange(images.shape[1])[None, :, None, None]
        images = padded[index, channel, rows, cols]
    if flip:
        flips = torch.rand(batch, generator=generator) < 0.5
        images = torch.where(flips[:, None, None, None], images.flip(-1), images)
    return images


class TensorBatches:
    """Batches of an in-memory split: seeded shuffling and augmentation, float pixels out.

    With a `shard` of several processes, every process draws the same order and augmentation
    from the same seed and keeps its own slice of each batch (`Shard.slice_of`).
    """

    def __init__(self, data: ImageTensors, batch_size: int, info: DatasetInfo, train: bool, seed: int = 0,
                 shard: Shard | None = None) -> None:
        self.data, self.batch_size, self.info, self.train, self.seed = data, batch_size, info, train, seed
        self.shard = shard or Shard()

    def __len__(self) -> int:
        return self.shard.batches(len(self.data), self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        count = len(self.data)
        order = torch.randperm(count, generator=generator) if self.train else torch.arange(count)
        for start in range(0, count, self.batch_size):
            index = order[start : start + self.batch_size]
            images = self.data.images[index]
            if self.train:
                # The whole batch, as in a single process: every process draws the same crops and flips, so
                # the slices of one step are together the single process's batch.
                images = augment_batch(images, self.info.crop_padding, self.info.flip, generator)
            labels = self.data.labels[index]
            if self.shard.count > 1:
                part = self.shard.slice_of(len(index))
                if part.start == part.stop:
                    return
                images, labels = images[part], labels[part]
            yield images.float().div_(255.0), labels


class FloatBatches:
    """A torch DataLoader whose uint8 batches come out as float pixels."""

    def __init__(self, loader: DataLoader[Any]) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.loader:
            yield images.float().div_(255.0), labels


class ShardedBatchSampler(Sampler[list[int]]):
    """The indices of this process's slice of every batch a single process's loader would form."""

    def __init__(self, sampler: Sampler[int], items: int, batch_size: int, shard: Shard) -> None:
        self.sampler, self.items, self.batch_size, self.shard = sampler, items, batch_size, shard

    def __len__(self) -> int:
        return self.shard.batches(self.items, self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in BatchSampler(self.sampler, self.batch_size, drop_last=False):
            part = self.shard.slice_of(len(batch))
            if part.start == part.stop:
                return
            yield batch[part]


Batches = TensorBatches | FloatBatches


def make_batches(
    data: SizedDataset, info: DatasetInfo, batch_size: int, train: bool, seed: int = 0, workers: int = 0,
    shard: Shard | None = None,
) -> Batches:
    """Batches for one pass over `data`; with `train`, shuffled and augmented from `seed`.

    With a `shard` of several processes, this process's slice of each of those batches.
    """
    if isinstance(data, ImageTensors):
        return TensorBatches(data, batch_size, info, train, seed, shard)
    generator = torch.Generator().manual_seed(seed)
    if shard is None or shard.count == 1:
        loader: DataLoader[Any] = DataLoader(data, batch_size=batch_size, shuffle=train, generator=generator,  # type: ignore[arg-type]
                                             num_workers=workers, persistent_workers=False)
        return FloatBatches(loader)
    if train and workers == 0:
        # Its transforms would draw from the global generator, each process for its own images: the processes'
        # generators, which must agree (a curve's t, the state a checkpoint saves), would drift apart.
        raise UsageError(f"{info.name} is augmented as it is read: with several processes, pass --workers 1 or more")
    # The order a single process's loader draws: the same sampler on the same generator. The loader's workers
    # augment each process's own images with random draws of their own.
    sampler: Sampler[int] = RandomSampler(data, generator=generator) if train else SequentialSampler(data)
    batches = ShardedBatchSampler(sampler, len(data), batch_size, shard)
    return FloatBatches(DataLoader(data, batch_sampler=batches, generator=generator,  # type: ignore[arg-type]
                                   num_workers=workers, persistent_workers=False))
