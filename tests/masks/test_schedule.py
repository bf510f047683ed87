"""The step-based schedule: a small folder gets enough optimisation steps for masks to learn.

A tiny random-init backbone keeps this fast; the demo backbone's numbers are in
bench/results/accuracy.md and README ("Learning a task")."""

import numpy as np
import pytest
import torch
from torch import nn

from piggyback_serve.masks import data, train
from piggyback_serve.masks.backbones import Backbone


def tiny_backbone() -> Backbone:
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ).requires_grad_(False)
    return Backbone("tiny", module.eval(), 16, 224, (0.5,) * 3, (0.5,) * 3, "0" * 64)


def small_folder(n_per_class: int = 24) -> data.LabelledData:
    """Two classes of 8x8 images, horizontal or vertical stripes, plus noise."""
    rng = np.random.default_rng(0)
    stripes = np.tile(np.array([150, 0] * 4, dtype=np.uint8), (8, 1))
    images, targets = [], []
    for label in (0, 1):
        for _ in range(n_per_class):
            noise = rng.integers(0, 80, (8, 8), dtype=np.uint8)
            images.append(noise + (stripes if label == 0 else stripes.T))
            targets.append(label)
    return data._split("small", ["rows", "columns"], np.array(images), np.array(targets), 0.25, 0)


def test_effective_epochs_reach_min_steps():
    config = train.TrainConfig(epochs=3, batch_size=32, min_steps=300)
    assert train.effective_epochs(config, 320) == 30  # 10 steps an epoch
    assert train.effective_epochs(config, 4000) == 3  # 375 steps already
    assert train.effective_epochs(train.TrainConfig(min_steps=0), 10) == 3


@pytest.mark.parametrize("min_steps, learns", [(0, False), (train.TrainConfig.min_steps, True)])
def test_default_schedule_switches_weights_off_on_a_small_folder(min_steps, learns):
    folder = small_folder()  # 36 training images: 2 steps an epoch
    config = train.TrainConfig(input_size=16, min_steps=min_steps, progress=False)
    result = train.train(tiny_backbone(), folder, config)
    # 3 epochs alone are 6 steps: no score can move the 5e-3 from init to threshold.
    assert (result.sparsity > 0) is learns
