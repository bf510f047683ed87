"""The bundled demo tasks as they ship: held-out accuracy and sparsity from each artifact's
metadata (written by the training run that made it), bytes from the file itself."""

from __future__ import annotations

from safetensors import safe_open

from piggyback_serve.masks import artifact, demo


def measure(ctx) -> dict:
    tasks = []
    for path in sorted(demo.BUNDLED_DIR.glob("*.safetensors")):
        art = artifact.read(path)
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        masked = art.metrics.get("masked_params")
        tasks.append(
            {
                "task": path.stem,
                "file_bytes": path.stat().st_size,
                "format": header.get("format"),
                "backbone": art.backbone,
                "input_size": art.input_size,
                "labels": len(art.labels),
                "created": art.created,
                "masked_params": masked,
                "metrics": art.metrics,
            }
        )
    return {"tasks": tasks}


def summarize(raw: dict) -> dict:
    rows = []
    for t in raw["tasks"]:
        m = t["metrics"]
        masked = t["masked_params"]
        rows.append(
            [
                t["task"],
                m.get("dataset"),
                f"{m.get('train_size')} / {m.get('test_size')}",
                (m.get("config") or {}).get("epochs"),
                100 * m["accuracy"] if "accuracy" in m else None,
                100 * m["sparsity"] if "sparsity" in m else None,
                t["file_bytes"],
                8 * t["file_bytes"] / masked if masked else None,
                t["format"],
                t["backbone"],
                t["input_size"],
                t["created"],
            ]
        )
    return {"tables": {"tasks": rows}}
