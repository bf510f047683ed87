"""The KServe v2 messages as Python classes, from the compiled .proto in a private pool
(generate.py says why not protoc's `_pb2.py`)."""

from __future__ import annotations

import base64

from google.protobuf import descriptor_pool

from piggyback_serve.server.oip_grpc._descriptor import SERIALIZED

SERVICE = "inference.GRPCInferenceService"

_pool = descriptor_pool.DescriptorPool()
_pool.AddSerializedFile(base64.b64decode(SERIALIZED))


def _message(name: str) -> type:
    descriptor = _pool.FindMessageTypeByName(f"inference.{name}")
    try:
        from google.protobuf.message_factory import GetMessageClass
    except ImportError:  # protobuf before 4.22
        from google.protobuf.message_factory import MessageFactory

        return MessageFactory(_pool).GetPrototype(descriptor)
    return GetMessageClass(descriptor)


ServerLiveRequest = _message("ServerLiveRequest")
ServerLiveResponse = _message("ServerLiveResponse")
ServerReadyRequest = _message("ServerReadyRequest")
ServerReadyResponse = _message("ServerReadyResponse")
ModelReadyRequest = _message("ModelReadyRequest")
ModelReadyResponse = _message("ModelReadyResponse")
ServerMetadataRequest = _message("ServerMetadataRequest")
ServerMetadataResponse = _message("ServerMetadataResponse")
ModelMetadataRequest = _message("ModelMetadataRequest")
ModelMetadataResponse = _message("ModelMetadataResponse")
ModelInferRequest = _message("ModelInferRequest")
ModelInferResponse = _message("ModelInferResponse")
RepositoryIndexRequest = _message("RepositoryIndexRequest")
RepositoryIndexResponse = _message("RepositoryIndexResponse")
InferParameter = _message("InferParameter")

# method name -> (request class, response class)
METHODS = {
    name: (_message(f"{name}Request"), _message(f"{name}Response"))
    for name in (
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "RepositoryIndex",
    )
}
