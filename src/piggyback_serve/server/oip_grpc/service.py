"""GRPCInferenceService (KServe v2, package `inference`) over the same tasks as REST: a task is
a model. ModelInfer reads its one input into oip_infer's `Tensor` and calls oip_infer.infer,
the step REST's /v2/models/{name}/infer takes (and, through Services.classify, /predict);
the server's errors become gRPC status codes here, their message the details. Methods of
Triton's service beyond these answer UNIMPLEMENTED (grpc does that for unknown methods)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import SimpleNamespace

import grpc

from piggyback_serve.masks.errors import ArtifactError
from piggyback_serve.server import oip_infer
from piggyback_serve.server.auth import check_bearer
from piggyback_serve.server.catalog import Task
from piggyback_serve.server.errors import BadRequest, PayloadTooLarge, ServeError, TaskNotFound
from piggyback_serve.server.metrics import UNKNOWN_TASK
from piggyback_serve.server.oip_grpc import messages as pb
from piggyback_serve.server.oip_infer import OUTPUTS, SERVER_NAME, SERVER_VERSION, Tensor
from piggyback_serve.server.state import Services

log = logging.getLogger("piggy.serve")

# HTTP status (errors.py) -> gRPC status code. 413 is RESOURCE_EXHAUSTED, as grpc itself
# answers a message over the receive limit.
STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
    507: grpc.StatusCode.UNAVAILABLE,
}


@dataclass
class Call:
    """What one call notes for the metrics, as HTTP requests note it on request.state."""

    task: str = ""


class InferenceService:
    """One method per RPC, each `(request, context, call) -> response`; `handler()` wires
    them."""

    def __init__(self, svc: Services):
        self.svc = svc

    async def ServerLive(self, request, context, call):  # noqa: N802 - the protocol's names
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context, call):  # noqa: N802
        svc = self.svc
        return pb.ServerReadyResponse(ready=svc.ready and not svc.catalog.registry_error)

    async def ModelReady(self, request, context, call):  # noqa: N802
        # As REST's is_model_ready reads a 404: an unknown model is not ready, no error.
        try:
            self._task(request.name, call)
        except ServeError:  # unknown, or the server not ready
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request, context, call):  # noqa: N802
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=SERVER_VERSION, extensions=["model_repository"]
        )

    async def ModelMetadata(self, request, context, call):  # noqa: N802
        meta = oip_infer.model_metadata(self._task(request.name, call))
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=meta["inputs"],
            outputs=meta["outputs"],
        )

    async def ModelInfer(self, request, context, call):  # noqa: N802
        started = time.perf_counter()
        self._authorize(context)
        task = self._task(request.model_name, call)
        _check_size(request, self.svc.settings.max_body_bytes)
        tensor = _one_input(request)
        top_k = _param(request.parameters.get("top_k"))
        if top_k is None:  # not sent (protobuf has no null)
            top_k = oip_infer.DEFAULT_TOP_K
        wanted = [o.name for o in request.outputs] or list(OUTPUTS)
        for name in wanted:
            if name not in OUTPUTS:
                raise BadRequest(f"unknown output {name!r}; this model has `labels` and `scores`")
        answer = await oip_infer.infer(self.svc, task, tensor, top_k, started)
        response = pb.ModelInferResponse(
            model_name=answer.task.name, model_version=answer.task.version, id=request.id
        )
        response.parameters["latency_ms"].double_param = answer.latency_ms
        for name in wanted:
            response.outputs.add(name=name, datatype=OUTPUTS[name], shape=answer.shape)
            raw = answer.labels_raw() if name == "labels" else answer.scores_raw()
            response.raw_output_contents.append(raw)
        return response

    async def RepositoryIndex(self, request, context, call):  # noqa: N802
        tasks = sorted(self.svc.require_catalog().tasks.items())
        models = [{"name": n, "version": t.version, "state": "READY"} for n, t in tasks]
        return pb.RepositoryIndexResponse(models=models)

    def _task(self, name: str, call: Call) -> Task:
        """The task a call names, noted on it as Services.find_task notes it on a request."""
        try:
            task = self.svc.require_catalog().get(name)
        except TaskNotFound:
            call.task = UNKNOWN_TASK
            raise
        call.task = task.name
        return task

    def _authorize(self, context) -> None:
        """The predict token (or the admin token), when one is set, as `authorization:
        Bearer ...` metadata; auth.check_bearer reads it as it reads the HTTP header."""
        settings = self.svc.settings
        if settings.predict_token is None:
            return
        metadata = {k.lower(): v for k, v in context.invocation_metadata() or ()}
        headers = {"authorization": metadata.get("authorization", "")}
        tokens = settings.predict_token, settings.admin_token
        check_bearer(SimpleNamespace(headers=headers), "predict", *tokens)

    def handler(self) -> grpc.GenericRpcHandler:
        methods = {
            name: grpc.unary_unary_rpc_method_handler(
                self._answering(name, getattr(self, name)),
                request_deserializer=request.FromString,
                response_serializer=response.SerializeToString,
            )
            for name, (request, response) in pb.METHODS.items()
        }
        return grpc.method_handlers_generic_handler(pb.SERVICE, methods)

    def _answering(self, name: str, method: Callable[..., Awaitable]):
        """`method` with the server's errors turned into gRPC status codes, and counted in
        the same metrics as HTTP requests (route `/inference.GRPCInferenceService/NAME`)."""
        route = f"/{pb.SERVICE}/{name}"
        metrics = self.svc.metrics

        async def answer(request, context):
            started, status, code, call = time.perf_counter(), 200, None, Call()
            try:
                return await method(request, context, call)
            except asyncio.CancelledError:  # the client went away or its deadline passed
                status, code = 499, "cancelled"
                raise
            except ServeError as exc:
                status, code, message = exc.status, exc.code, exc.message
                if retry_after := exc.headers.get("Retry-After"):
                    context.set_trailing_metadata((("retry-after", retry_after),))
            except ArtifactError as exc:
                status, code, message = 422, "invalid_artifact", str(exc)
            except Exception:
                log.exception("unexpected error on gRPC %s", name)
                status, code, message = 500, "internal_error", "internal server error"
            finally:
                task = call.task
                metrics.latency.labels(route, "grpc", f"{status // 100}xx", task).observe(
                    time.perf_counter() - started
                )
                metrics.requests.labels(route, task, str(status)).inc()
                if code:
                    metrics.errors.labels(task, code).inc()
            await context.abort(STATUS.get(status, grpc.StatusCode.UNKNOWN), message)

        return answer


def _check_size(request, limit: int) -> None:
    """PIGGY_MAX_BODY_BYTES on the message, as on an HTTP body (grpc's receive limit, a
    little above it, stops larger messages before they are read whole)."""
    size = request.ByteSize()
    if size > limit:
        raise PayloadTooLarge(
            f"request message of {size:,} bytes is over the server's limit of {limit:,} bytes "
            "(PIGGY_MAX_BODY_BYTES)"
        )


def _one_input(request) -> Tensor:
    """The request's single input: its raw contents, or its typed contents (bytes or FP32)."""
    if len(request.inputs) != 1:
        got = len(request.inputs)
        raise BadRequest(f"send exactly one input, `image` or `pixels`; got {got}")
    raws = request.raw_input_contents
    if raws and len(raws) != len(request.inputs):
        raise BadRequest(f"{len(raws)} raw_input_contents for {len(request.inputs)} inputs")
    first = request.inputs[0]
    tensor = Tensor(first.name, first.datatype, list(first.shape), raws[0] if raws else None)
    oip_infer.check_input(tensor)
    if tensor.raw is None:
        contents = first.contents
        tensor.elements = list(
            contents.bytes_contents if tensor.name == "image" else contents.fp32_contents
        )
    return tensor


def _param(parameter):
    """An InferParameter's value (None: not sent)."""
    if parameter is None:
        return None
    kind = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, kind) if kind else None
