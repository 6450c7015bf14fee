"""Finding the parts of a stage graph that quantization must keep in float, by pattern (any converter version):

  mask   the Add that puts the additive attention mask (-10000 where masked) onto the scores, and the Softmax: with
         the mask in its range, a quantized Add gets a scale that rounds every real score to the same value
  rope   the RoPE tables: every node computed from position_ids (or the cos/sin inputs) alone: Cast, the angle
         Mul, Cos, Sin, Neg, Concat. Angles grow with the position, so a range calibrated on early positions clips
         later ones
  norms  each RMSNorm's chain Pow -> ReduceMean -> Add(eps) -> Sqrt -> Div -> Mul(weight): x^2 spans a far wider
         range than x
"""
from __future__ import annotations

import onnx

GROUPS = ("mask", "rope", "norms")
ROPE_INPUTS = {"position_ids", "cos", "sin"}
NORM_CHAIN = ("ReduceMean", "Add", "Sqrt", "Div", "Mul")


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def mask_nodes(graph: onnx.GraphProto) -> list[str]:
    return [n.name for n in graph.node
            if (n.op_type == "Add" and "attention_mask" in n.input) or n.op_type == "Softmax"]


def rope_nodes(graph: onnx.GraphProto) -> list[str]:
    """Nodes whose value depends on the RoPE inputs (position_ids, or cos/sin) and on no other graph input."""
    graph_inputs = {i.name for i in graph.input}
    depends: dict[str, set[str]] = {name: {name} for name in graph_inputs}
    found = []
    for node in graph.node:  # nodes are in topological order
        deps = set().union(*(depends.get(name, set()) for name in node.input))
        for out in node.output:
            depends[out] = deps
        if deps and deps <= ROPE_INPUTS:
            found.append(node.name)
    return found


def norm_nodes(graph: onnx.GraphProto) -> list[str]:
    """Each Pow whose chain of sole consumers is ReduceMean, Add, Sqrt, Div, Mul (the converter's RMSNorm)."""
    users = consumers(graph)
    found = []
    for node in graph.node:
        if node.op_type != "Pow":
            continue
        chain, current = [node], node
        for op_type in NORM_CHAIN:
            following = users.get(current.output[0], [])
            if len(following) != 1 or following[0].op_type != op_type:
                break
            current = following[0]
            chain.append(current)
        if len(chain) == len(NORM_CHAIN) + 1:
            found += [n.name for n in chain]
    return found


FINDERS = {"mask": mask_nodes, "rope": rope_nodes, "norms": norm_nodes}


def keep_float_nodes(graph: onnx.GraphProto, groups) -> list[str]:
    return sorted({name for g in groups for name in FINDERS[g](graph)})
