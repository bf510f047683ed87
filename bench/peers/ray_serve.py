"""The peer users run today: one full fine-tuned copy per task, in Ray Serve.

Copies are loaded on demand by `@serve.multiplexed` (an LRU of models per replica, here
`--max-models`) and batched per model by
`@serve.batch` (Ray splits a batch by multiplexed model id). One replica, local cluster,
HTTP on loopback. The model id travels in the `serve_multiplexed_model_id` header.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def build_app(args: argparse.Namespace):
    import torch
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse

    from bench.peers import common

    folder = Path(args.models)
    meta = common.read_meta(folder)

    @serve.deployment(num_replicas=1, max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
    class FineTuned:
        def __init__(self):
            # Ray pins OMP threads to the actor's CPUs; give torch what our engine gets.
            torch.set_num_threads(args.threads)
            self.device = args.device

        @serve.multiplexed(max_num_models_per_replica=args.max_models)
        async def get_model(self, model_id: str):
            return common.load_full_model(
                folder / f"{model_id}.safetensors",
                meta["backbone"],
                meta["num_features"],
                meta["n_labels"],
                self.device,
            )

        @serve.batch(max_batch_size=args.batch, batch_wait_timeout_s=args.max_delay_ms / 1000)
        async def predict(self, images: list[torch.Tensor]) -> list[dict]:
            model_id = serve.get_multiplexed_model_id()
            model = await self.get_model(model_id)
            with torch.inference_mode():
                logits = model(torch.stack(images).to(self.device))
                probs = torch.softmax(logits.float(), -1).cpu()
            labels = common.labels_of(model_id, meta["n_labels"])
            return [common.top_k(p, labels) for p in probs]

        async def __call__(self, request: Request):
            if request.method == "GET":
                return PlainTextResponse("ok")
            x = common.preprocess(await request.body(), meta["backbone"], meta["input_size"])
            result = await self.predict(x)
            return {"task": serve.get_multiplexed_model_id(), "results": [result]}

    return FineTuned.bind()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--models", required=True, help="folder of NAME.safetensors + meta.json")
    p.add_argument("--max-models", type=int, required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-delay-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    import ray
    from ray import serve

    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        object_store_memory=200 * 1024 * 1024,
        log_to_driver=False,
    )
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(build_app(args), route_prefix="/")
    print("ray peer ready", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
