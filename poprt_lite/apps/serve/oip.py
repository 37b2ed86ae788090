"""The Open Inference Protocol (KServe v2; Triton's HTTP API) for tensor models such as BERT-QA.

`POST /v2/models/{name}/infer` takes the model's token inputs as tensors `[rows, seq]` (or `[seq]`),
in JSON `data` or in Triton's binary-tensor extension (`Inference-Header-Content-Length`: a JSON
header, then each input's raw little-endian bytes). Each row is one request of its own length: the
whole row, or its first `sum(attention_mask[row])` tokens when an `attention_mask` input is given
(1s then 0s: a right-padded batch). The rows are queued together on the runner and answered in
order: per-token outputs `[rows, seq, ...]` (positions past a row's length are 0), per-request
outputs `[rows, ...]`, as FP32, in JSON or binary (an output's `binary_data` parameter, or the
request's `binary_data_output`, which tritonclient sets when it names no outputs).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response

from poprt_lite import __version__
from poprt_lite.apps.serve.engine import Call, Engine
from poprt_lite.vocab import Layout

if TYPE_CHECKING:
    from poprt_lite.apps.serve.app import Front

HEADER_LENGTH = "inference-header-content-length"
DATATYPES = {"INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "BOOL": np.bool_}


def add_routes(app: FastAPI, front: Front) -> None:
    from poprt_lite.apps.serve.app import ServeError

    def model(name: str) -> Engine:
        engine = front.engine
        if name != engine.model_id:
            raise ServeError(404, "not_found", f"model '{name}' is not served here; this server serves '{engine.model_id}'")
        return engine

    def answer(build) -> Response:
        try:
            return Response(json.dumps(build()), media_type="application/json")
        except ServeError as error:
            return front.refuse(error)

    @app.get("/v2")
    async def server_metadata() -> Response:
        return answer(lambda: {"name": "poprt-lite", "version": __version__, "extensions": ["binary_tensor_data"]})

    @app.get("/v2/health/live")
    async def live() -> Response:
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return Response(status_code=200 if front.ready else 503)

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str = "1") -> Response:
        return answer(lambda: metadata(model(name)))

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str = "1") -> Response:
        try:
            model(name)
        except ServeError as error:
            return front.refuse(error)
        return Response(status_code=200 if front.ready else 503)

    @app.post("/v2/models/{name}/infer")
    @app.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(name: str, request: Request, version: str = "1") -> Response:
        def prepare(parsed):
            engine = model(name)
            header, feeds, seq = parsed
            n = len(feeds)
            if n > front.limits.max_client_batch_size:
                raise ServeError(422, "validation", f"batch size {n} > maximum allowed batch size {front.limits.max_client_batch_size}")
            outputs = requested_outputs(engine, header)
            front.admit(n)
            try:
                return n, engine.submit(feeds, list(outputs)), (engine, header, outputs, seq)
            except BaseException:
                front.release(n)
                raise

        return await front.call(request, None, prepare, respond, parsed_body=lambda body, headers: parse(model(name), body, headers))


def metadata(engine: Engine) -> dict[str, Any]:
    io = engine.interface
    inputs = [{"name": name, "datatype": _datatype(t.dtype), "shape": [-1, -1, *t.trailing]} for name, t in io.token_inputs.items()]
    if io.mask is not None:
        inputs.append({"name": io.mask[0], "datatype": _datatype(io.mask[1]), "shape": [-1, -1]})
    outputs = [
        {"name": name, "datatype": "FP32", "shape": [-1, *o.trailing] if o.layout is Layout.per_request else [-1, -1, *o.trailing]}
        for name, o in io.outputs.items()
    ]
    return {"name": engine.model_id, "versions": ["1"], "platform": "onnxruntime_onnx", "inputs": inputs, "outputs": outputs}


def parse(engine: Engine, body: bytes, headers) -> tuple[dict, list[dict[str, np.ndarray]], int]:
    """The infer request's JSON header, one feeds dict per row, and the rows' length."""
    from poprt_lite.apps.serve.app import ServeError

    def refuse(message: str):
        raise ServeError(422, "validation", message)

    length = headers.get(HEADER_LENGTH)
    split = int(length) if length is not None and length.isdigit() else len(body)
    if split > len(body):
        refuse(f"{HEADER_LENGTH} {split} is larger than the body ({len(body)} bytes)")
    try:
        header = json.loads(body[:split])
    except ValueError as exc:
        refuse(f"the request's JSON header is not valid JSON ({exc})")
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list) or not header["inputs"]:
        refuse("an infer request needs `inputs`: a list of tensors {name, shape, datatype, data}")
    binary, offset, tensors = body[split:], 0, {}
    for tensor in header["inputs"]:
        name, shape, datatype = tensor.get("name"), tensor.get("shape"), tensor.get("datatype")
        if datatype not in DATATYPES:
            refuse(f"input '{name}' has datatype {datatype!r}; token inputs are INT64 or INT32")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape) or len(shape) not in (1, 2):
            refuse(f"input '{name}' has shape {shape!r}; token inputs are [rows, tokens] or [tokens]")
        size = (tensor.get("parameters") or {}).get("binary_data_size")
        dtype = np.dtype(DATATYPES[datatype]).newbyteorder("<")
        if size is not None:
            if size != int(np.prod(shape)) * dtype.itemsize or offset + size > len(binary):
                refuse(f"input '{name}': binary_data_size {size} does not hold shape {shape} of {datatype}")
            array = np.frombuffer(binary, dtype, int(np.prod(shape)), offset)
            offset += size
        else:
            try:
                array = np.asarray(tensor.get("data"), dtype)
            except (TypeError, ValueError):
                refuse(f"input '{name}' has data that is not {datatype}")
            if array.size != int(np.prod(shape)):
                refuse(f"input '{name}' has {array.size} values for shape {shape}")
        tensors[name] = array.reshape(shape if len(shape) == 2 else (1, *shape))
    io = engine.interface
    ids = tensors.get(io.dynamic_input)
    if ids is None:
        refuse(f"missing input '{io.dynamic_input}'")
    mask_name = io.mask[0] if io.mask is not None else None
    for name, array in tensors.items():
        if array.shape != ids.shape:
            refuse(f"input '{name}' has shape {list(array.shape)}; '{io.dynamic_input}' has {list(ids.shape)}")
    lengths = [ids.shape[1]] * ids.shape[0]
    mask = tensors.get(mask_name) if mask_name else None
    if mask is not None:
        lengths = [int(np.count_nonzero(row)) for row in mask]
        for i, (row, n) in enumerate(zip(mask, lengths, strict=True)):
            if not np.all(row[:n]):
                refuse(f"row {i} of '{mask_name}' is not 1s then 0s; each row is one right-padded request")
    feeds = []
    for row, n in enumerate(lengths):
        feeds.append({name: array[row, :n] for name, array in tensors.items() if name != mask_name})
    return header, feeds, ids.shape[1]


def requested_outputs(engine: Engine, header: dict) -> dict[str, bool]:
    """Output name -> sent as binary."""
    from poprt_lite.apps.serve.app import ServeError

    everything_binary = bool((header.get("parameters") or {}).get("binary_data_output", False))
    wanted = header.get("outputs")
    if not wanted:
        return {name: everything_binary for name in engine.interface.outputs}
    out = {}
    for tensor in wanted:
        name = tensor.get("name") if isinstance(tensor, dict) else None
        if name not in engine.interface.outputs:
            raise ServeError(422, "validation", f"unknown output {name!r}; the model's outputs are: {', '.join(engine.interface.outputs)}")
        out[name] = bool((tensor.get("parameters") or {}).get("binary_data", everything_binary))
    return out


def respond(state, call: Call) -> tuple[bytes, str]:
    engine, header, outputs, seq = state
    tensors, blobs = [], []
    for name, binary in outputs.items():
        spec = engine.interface.outputs[name]
        if spec.layout is Layout.per_request:
            array = call.outputs_block(name)
        else:
            array = np.zeros((len(call.outputs), seq, *spec.trailing), np.float32)
            for i, out in enumerate(call.outputs):
                array[i, : len(out[name])] = out[name]
        tensor = {"name": name, "datatype": "FP32", "shape": list(array.shape)}
        if binary:
            blob = np.ascontiguousarray(array, "<f4").tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = array.ravel().tolist()
        tensors.append(tensor)
    answer = {"model_name": engine.model_id, "model_version": "1", "outputs": tensors}
    if "id" in header:
        answer["id"] = header["id"]
    text = json.dumps(answer).encode()
    if not blobs:
        return text, "application/json", {}
    return text + b"".join(blobs), "application/octet-stream", {HEADER_LENGTH: str(len(text))}


def _datatype(dtype: np.dtype) -> str:
    return {np.dtype(v): k for k, v in DATATYPES.items()}.get(np.dtype(dtype), str(dtype).upper())

