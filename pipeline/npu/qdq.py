"""Static QDQ quantization of one stage's graphs with onnxruntime's tooling, calibrated on a run set's dumps.

Per stage: the activation ranges are calibrated once (onnxruntime's MinMax calibrator over the prefill samples on a
prefill graph and the decode samples on a decode graph, the ranges merged), saved as onnxruntime's calibration
cache, and every graph of the stage (prefill, decode, each attention window) is quantized by quantize_static from
that one cache: same scales, same quantized weights, so the graphs still share one weights file.

Schemes (QuantizeLinear/DequantizeLinear in the default domain):
  w8a8   int8 weights per output channel, int8 activations per tensor                     opset 17 (as converted)
  w8a16  int8 weights per output channel, int16 activations (standard only from opset 21) opset 21
  w4a16  int4 weights in blocks of 32 input features, int16 activations                  opset 21
onnxruntime places the Q/DQ nodes and quantizes the activations; the Gemm weights are quantized here (vectorized:
onnxruntime computes per-channel scales one channel at a time in Python, and blocks int4 weights of a transposed
Gemm along the output axis). The int4 blocks run along the input features, as group quantization does everywhere,
with the clip-searched scales of pipeline/convert/quantize.py: QDQ w4a16 weights equal the MatMulNBits int4 ones.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from pipeline.convert.quantize import quantize_rows
from pipeline.core.errors import StagepipeError
from pipeline.npu.graph_parts import keep_float_nodes
from pipeline.npu.samples import StageSample
from schemas.manifest import Manifest

INT4_BLOCK = 32
# samples whose every intermediate tensor the calibrator holds at once (a whole-cache block's are tens of MB each);
# not its max_intermediate_outputs option, which drops the samples it held without counting them (onnxruntime 1.32)
CALIBRATION_BATCH = 8


@dataclass(frozen=True)
class Scheme:
    weight_bits: int
    activation_bits: int
    opset: int

    def quant_types(self):
        from onnxruntime.quantization import QuantType

        weight = QuantType.QInt8 if self.weight_bits == 8 else QuantType.QInt4
        return weight, QuantType.QInt8 if self.activation_bits == 8 else QuantType.QInt16


SCHEMES = {"w8a8": Scheme(8, 8, 17), "w8a16": Scheme(8, 16, 21), "w4a16": Scheme(4, 16, 21)}


def load_with_weights(path: Path) -> onnx.ModelProto:
    """A graph with its external weights read in (onnx >= 1.21 refuses to load them from the hard-linked files
    an onnx_dir's prefill and decode graphs share)."""
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        with open(path.parent / info["location"], "rb") as f:
            f.seek(int(info.get("offset", 0)))
            t.raw_data = f.read(int(info["length"]))
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT
    return model


def prepared(path: Path, scheme: Scheme, out: Path) -> Path:
    """The graph at `path` with its weights, at the scheme's opset, saved to `out` (quantize_static reads files)."""
    model = load_with_weights(path)
    if scheme.opset != model.opset_import[0].version:
        model = onnx.version_converter.convert_version(model, scheme.opset)
    onnx.save(model, str(out), save_as_external_data=True, location=out.name + ".data")
    return out


class Feeds:
    """onnxruntime's CalibrationDataReader over samples, rendered for one graph."""

    def __init__(self, samples: list[StageSample], spec, m: Manifest):
        self.samples, self.spec, self.m = iter(samples), spec, m

    def get_next(self):
        sample = next(self.samples, None)
        return None if sample is None else sample.feeds(self.spec, self.m)


def calibrate(graphs: dict[str, Path], samples: dict[str, list[StageSample]], specs: dict, m: Manifest,
              work: Path) -> Path:
    """MinMax ranges of every tensor over the samples of each graph (prefill, decode), merged into one calibration
    cache file (onnxruntime's format)."""
    from onnxruntime.quantization import CalibrationMethod, create_calibrator
    from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data

    ranges: dict[str, tuple] = {}
    for key, path in graphs.items():
        if not samples.get(key):
            continue
        calibrator = create_calibrator(path, [], augmented_model_path=str(work / f"augmented-{key}.onnx"),
                                       calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True)
        group = samples[key]
        for start in range(0, len(group), CALIBRATION_BATCH):  # each call folds its samples into the ranges
            calibrator.collect_data(Feeds(group[start:start + CALIBRATION_BATCH], specs[key], m))
        for name, data in calibrator.compute_data().data.items():
            low, high = data.range_value
            if name in ranges:
                low, high = np.minimum(ranges[name][0], low), np.maximum(ranges[name][1], high)
            ranges[name] = (low, high)
        del calibrator
    if not ranges:
        raise StagepipeError("no calibration samples for this stage")
    cache = work / "calibration-cache.json"
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, ranges), cache)
    return cache


def quantize_graph(path: Path, cache: Path, scheme: Scheme, keep_float: list[str], out: Path,
                   weights: dict) -> onnx.ModelProto:
    """quantize_static from the calibration cache, keep_float groups left unquantized; then the linear layers'
    weights quantized here per output channel (int8) or in blocks of input features (int4). weights: the stage's
    quantized weights by name, filled on first use, so every graph of the stage gets the very same tensors."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    weight_type, activation_type = scheme.quant_types()
    excluded = keep_float_nodes(onnx.load(str(path), load_external_data=False).graph, keep_float)
    quiet = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's advice on pre-processing, opsets
    try:
        # per-tensor weights here: onnxruntime computes per-channel scales one channel at a time in Python (minutes
        # for a 151936-row head); they are replaced below. Biases stay float (their int32 scale would follow the
        # weights' per-tensor one).
        quantize_static(str(path), str(out), None, quant_format=QuantFormat.QDQ, per_channel=False,
                        weight_type=weight_type, activation_type=activation_type, nodes_to_exclude=excluded,
                        calibration_cache_path=str(cache), use_external_data_format=True,
                        extra_options={"QuantizeBias": False})
    finally:
        logging.getLogger().setLevel(quiet)
    model = onnx.load(str(out))
    requantize_weights(model, onnx.load(str(path)), scheme.weight_bits, weights)
    return model


def quantize_weight(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """A Gemm's (out, in) weight -> (values, scales, zero points, DequantizeLinear attributes): int8 symmetric per
    output channel, or int4 in blocks of INT4_BLOCK input features with clip-searched scales."""
    import ml_dtypes

    if bits == 8:
        amax = np.abs(w).max(axis=1)
        scales = (np.where(amax > 0, amax, 1.0) / 127).astype(np.float32)
        values = np.clip(np.rint(w / scales[:, None]), -127, 127).astype(np.int8)
        return values, scales, np.zeros(scales.shape, np.int8), {"axis": 0}
    packed, scales = quantize_rows(w, 4, INT4_BLOCK)  # unsigned, zero point 8, two per byte
    values = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(w.shape).astype(np.int8) - 8
    return (values.astype(ml_dtypes.int4), scales, np.zeros(scales.shape, ml_dtypes.int4),
            {"axis": 1, "block_size": INT4_BLOCK})


def requantize_weights(model: onnx.ModelProto, source: onnx.ModelProto, bits: int, done: dict):
    """Each Gemm weight's DequantizeLinear (per tensor, as quantize_static left it) -> quantize_weight's."""
    inits = {t.name: t for t in model.graph.initializer}
    floats = {t.name: t for t in source.graph.initializer}
    gemm_weights = {n.input[1] for n in model.graph.node if n.op_type == "Gemm"}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.output[0] not in gemm_weights or node.input[0] not in inits:
            continue
        name = node.input[0].removesuffix("_quantized")
        if name not in floats:
            continue
        if name not in done:
            done[name] = quantize_weight(numpy_helper.to_array(floats[name]), bits)
        *arrays, attributes = done[name]
        for input_name, array in zip(node.input, arrays):
            inits[input_name].CopyFrom(numpy_helper.from_array(array, input_name))
        del node.attribute[:]
        node.attribute.extend(onnx.helper.make_attribute(k, v) for k, v in attributes.items())


def work_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="stagepipe-qdq-")
