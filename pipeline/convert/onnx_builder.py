"""A tiny ONNX graph-building DSL and a weight store that streams tensors into external data files.

Weights never sit in the protobuf: each stage has one `<stage>.data` file, every tensor at a page-aligned
offset (so onnxruntime can memory-map it), and the prefill and decode graphs of a stage point at the same
file. A tensor already written for another stage (the tied embedding used by the output head) is reused.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17  # standard ops only; NPU toolchains commonly accept opset <= 17/18
IR_VERSION = 8  # the IR version that goes with opset 17, for older onnx readers
ALIGN = 4096

NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
              np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32,
              np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.int8): TensorProto.INT8}


class WeightStore:
    """Writes weight tensors into `<dir>/<file>.data` and hands out external-data TensorProtos."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.written: dict[str, TensorProto] = {}
        self._digests: dict[str, str] = {}
        self.hasher = hashlib.sha256()
        self.file_digests: dict[str, str] = {}  # file name -> sha256 of all its bytes (padding included)
        self._file = None
        self._file_name = None
        self._file_hash = None

    def open(self, file_name: str):
        self.close()
        self._file_name = file_name
        self._file = open(self.directory / file_name, "wb")
        self._file_hash = hashlib.sha256()

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None
            self.file_digests[self._file_name] = self._file_hash.hexdigest()

    def _write(self, data: bytes):
        self._file.write(data)
        self._file_hash.update(data)

    def add(self, key: str, shape: tuple[int, ...], dtype, chunks: Callable[[], Iterator[np.ndarray]]) -> TensorProto:
        """Store a tensor produced chunk by chunk (so a 600 MB table never needs 2x memory). Idempotent per key."""
        if key in self.written:
            return self.written[key]
        dtype = np.dtype(dtype)
        offset, length = self._append(np.ascontiguousarray(chunk, dtype=dtype).tobytes() for chunk in chunks())
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        assert length == expected, f"{key}: wrote {length} bytes, expected {expected}"
        return self._external(key, NP_TO_ONNX[dtype], shape, offset, length)

    def add_raw(self, tensor: TensorProto) -> TensorProto:
        """A built tensor's bytes (any data type, int4 included), stored once per name: graphs that share a weights
        file name the same tensor the same way (a name stored with other bytes is a bug, not a reuse)."""
        data = tensor.raw_data
        digest = hashlib.sha256(data).hexdigest()
        if tensor.name in self.written:
            if self._digests[tensor.name] != digest:
                raise ValueError(f"{tensor.name}: two graphs of one stage hold different tensors of this name")
            return self.written[tensor.name]
        self._digests[tensor.name] = digest
        offset, length = self._append([data])
        return self._external(tensor.name, tensor.data_type, tuple(tensor.dims), offset, length)

    def _append(self, pieces) -> tuple[int, int]:
        f = self._file
        f.seek(0, 2)
        offset = f.tell()
        pad = -offset % ALIGN
        if pad:
            self._write(b"\0" * pad)
            offset += pad
        length = 0
        for data in pieces:
            self.hasher.update(data)
            self._write(data)
            length += len(data)
        return offset, length

    def _external(self, key: str, data_type: int, shape, offset: int, length: int) -> TensorProto:
        t = TensorProto()
        t.name = key
        t.data_type = data_type
        t.dims.extend(shape)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self._file_name), ("offset", str(offset)), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = k, v
        self.written[key] = t
        return t


class GraphBuilder:
    """Accumulates nodes; `op()` returns output names so graphs read like straight-line numpy."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, TensorProto] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.domains: set[str] = set()  # non-default op domains used (com.microsoft for quantized matmuls)
        self._count = 0

    def input(self, name: str, dtype, shape) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, NP_TO_ONNX[np.dtype(dtype)], list(shape)))
        return name

    def output(self, value: str, name: str, dtype, shape):
        self.op("Identity", value, out_name=name)
        self.outputs.append(helper.make_tensor_value_info(name, NP_TO_ONNX[np.dtype(dtype)], list(shape)))

    def op(self, op_type: str, *inputs: str, n_out: int = 1, out_name: str | None = None, domain: str = "",
           **attrs):
        self._count += 1
        outs = [out_name] if out_name else [f"{op_type.lower()}_{self._count}_{i}" for i in range(n_out)]
        if domain:
            self.domains.add(domain)
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=f"{op_type}_{self._count}",
                                           domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype=np.int64) -> str:
        """A small inline constant (shapes, axes, scalars)."""
        self._count += 1
        name = f"const_{self._count}"
        self.initializers[name] = numpy_helper.from_array(np.asarray(value, dtype=dtype), name)
        return name

    def weight(self, tensor: TensorProto) -> str:
        self.initializers[tensor.name] = tensor
        return tensor.name

    def to_model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, list(self.initializers.values()))
        opsets = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, 1) for d in sorted(self.domains)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="stagepipe")
        model.ir_version = IR_VERSION
        return model
