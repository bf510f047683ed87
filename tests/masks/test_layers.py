import copy

import torch
from torch import nn
from torch.func import functional_call

from piggyback_serve.masks import artifact, inference
from piggyback_serve.masks.backbones import build_classifier
from piggyback_serve.masks.layers import DEFAULT_THRESHOLD, PiggybackModel, binarize


def test_binarize_thresholds_strictly():
    scores = torch.tensor([-1.0, 0.0, DEFAULT_THRESHOLD, DEFAULT_THRESHOLD + 1e-6, 1e-2, 5.0])
    assert binarize(scores).tolist() == [0, 0, 0, 1, 1, 1]


def test_binarize_is_straight_through():
    scores = torch.tensor([-1.0, 0.001, 0.01], requires_grad=True)
    upstream = torch.tensor([0.5, -2.0, 3.0])
    (binarize(scores) * upstream).sum().backward()
    assert torch.equal(scores.grad, upstream)


def _randomise_scores(model: PiggybackModel, off_fraction: float = 0.3):
    with torch.no_grad():
        for s in model.scores.values():
            s.copy_(torch.where(torch.rand_like(s) < off_fraction, 0.0, 1e-2))


def test_score_gradient_equals_gradient_wrt_effective_mask(resnet18):
    model = PiggybackModel(resnet18, num_classes=3)
    _randomise_scores(model)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    nn.functional.cross_entropy(model(x), y).backward()

    # The same loss with the binary masks as leaves: their gradient is what STE must pass.
    masks = {n: m.float().requires_grad_(True) for n, m in model.masks().items()}
    params = {n: w * masks[n] for n, w in model.weights.items()}
    feats = functional_call(resnet18.module, params, (x,), strict=False)
    nn.functional.cross_entropy(model.head(feats), y).backward()
    for name, mask in masks.items():
        score_grad = model.scores[name.replace(".", "__")].grad
        torch.testing.assert_close(score_grad, mask.grad, rtol=1e-5, atol=1e-7)
    assert any(m.grad.abs().sum() > 0 for m in masks.values())


def test_training_step_leaves_backbone_and_bn_untouched(lite0):
    before = copy.deepcopy(lite0.module.state_dict())
    model = PiggybackModel(lite0, num_classes=4)
    opt = torch.optim.Adam(list(model.scores.parameters()) + list(model.head.parameters()), 1e-1)
    model.train()
    for _ in range(2):
        loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.arange(4))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = lite0.module.state_dict()
    for key, tensor in before.items():
        assert torch.equal(tensor, after[key]), key
    # ...while the scores did move (lr 0.1 flips bits), so the test would see a leak.
    assert model.sparsity() > 0


def test_fresh_model_is_exactly_the_pretrained_network(lite0):
    model = PiggybackModel(lite0, num_classes=5).eval()
    assert all(m.all() for m in model.masks().values())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.head(lite0.module(x)), rtol=0, atol=0)


def test_masked_model_equals_torchvision_model_with_hand_masked_weights(resnet18):
    model = PiggybackModel(resnet18, num_classes=7).eval()
    _randomise_scores(model)
    masks = model.masks()
    plain = build_classifier("resnet18", "random")  # same seed: the same weights
    with torch.no_grad():
        for name, param in plain.named_parameters():
            if name in masks:
                param.mul_(masks[name])
        plain.fc = nn.Linear(512, 7)
        plain.fc.load_state_dict(model.head.state_dict())
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        expected = plain(x)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        # The serving path (artifact -> packed bits -> materialise) gives the same logits.
        art = artifact.TaskArtifact(
            task="t",
            backbone="resnet18",
            backbone_sha256=resnet18.fingerprint,
            labels=[str(i) for i in range(7)],
            masks={n: artifact.pack_mask(m) for n, m in masks.items()},
            head_weight=model.head.weight,
            head_bias=model.head.bias,
            threshold=DEFAULT_THRESHOLD,
            input_size=48,
            mean=resnet18.mean,
            std=resnet18.std,
        )
        params = inference.materialise(artifact.read(artifact.to_bytes(art)), resnet18)
        torch.testing.assert_close(
            inference.forward(resnet18, params, x), expected, rtol=1e-5, atol=1e-5
        )
    assert sum((~m).sum() for m in masks.values()) > 0
