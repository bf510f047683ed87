"""train() driven by a training job: progress after every step, cancel by raising from the
callback, a checkpoint after every epoch, and a resumed run equal to one never interrupted."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import safetensors
import torch

from piggyback_serve.masks import data, train


class Cancelled(Exception):
    pass


@pytest.fixture(autouse=True)
def _one_thread():
    """As the CLI and the server's trainer run: one thread (and quicker on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def faces():
    """40 training images (3 batches of 16: the last one short), 24 to test on."""
    full = data.faces()
    return replace(
        full,
        train=data.Split(full.train.images[:40], full.train.targets[:40]),
        test=data.Split(full.test.images[:24], full.test.targets[:24]),
    )


def config(**changes) -> train.TrainConfig:
    # A threshold just under the scores' init: the first steps switch weights off, so the
    # masks compared below are not all ones.
    small = dict(epochs=2, min_steps=0, batch_size=16, input_size=32, threshold=9.95e-3)
    return train.TrainConfig(**{**small, "progress": False, **changes})


def cancel_at(step: int, seen: list[train.Progress]):
    def on_step(progress: train.Progress) -> None:
        seen.append(progress)
        if progress.step == step:
            raise Cancelled(f"cancelled at step {step}")

    return on_step


def test_progress_after_every_step(lite0, faces):
    seen: list[train.Progress] = []
    # min_steps raises 1 epoch to 2: 3 batches an epoch, 6 steps.
    result = train.train(lite0, faces, config(epochs=1, min_steps=5), on_step=seen.append)
    assert result.epochs == 2
    assert [(p.step, p.steps, p.epoch, p.epochs) for p in seen] == [
        (1, 6, 1, 2),
        (2, 6, 1, 2),
        (3, 6, 1, 2),
        (4, 6, 2, 2),
        (5, 6, 2, 2),
        (6, 6, 2, 2),
    ]
    assert all(isinstance(p.loss, float) and math.isfinite(p.loss) and p.loss > 0 for p in seen)
    with pytest.raises(AttributeError):
        seen[0].step = 7  # frozen


def test_a_raising_callback_stops_the_run(lite0, faces, tmp_path):
    seen: list[train.Progress] = []
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(Cancelled, match="at step 2"):
        train.train(lite0, faces, config(), on_step=cancel_at(2, seen), checkpoint=ckpt)
    assert [p.step for p in seen] == [1, 2]
    assert not ckpt.exists()  # epoch 1 never ended
    assert list(tmp_path.iterdir()) == []  # no temp file left either


def state(result: train.TrainResult) -> dict[str, torch.Tensor]:
    model = result.model
    tensors = dict(model.state_dict())
    if isinstance(model, train.PiggybackModel):
        tensors.update({f"mask/{k}": m for k, m in model.masks().items()})
        tensors.update({f"bn_buffers/{k}": b for k, b in model.bn_buffers.items()})
    return tensors


@pytest.mark.parametrize(
    "changes",
    [{}, {"train_bn": True, "epochs": 3}, {"mode": "finetune"}],
    ids=["piggyback", "piggyback-bn-3-epochs", "finetune"],
)
def test_a_resumed_run_ends_as_an_uninterrupted_one(lite0, faces, tmp_path, changes):
    cfg = config(**changes)
    whole = train.train(lite0, faces, cfg)
    ckpt = tmp_path / "run.ckpt"
    seen: list[train.Progress] = []
    with pytest.raises(Cancelled):  # in the second epoch, after its first step
        train.train(lite0, faces, cfg, on_step=cancel_at(4, seen), checkpoint=ckpt)
    assert meta(ckpt)["epoch"] == "1"
    torch.manual_seed(123)  # the global RNG comes from the checkpoint, not from here
    resumed = train.train(lite0, faces, cfg, on_step=seen.append, checkpoint=ckpt)
    steps = 3 * resumed.epochs
    # The resumed run starts at the second epoch's first step: step 4 runs again.
    assert [p.step for p in seen] == [1, 2, 3, 4, *range(4, steps + 1)]
    assert [p.epoch for p in seen[4:]] == [2] * 3 + [3] * (steps - 6)
    assert resumed.accuracy == whole.accuracy and resumed.sparsity == whole.sparsity
    if cfg.mode == "piggyback":
        assert 0 < whole.sparsity < 1  # the masks compared are not trivial
    expected, got = state(whole), state(resumed)
    assert expected.keys() == got.keys()
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []
    assert meta(ckpt)["epoch"] == str(resumed.epochs)


def test_a_finished_runs_checkpoint_gives_its_result_without_a_step(lite0, faces, tmp_path):
    ckpt = tmp_path / "run.ckpt"
    first = train.train(lite0, faces, config(), checkpoint=ckpt)
    seen: list[train.Progress] = []
    again = train.train(lite0, faces, config(), on_step=seen.append, checkpoint=ckpt)
    assert seen == []  # both epochs were done
    assert again.accuracy == first.accuracy
    expected, got = state(first), state(again)
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []


def meta(path) -> dict[str, str]:
    with safetensors.safe_open(path, framework="pt") as f:
        return f.metadata()


def test_the_checkpoint_is_safetensors_without_pickle(lite0, faces, tmp_path):
    ckpt = tmp_path / "run.ckpt"
    result = train.train(lite0, faces, config(train_bn=True), checkpoint=ckpt)
    raw = ckpt.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8 : 8 + header])["__metadata__"]["format"] == train.CHECKPOINT_FORMAT
    assert b"\x80\x04" not in raw[:16] and not raw.startswith(b"PK")  # not pickle, not zip
    with safetensors.safe_open(ckpt, framework="pt") as f:
        keys = set(f.keys())
        metadata = f.metadata()
        shuffle = f.get_tensor("rng/shuffle")
        head = f.get_tensor("model/head.weight")
    assert metadata["epoch"] == "2" and len(metadata["fingerprint"]) == 64
    assert json.loads(metadata["scheduler"])["last_epoch"] == 2
    lrs = json.loads(metadata["lrs"])  # head, scores, BN; decayed once, after epoch 1
    assert lrs == pytest.approx([1e-4, 1e-5, 1e-4])
    assert shuffle.dtype == torch.uint8 and torch.equal(head, result.model.head.weight)
    assert {"optimizer/0/exp_avg", "optimizer/0/exp_avg_sq", "optimizer/0/step"} <= keys
    assert "rng/torch" in keys and any(k.startswith("bn_buffers/") for k in keys)
    assert any(k.startswith("model/scores.") for k in keys)
    assert [p.name for p in tmp_path.iterdir()] == ["run.ckpt"]


def test_a_checkpoint_of_another_run_is_refused(lite0, faces, tmp_path):
    ckpt = tmp_path / "run.ckpt"
    seen: list[train.Progress] = []
    with pytest.raises(Cancelled):
        train.train(lite0, faces, config(), on_step=cancel_at(4, seen), checkpoint=ckpt)
    written = ckpt.read_bytes()
    relabelled = replace(faces, labels=["a", "b"])
    for cfg, dataset in [(config(lr_head=1e-2), faces), (config(), relabelled)]:
        with pytest.raises(train.CheckpointError, match="written by another run"):
            train.train(lite0, dataset, cfg, on_step=seen.append, checkpoint=ckpt)
    assert len(seen) == 4 and ckpt.read_bytes() == written  # no step ran, nothing overwritten
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(train.CheckpointError, match="unreadable"):
        train.train(lite0, faces, config(), checkpoint=ckpt)
