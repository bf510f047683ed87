"""Fashion-MNIST trained longer on more data: how sparse masks get, and what it costs the
artifact. Each mode of masks.train exactly as `piggy-masks train` runs it; only the split
size and the epochs differ. Hours on a CPU: it runs only when named
(`python -m bench --scenarios long_training`), and needs Debian's dataset-fashion-mnist.
"""

from __future__ import annotations

from piggyback_serve.masks import artifact, data, demo, train
from piggyback_serve.masks.backbones import load_backbone

FULL = {"train_size": 20_000, "test_size": 10_000, "epochs": 10}
QUICK = {"train_size": 200, "test_size": 100, "epochs": 1}


def measure(ctx) -> dict:
    plan = QUICK if ctx.options.quick else FULL
    if not data.fashion_mnist_available():
        raise RuntimeError("Fashion-MNIST is not installed (Debian package dataset-fashion-mnist)")
    backbone = load_backbone(demo.DEMO_BACKBONE)
    dataset = data.fashion_mnist(0, plan["train_size"], plan["test_size"])
    runs = []
    for mode in train.MODES:
        config = train.TrainConfig(mode=mode, epochs=plan["epochs"], seed=0, device=ctx.device)
        result = train.train(backbone, dataset, config)
        size = None
        if mode == "piggyback":
            task = train.to_artifact(result, backbone, dataset, config, "fashion_mnist_long")
            size = len(artifact.to_bytes(task))
        runs.append(
            {
                "mode": mode,
                "train": len(dataset.train.targets),
                "test": len(dataset.test.targets),
                "epochs": result.epochs or config.epochs,
                "accuracy": result.accuracy,
                "sparsity": result.sparsity,
                "artifact_bytes": size,
                "seconds": result.seconds,
            }
        )
    return {"runs": runs}


def summarize(raw: dict) -> dict:
    rows = [
        [
            r["mode"],
            r["train"],
            r["test"],
            r["epochs"],
            100 * r["accuracy"],
            100 * r["sparsity"] if r["mode"] == "piggyback" else None,
            r["artifact_bytes"],
            r["seconds"],
        ]
        for r in raw["runs"]
    ]
    return {"tables": {"runs": rows}}
