"""One engine worker alone: a mixed batch answers what each task answers alone, by the
reference forward on the unfolded backbone (masks.inference).

Tasks here switch off 0%, 1%, 10% and 20% of the weights; one has its own BatchNorm.
Both ways of running a mixed batch are checked: one pass with sparse corrections, and
per task with the working copy patched between the pieces. The worker runs the backbone
with BatchNorm folded into its convs, so every check here is also one of the folding.
"""

import random

import pytest
import torch
from torch.func import functional_call

from piggyback_serve.masks import inference
from piggyback_serve.masks.backbones import BACKBONES, load_backbone
from piggyback_serve.server.engine.config import WorkerConfig
from piggyback_serve.server.engine.placement import place
from piggyback_serve.server.engine.task_state import TaskState
from piggyback_serve.server.engine.worker import Row, Worker
from piggyback_serve.server.settings import Settings
from tests.server.server_support import make_artifact

SIZE = 32
# "third": past task_state.DENSE_FRACTION, a per-task engine keeps it as a bitmap.
KEEP = {"dense": 1.0, "one": 0.99, "ten": 0.9, "fifth": 0.8, "third": 0.67}


def start_engine(name: str, mixed_batches: str = "one-pass") -> Worker:
    config = WorkerConfig(0, "cpu", "float32", 1, one_pass=mixed_batches == "one-pass")
    return Worker.local(config, load_backbone(name, "random"))


def with_bn(artifact, backbone, seed: int):
    """The artifact with its own BatchNorm tensors (perturbed copies of the backbone's)."""
    g = torch.Generator().manual_seed(seed)
    state = backbone.module.state_dict()
    for key, tensor in state.items():
        if key.endswith(("running_mean", "running_var", "weight", "bias")):
            layer = key.rpartition(".")[0]
            if f"{layer}.running_var" in state and tensor.dim() == 1:
                noise = 1 + 0.2 * torch.rand(tensor.shape, generator=g)
                artifact.bn[key] = tensor * noise
    return artifact


def features(backbone, artifact, x):
    params = inference.materialise(artifact, backbone)
    backbone_params = {k: v for k, v in params.items() if k not in inference.TASK_HEAD}
    with torch.inference_mode():
        return functional_call(backbone.module, backbone_params, (x,), strict=False)


def expected(backbone, artifact, x):
    params = inference.materialise(artifact, backbone)
    with torch.inference_mode():
        return torch.softmax(inference.forward(backbone, params, x), -1)


@pytest.fixture(scope="module", params=["one-pass", "per-task"])
def resnet(request):
    reference = load_backbone("resnet18", "random")
    engine = start_engine("resnet18", request.param)
    arts = {
        name: make_artifact(reference, name, n_labels=3 + i, seed=i, input_size=SIZE, keep=keep)
        for i, (name, keep) in enumerate(KEEP.items())
    }
    arts["bn"] = with_bn(make_artifact(reference, "bn", seed=9, input_size=SIZE), reference, 9)
    states = {name: engine.prepare(art) for name, art in arts.items()}
    return reference, engine, arts, states


def run(engine, states, names, x):
    return engine.step([Row((n, "1"), states[n]) for n in names], x)


def check(reference, arts, names, x, got):
    for i, name in enumerate(names):
        want = expected(reference, arts[name], x[i : i + 1])[0]
        assert torch.allclose(got[i], want, atol=1e-4, rtol=0), (name, got[i], want)


def test_random_mixes_answer_as_each_task_alone(resnet):
    reference, engine, arts, states = resnet
    rng = random.Random(0)
    x = torch.randn(8, 3, SIZE, SIZE)
    for _ in range(6):
        names = [rng.choice(list(arts)) for _ in range(8)]
        check(reference, arts, names, x, run(engine, states, names, x))
    assert engine.stats.mixed >= 6


@pytest.mark.parametrize(
    "names",
    [
        ["ten"] * 8,  # one task: the plain forward
        ["fifth"] * 5 + ["one", "dense", "ten"],  # a majority task leads the working copy
        ["one", "ten", "fifth", "dense"] * 2,  # no majority: the pristine backbone leads
        ["bn"] * 5 + ["ten", "ten", "one"],  # a per-task-BN task leads
        ["ten", "bn", "ten", "bn", "one", "dense", "fifth", "ten"],  # BN in the tail
    ],
)
def test_each_shape_of_batch(resnet, names):
    reference, engine, arts, states = resnet
    x = torch.randn(len(names), 3, SIZE, SIZE)
    check(reference, arts, names, x, run(engine, states, names, x))


def test_the_lead_is_the_majority_task_or_the_pristine_backbone(resnet):
    _, engine, _, states = resnet
    if not engine.one_pass:
        pytest.skip("per-task batches have no lead")
    x = torch.randn(4, 3, SIZE, SIZE)
    run(engine, states, ["fifth", "fifth", "fifth", "one"], x)
    assert engine.working.patched == ("fifth", "1")
    x = torch.randn(5, 3, SIZE, SIZE)
    run(engine, states, ["fifth", "fifth", "one", "ten", "ten"], x)
    assert engine.working.patched is None  # no majority: every row corrects its own task


def test_per_task_pieces_start_with_the_task_already_patched(resnet):
    _, engine, _, states = resnet
    if engine.one_pass:
        pytest.skip("one-pass batches patch the copy to their lead")
    x = torch.randn(4, 3, SIZE, SIZE)
    run(engine, states, ["one", "one"], x[:2])
    switches = engine.stats.switches
    run(engine, states, ["ten", "one", "ten", "one"], x)
    assert engine.stats.switches == switches + 1  # "one" ran first, then one patch to "ten"
    assert engine.working.patched == ("ten", "1")


def test_auto_runs_per_task_on_the_cpu():
    settings = Settings(backbone="resnet18", device="cpu", engine_workers=3)
    auto, one_pass = (
        place(settings),
        place(settings.model_copy(update={"mixed_batches": "one-pass"})),
    )
    assert [c.one_pass for c in auto] == [False] * 3 and [c.one_pass for c in one_pass] == [
        True
    ] * 3
    assert [c.index for c in auto] == [0, 1, 2] and {c.threads for c in auto} == {1}


def test_switching_back_restores_the_pristine_weights_exactly(resnet):
    _, engine, _, states = resnet
    x = torch.randn(2, 3, SIZE, SIZE)
    for name in ("fifth", "third", "one", "third", "bn", "ten"):
        run(engine, states, [name, name], x)
    assert engine.working.patched == ("ten", "1")
    assert not torch.equal(engine.working.flat, engine.working.base)
    engine.working.reset()
    assert torch.equal(engine.working.flat, engine.working.base)
    assert all(affine.task is None for affine in engine.working.affines)


def test_a_task_state_is_a_sparse_patch(resnet):
    reference, engine, arts, states = resnet
    total = sum(w.numel() for w in reference.maskable().values())
    state: TaskState = states["ten"]
    off = state.zeroed.numel()
    assert 0.09 * total < off < 0.11 * total
    # int32 position per switched-off weight, and for one pass an int32 input offset and an
    # int16 channel; no dense copy.
    per_weight = 10 if engine.one_pass else 4
    assert state.has_corrections == engine.one_pass
    head = state.head_weight.nbytes + state.head_bias.nbytes
    assert state.nbytes == per_weight * off + head + 8 * len(reference.maskable())
    assert states["dense"].zeroed.numel() == 0
    third = states["third"]  # a third off: positions for one pass, a bitmap per task
    assert (third.off_bits is None) == engine.one_pass
    if third.off_bits is not None:
        assert third.zeroed.numel() == 0 and third.off_bits.numel() == (total + 7) // 8


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["one-pass", "per-task"])
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_mixes_exactly(name, mode):
    """Features of a mixed batch equal each task's alone by the unfolded reference, on every
    registered backbone, BatchNorm folded, with and without a task's own BatchNorm."""
    reference = load_backbone(name, "random")
    engine = start_engine(name, mode)
    assert all(site.folded for site in engine.layout.norms)  # every BN follows a conv here
    size = 64 if name == "mobilenet_v3_large" else SIZE
    x = torch.randn(6, 3, size, size)
    arts = {}
    for i, keep in enumerate((0.99, 0.9, 0.8)):
        art = make_artifact(reference, f"t{i}", seed=i, input_size=size, keep=keep)
        if i == 2:
            art = with_bn(art, reference, seed=i)
        # Random-init features can be tiny (mobilenet: ~1e-10): scale each head to them so
        # that the probabilities compared below carry the features' differences.
        scale = features(reference, art, x).std().clamp_min(1e-30)
        art.head_weight = art.head_weight / scale
        arts[art.task] = art
    states = {n: engine.prepare(a) for n, a in arts.items()}
    names = ["t0", "t1", "t2", "t1", "t0", "t2"]
    check(reference, arts, names, x, run(engine, states, names, x))
    alone = [expected(reference, arts[n], x[:1])[0] for n in ("t0", "t1", "t2")]
    assert not torch.allclose(alone[0][:3], alone[1][:3], atol=1e-3)  # the tasks do differ


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_storage_positions_address_each_weight_in_the_working_copy(name):
    """Row-major views (linears, 1x1 and depthwise convs) take a shortcut; all must agree
    with the weight as the module sees it."""
    engine = start_engine(name)
    slots = engine.layout.slots
    for slot, layer in zip(slots, engine.working.layers, strict=True):
        weight = layer.weight.reshape(-1)  # row-major order, whatever the layout
        logical = torch.arange(0, slot.numel, max(1, slot.numel // 997))
        got = engine.working.flat[slot.storage_positions(logical)]
        assert torch.equal(got, weight[logical]), slot.name
    assert any(s.row_major for s in slots)
    assert not all(s.row_major for s in slots)


@pytest.mark.slow
def test_a_compiled_worker_follows_the_patched_weights():
    """torch.compile keeps the working copy as the module's parameters: a switch in place
    changes what the compiled forward computes, exactly as eagerly."""
    reference = load_backbone("resnet18", "random")
    arts = [make_artifact(reference, f"t{i}", seed=i, input_size=SIZE, keep=0.9) for i in (0, 1)]
    workers = [
        Worker.local(WorkerConfig(0, "cpu", "float32", 1, one_pass=False, compile=c), reference)
        for c in (False, True)
    ]
    x = torch.randint(0, 256, (3, 3, SIZE, SIZE), dtype=torch.uint8)
    answers = []
    for worker in workers:
        states = {a.task: worker.prepare(a) for a in arts}
        names = ["t0", "t1", "t0"]  # two switches
        answers.append([worker.step([Row((n, "1"), states[n])] * 3, x)[0] for n in names])
    for eager, compiled in zip(*answers, strict=True):
        assert torch.allclose(eager, compiled, atol=1e-5, rtol=0)
    assert not torch.allclose(answers[1][0], answers[1][1], atol=1e-3)  # the switch showed
