"""The V2 inference protocol over gRPC, as a client of a served model: grpcio, with the messages and
the stub generated at import by grpcio-tools from tests/dataplane.proto (MLServer 1.1.0's copy of
KServe's grpc_predict_v2.proto). No mlserver in the test venv: the server alone speaks for itself."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import grpc

# Found on sys.path, as pytest puts tests/ there (`from support import …` relies on it too).
pb, services = grpc.protos_and_services("dataplane.proto")
# A proxy in the developer's environment (http_proxy, grpc_proxy) must not carry a loopback call.
OPTIONS = [("grpc.enable_http_proxy", 0)]
TIMEOUT = 30.0


@contextmanager
def stub(target: str) -> Iterator[Any]:
    """The GRPCInferenceService stub on `target` (host:port), plaintext as MLServer serves it."""
    with grpc.insecure_channel(target, options=OPTIONS) as channel:
        yield services.GRPCInferenceServiceStub(channel)


def ready(service: Any, model: str) -> tuple[bool, bool]:
    """ServerReady and ModelReady. The first call waits for the port: MLServer starts its gRPC
    server alongside the HTTP one, so it may listen a moment after /v2/health/ready answers."""
    server = service.ServerReady(pb.ServerReadyRequest(), timeout=TIMEOUT, wait_for_ready=True)
    model_ready = service.ModelReady(pb.ModelReadyRequest(name=model), timeout=TIMEOUT)
    return server.ready, model_ready.ready


def infer(service: Any, model: str, pixels: Sequence[float]) -> int:
    """One image as the HTTP test sends it (input `predict`, FP32, shape [1, 64]); its digit."""
    tensor = pb.ModelInferRequest.InferInputTensor(
        name="predict", datatype="FP32", shape=[1, len(pixels)], contents=pb.InferTensorContents(fp32_contents=pixels)
    )
    response = service.ModelInfer(pb.ModelInferRequest(model_name=model, inputs=[tensor]), timeout=TIMEOUT)
    (output,) = response.outputs
    assert response.model_name == model and output.datatype == "INT64" and list(output.shape) == [1], response
    (digit,) = output.contents.int64_contents
    return int(digit)


def digits(target: str, model: str, images: Sequence[Sequence[float]]) -> list[int]:
    """Each image's digit over one channel, once the server and the model say they are ready."""
    with stub(target) as service:
        assert ready(service, model) == (True, True)
        return [infer(service, model, pixels) for pixels in images]
