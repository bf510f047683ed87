"""Sample images for the demo tasks: a few held-out images per task, shipped as PNGs.

Each one comes from the held-out (test) split its task was evaluated on, never from its
training images, and is stored exactly as the task saw it in training (same size,
polarity and framing), as masks/samples/<task>/<label>_<n>.png. `generate` rewrites them
from the data sets (deterministic); `piggy-masks samples` shows or copies them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from PIL.PngImagePlugin import PngInfo

from piggyback_serve.masks import artifact, data, demo

SAMPLES_DIR = Path(__file__).parent / "samples"

# Per task, the labels of its samples: for each, the first held-out image of that label
# not already picked.
PICKS = {
    "mnist": ("3", "7", "9"),
    "digits": ("0", "4", "8"),
    "faces": ("face", "face", "non-face"),
    "fashion_mnist": ("trouser", "sneaker", "bag"),
}


def label_of(path: Path) -> str:
    """The true label of a sample, from its name: `7_0.png` is a 7."""
    return path.stem.rsplit("_", 1)[0]


def sample_files(folder: Path = SAMPLES_DIR) -> dict[str, list[Path]]:
    """Task name -> its sample images."""
    return {
        task.name: sorted((folder / task.name).glob("*.png"))
        for task in demo.DEMO_TASKS
        if (folder / task.name).is_dir()
    }


def generate(out: Path = SAMPLES_DIR, tasks=None) -> list[Path]:
    """Write each task's samples from the held-out split of its bundled artifact's data."""
    written = []
    for task in tasks or demo.available_tasks():
        meta = artifact.read(demo.BUNDLED_DIR / f"{task.name}.safetensors").metrics
        seed = meta.get("config", {}).get("seed", 0)  # the split the task was tested on
        dataset = data.load_dataset(meta.get("dataset", task.dataset), seed=seed)
        test = dataset.test
        folder = out / task.name
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.png"):  # samples of an earlier pick
            old.unlink()
        picks = PICKS[task.name]
        taken: set[int] = set()
        for k, label in enumerate(picks):
            want = dataset.labels.index(label)
            i = next(i for i, y in enumerate(test.targets) if y == want and i not in taken)
            taken.add(i)
            info = PngInfo()
            info.add_text("source", f"{dataset.name} held-out split (seed {seed}), image {i}")
            path = folder / f"{label}_{picks[:k].count(label)}.png"
            data.as_image(test.images[i]).save(path, format="PNG", optimize=True, pnginfo=info)
            written.append(path)
    return written


def copy_to(target: Path, folder: Path = SAMPLES_DIR) -> list[Path]:
    """Copy the shipped samples into target/<task>/."""
    copied = []
    for task, paths in sample_files(folder).items():
        (target / task).mkdir(parents=True, exist_ok=True)
        for p in paths:
            shutil.copyfile(p, target / task / p.name)
            copied.append(target / task / p.name)
    return copied


def describe(paths: list[Path]) -> str:
    """One line per sample: its task, the label it should get, its path."""
    rows = [("TASK", "LABEL", "PATH")] + [(p.parent.name, label_of(p), str(p)) for p in paths]
    width = max((len(r[0]) for r in rows), default=0)
    labels = max((len(r[1]) for r in rows), default=0)
    return "\n".join(f"{t:<{width}}  {lab:<{labels}}  {path}" for t, lab, path in rows)
