"""Fashion-MNIST trained longer on more data (issue 12, part 4): how sparse do masks get?

One mode per run (they are long); each appends a JSON line to --results:

    nice -n 10 python -m bench.long_training --mode piggyback --epochs 10 \
        --train-size 20000 --artifact fashion_long.safetensors

Uses today's masks.train exactly as `piggy-masks train` does; only the split size differs
(the CLI's demo loader takes 5,000 training images).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from piggyback_serve.masks import artifact, data, demo, train
from piggyback_serve.masks.backbones import load_backbone


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mode", choices=train.MODES, default="piggyback")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--test-size", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--artifact", help="piggyback only: write the task here")
    p.add_argument("--results", default="bench/results/tmp/long_training.jsonl")
    args = p.parse_args(argv)
    backbone = load_backbone(demo.DEMO_BACKBONE)
    dataset = data.fashion_mnist(args.seed, args.train_size, args.test_size)
    config = train.TrainConfig(
        mode=args.mode, epochs=args.epochs, seed=args.seed, device=args.device
    )
    result = train.train(backbone, dataset, config)
    row = {
        "mode": args.mode,
        "train": len(dataset.train.targets),
        "test": len(dataset.test.targets),
        "epochs": args.epochs,
        "accuracy": result.accuracy,
        "sparsity": result.sparsity,
        "seconds": round(result.seconds),
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "config": {k: v for k, v in asdict(config).items() if k not in ("device", "progress")},
    }
    if args.artifact and args.mode == "piggyback":
        task = train.to_artifact(result, backbone, dataset, config, "fashion_mnist_long")
        row["artifact_bytes"] = artifact.write(task, args.artifact).stat().st_size
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
