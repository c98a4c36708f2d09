"""The data side of ``finetune``: an ImageFolder tree (``train/`` and ``val/``, or one folder
split by a seeded, stratified ``--val-split``), clear errors for data that cannot train a
classifier, and augmentation seeded per sample, so an image gets the same crop in a given
epoch whatever the number of processes, DataLoader workers, or a resume in between."""
from __future__ import annotations

import pathlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from ._finetuned import class_name
from ._images import IMAGE_SUFFIXES, open_image


class DataError(ValueError):
    """The data folder cannot train and validate a classifier."""


@dataclass
class Splits:
    classes: list[str]
    train: list[tuple[str, int]]  # (path, class index)
    val: list[tuple[str, int]]
    description: str


def image_files(folder: pathlib.Path) -> list[pathlib.Path]:
    # As torchvision's ImageFolder: image files anywhere under the class folder; hidden ones
    # (.ipynb_checkpoints, .DS_Store) are not images of the class. Whatever is named like an image
    # but is not a regular file (a FIFO, a dangling link) is kept, to be reported as unreadable.
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def named_folders(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Class name -> folder of an ImageFolder root, sorted by name: names in Unicode NFC, hidden
    folders (.ipynb_checkpoints) are no class, and two folders whose names differ only in
    Unicode spelling are refused. The one reading of class folders (finetune, evaluate)."""
    named: dict[str, pathlib.Path] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        name = class_name(folder.name)
        if name in named:
            raise DataError(f"{named[name]} and {folder} are the same class name in two Unicode spellings "
                            f"(NFC and NFD, {name!r}): merge them into one folder")
        named[name] = folder
    return dict(sorted(named.items()))


def _class_folders(root: pathlib.Path) -> dict[str, list[pathlib.Path]]:
    if not root.is_dir():
        raise DataError(f"{root} does not exist or is not a directory")
    found = {name: image_files(folder) for name, folder in named_folders(root).items()}
    if not any(found.values()):
        loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        hint = (f" ({len(loose)} images lie directly in it: put them into one folder per class)" if loose else "")
        raise DataError(f"no images in {root}: expected one folder per class, each holding that class's "
                        f"images (ImageFolder layout){hint}")
    empty = [name for name, files in found.items() if not files]
    if empty:
        raise DataError(f"class folder(s) without images in {root}: {', '.join(empty[:10])}")
    if len(found) < 2:
        raise DataError(f"only one class in {root} ({next(iter(found))}): a classifier needs at least two "
                        "class folders")
    return found


def _stratified_split(found: dict[str, list[pathlib.Path]], fraction: float,
                      seed: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    train, val = [], []
    for index, (name, files) in enumerate(found.items()):
        if len(files) < 2:
            raise DataError(f"class {name} has {len(files)} image: --val-split needs at least 2 per class "
                            "(one to train on, one to validate)")
        order = list(files)
        random.Random(f"{seed}:{name}").shuffle(order)
        held = min(len(order) - 1, max(1, round(len(order) * fraction)))
        val += [(str(p), index) for p in sorted(order[:held])]
        train += [(str(p), index) for p in sorted(order[held:])]
    return train, val


def find_splits(data: str | pathlib.Path, val_split: float | None = None, seed: int = 0) -> Splits:
    """The classes (sorted folder names, as ImageFolder) and the train and val images."""
    data = pathlib.Path(data).expanduser()
    if not data.is_dir():
        raise DataError(f"data directory {data} does not exist")
    if val_split is not None:
        if not 0.0 < val_split < 1.0:
            raise DataError(f"--val-split must be a fraction between 0 and 1, got {val_split}")
        if (data / "train").is_dir() and (data / "val").is_dir():
            raise DataError(f"{data} already has train/ and val/ folders: drop --val-split to use them")
        found = _class_folders(data)
        train, val = _stratified_split(found, val_split, seed)
        return Splits(list(found), train, val, f"{data}, {val_split:g} of each class held out (seed {seed})"
                      + _nfc_note(data))
    if not (data / "train").is_dir() or not (data / "val").is_dir():
        raise DataError(f"{data} needs train/ and val/ folders, each with one folder per class (ImageFolder "
                        "layout); or pass --val-split 0.1 to hold out part of a single folder of class folders")
    train_found = _class_folders(data / "train")
    val_root = data / "val"
    val_found = {name: image_files(folder) for name, folder in named_folders(val_root).items()}
    missing = [name for name in train_found if not val_found.get(name)]
    if missing:
        raise DataError(f"class(es) missing from {val_root}: {', '.join(missing[:10])}; every class in train/ "
                        "needs validation images in a val/ folder of the same name")
    extra = [name for name, files in val_found.items() if name not in train_found and files]
    if extra:
        raise DataError(f"class(es) in {val_root} that train/ does not have: {', '.join(extra[:10])}")
    classes = list(train_found)
    train = [(str(p), i) for i, name in enumerate(classes) for p in train_found[name]]
    val = [(str(p), i) for i, name in enumerate(classes) for p in val_found[name]]
    return Splits(classes, train, val, f"{data}/train and {data}/val" + _nfc_note(data / "train", val_root))


def _nfc_note(*roots: pathlib.Path) -> str:
    """Says so when a class folder's name is not already NFC (it is read as NFC)."""
    renamed = sorted({class_name(p.name) for root in roots for p in root.iterdir()
                      if p.is_dir() and class_name(p.name) != p.name})
    return f" (folder names read as Unicode NFC: {', '.join(renamed)})" if renamed else ""


def check_readable(splits: Splits) -> None:
    """Before any epoch: every class has a readable image in train and in val (found by
    opening each class's images in order until one decodes: usually the first)."""
    for kind, items in (("training", splits.train), ("validation", splits.val)):
        by_class: dict[int, list[str]] = {}
        for path, target in items:
            by_class.setdefault(target, []).append(path)
        for target, paths in sorted(by_class.items()):
            errors = []
            for path in paths:
                try:
                    open_image(path)
                    break
                except Exception as exc:  # noqa: BLE001 - any decoding failure means unreadable
                    errors.append(f"{path}: {type(exc).__name__}: {exc}")
            else:
                raise DataError(f"no readable {kind} image in class {splits.classes[target]}: none of its "
                                f"{len(paths)} file(s) could be read, e.g. {errors[0]}")


# -- transforms ------------------------------------------------------------------------------

def train_transform(size: int, mean: Sequence[float], std: Sequence[float], interpolation: str,
                    min_scale: float, hflip: float):
    """RandomResizedCrop (scale ``min_scale``..1) and a horizontal flip at the model's input
    size, then the model's normalisation (torchvision transforms v2)."""
    from torchvision.transforms import InterpolationMode, v2

    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(size, scale=(min_scale, 1.0), interpolation=InterpolationMode(interpolation),
                             antialias=True),
        v2.RandomHorizontalFlip(hflip),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one image in one epoch: a function of nothing else."""
    return (seed * 1_000_003 + epoch * 10_007 + index) % (2**63 - 1)


class TrainImages(Dataset):
    """Indexed by (epoch, index); returns (index, tensor or None, target, error)."""

    def __init__(self, items: Sequence[tuple[str, int]], transform, seed: int):
        self.items = list(items)
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        path, target = self.items[index]
        try:
            image = open_image(path)
        except Exception as exc:  # noqa: BLE001 - reported per image by the trainer, as evaluate does
            return index, None, target, f"{type(exc).__name__}: {exc}"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return index, self.transform(image), target, ""


def collate_train(batch):
    """(indices, images or None, targets, [(index, error)]): unreadable images left out."""
    good = [(i, x, t) for i, x, t, _ in batch if x is not None]
    errors = [(i, e) for i, x, _, e in batch if x is None]
    if not good:
        return [], None, None, errors
    return ([i for i, _, _ in good], torch.stack([x for _, x, _ in good]),
            torch.tensor([t for _, _, t in good]), errors)


class EpochSampler(Sampler):
    """Yields (epoch, index) from a ``DistributedSampler``: the epoch travels with each index
    into the DataLoader workers (persistent or not)."""

    def __init__(self, sampler: DistributedSampler):
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, i) for i in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)
