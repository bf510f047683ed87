"""The single-model HTTP peer: LitServe serving one fine-tuned copy with its own batching.

Same images as ours, sent as multipart `file` fields (LitServe parses JSON or forms).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import litserve as ls
import torch

from bench.peers import common


class Classifier(ls.LitAPI):
    """Module level: LitServe pickles it into its inference worker process."""

    def __init__(self, options: dict, **kwargs):
        super().__init__(**kwargs)
        self.options = options

    def setup(self, device):
        o = self.options
        torch.set_num_threads(o["threads"])
        self.meta = common.read_meta(Path(o["models"]))
        self.labels = common.labels_of(o["task"], self.meta["n_labels"])
        self.model = common.load_full_model(
            Path(o["models"]) / f"{o['task']}.safetensors",
            self.meta["backbone"],
            self.meta["num_features"],
            self.meta["n_labels"],
            o["device"],
        )

    def decode_request(self, request):
        data = request["file"].file.read()
        return common.preprocess(data, self.meta["backbone"], self.meta["input_size"])

    def batch(self, inputs):
        return torch.stack(inputs)

    def predict(self, x):
        with torch.inference_mode():
            logits = self.model(x.to(self.options["device"]))
            return torch.softmax(logits.float(), -1).cpu()

    def unbatch(self, output):
        return list(output)

    def encode_response(self, probs):
        return {"task": self.options["task"], "results": [common.top_k(probs, self.labels)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--models", required=True, help="folder of NAME.safetensors + meta.json")
    p.add_argument("--task", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-delay-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    options = {k: getattr(args, k) for k in ("models", "task", "threads", "device")}
    api = Classifier(options, max_batch_size=args.batch, batch_timeout=args.max_delay_ms / 1000)
    accelerator = "cuda" if args.device.startswith("cuda") else "cpu"
    server = ls.LitServer(api, accelerator=accelerator, devices=1, workers_per_device=1, timeout=60)
    server.run(
        host="127.0.0.1",
        port=args.port,
        num_api_servers=1,
        generate_client_file=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
