"""What the ONNX graphs of an onnx_dir (or one .onnx file) are made of: opsets, op types, I/O shapes, weights.

    python -m pipeline.ops ONNX_DIR|GRAPH.onnx [--json] [--allow ALLOW.txt] [--strict]

For each graph (prefill and decode, every stage, in manifest order): opset imports and the domains its nodes use,
op types with counts (subgraphs of If/Loop/Scan included), every input and output with shape and dtype (a dim
with a dim_param or without a dim_value is flagged dynamic), initializer count and bytes, and the external data
files it references. Graphs are loaded without their weights (onnx.load(..., load_external_data=False)), so
this reads a few KB per graph however large the model.

--allow FILE: one op type per line ('#' comments and blank lines allowed; 'Softmax' means the default ONNX domain,
'com.microsoft:FusedMatMul' another domain). Every op outside the list is named per graph and the exit status is 1.
Ops from a non-standard domain (anything but ai.onnx / ai.onnx.ml) are always flagged. --strict: also exit 1 on
a dynamic dimension, a non-standard domain or a missing external data file.
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np

from pipeline.core.cli_args import ArgumentParser
from pipeline.core.errors import StagepipeError, cli_entry, stdout_may_close
from pipeline.core.layout import MANIFEST, MODES, graph_set_window, vision_stage_names
from pipeline.tools.report import dump_json, format_table

STANDARD_DOMAINS = {"", "ai.onnx", "ai.onnx.ml"}
DEFAULT_DOMAIN = "ai.onnx"


def _domain(d: str) -> str:
    return d or DEFAULT_DOMAIN


def op_label(domain: str, op_type: str) -> str:
    """'Softmax' for the default domain, 'com.microsoft:FusedMatMul' otherwise."""
    return op_type if _domain(domain) == DEFAULT_DOMAIN else f"{domain}:{op_type}"


def load_graph(path: Path):
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise StagepipeError(f"{path}: not found") from None
    except Exception as e:  # protobuf DecodeError and friends: name the file, one line
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StagepipeError(f"{path}: not a readable ONNX model ({first})") from None


def _walk_nodes(graph):
    """Every node of a graph and of its subgraphs (If/Loop/Scan bodies)."""
    import onnx

    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _walk_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _walk_nodes(g)


def _dtype_name(elem_type: int) -> str:
    import onnx

    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except Exception:
        return onnx.TensorProto.DataType.Name(elem_type).lower() if elem_type else "undefined"


def value_info(v) -> dict:
    """name, dtype, shape (ints, dim_param strings or '?') and which dims are dynamic."""
    t = v.type
    kind = t.WhichOneof("value")
    if kind != "tensor_type":
        return {"name": v.name, "dtype": kind or "unknown", "shape": None, "dynamic": True,
                "dynamic_dims": ["not a tensor"]}
    tt = t.tensor_type
    if not tt.HasField("shape"):
        return {"name": v.name, "dtype": _dtype_name(tt.elem_type), "shape": None, "dynamic": True,
                "dynamic_dims": ["rank unknown (no shape)"]}
    shape, dynamic = [], []
    for i, d in enumerate(tt.shape.dim):
        if d.HasField("dim_value"):
            shape.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            shape.append(d.dim_param)
            dynamic.append(f"dim {i} = '{d.dim_param}'")
        else:
            shape.append("?")
            dynamic.append(f"dim {i} has no value")
    return {"name": v.name, "dtype": _dtype_name(tt.elem_type), "shape": shape, "dynamic": bool(dynamic),
            "dynamic_dims": dynamic}


def _initializer_bytes(t) -> tuple[int, bool, str | None]:
    """(bytes, external?, location) of an initializer, from its metadata only."""
    import onnx

    ext = {e.key: e.value for e in t.external_data}
    if t.data_location == onnx.TensorProto.EXTERNAL or ext:
        if "length" in ext:
            return int(ext["length"]), True, ext.get("location")
        n = int(np.prod(list(t.dims), dtype=np.int64))
        try:
            size = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        except Exception:
            size = 0
        return n * size, True, ext.get("location")
    if t.raw_data:
        return len(t.raw_data), False, None
    n = int(np.prod(list(t.dims), dtype=np.int64))
    try:
        size = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except Exception:
        size = 0
    return n * size, False, None


def graph_report(path: Path, label: str, allow: set[tuple[str, str]] | None = None,
                 manifest_opset: int | None = None) -> dict:
    model = load_graph(path)
    g = model.graph
    nodes = list(_walk_nodes(g))
    ops = Counter(op_label(n.domain, n.op_type) for n in nodes)
    node_domains = sorted({_domain(n.domain) for n in nodes})
    opsets = {_domain(o.domain): int(o.version) for o in model.opset_import}
    count, total, external, inline = 0, 0, 0, 0
    files: dict[str, int] = {}
    ends: dict[str, int] = {}  # furthest byte each file must hold
    for t in g.initializer:
        size, is_ext, location = _initializer_bytes(t)
        count += 1
        total += size
        if is_ext:
            external += size
            if location:
                files[location] = files.get(location, 0) + size
                offset = next((int(e.value) for e in t.external_data if e.key == "offset"), 0)
                ends[location] = max(ends.get(location, 0), offset + size)
        else:
            inline += size
    ext_files = []
    for loc, used in sorted(files.items()):
        f = path.parent / loc
        size = f.stat().st_size if f.is_file() else None
        ext_files.append({"file": loc, "bytes_referenced": used, "exists": size is not None, "size": size,
                          "too_short": size is not None and size < ends[loc]})
    inputs = [value_info(v) for v in g.input]
    outputs = [value_info(v) for v in g.output]
    initializer_names = {t.name for t in g.initializer}
    inputs = [i for i in inputs if i["name"] not in initializer_names]  # old-style graphs list weights as inputs
    dynamic = [f"{kind} {v['name']}: {d}" for kind, vals in (("input", inputs), ("output", outputs))
               for v in vals for d in v["dynamic_dims"]]
    nonstandard = sorted({d for d in node_domains if d not in STANDARD_DOMAINS} |
                         {d for d in opsets if d not in STANDARD_DOMAINS})
    notes = []
    if manifest_opset is not None and opsets.get(DEFAULT_DOMAIN) != manifest_opset:
        notes.append(f"default-domain opset {opsets.get(DEFAULT_DOMAIN)} differs from manifest opset {manifest_opset}")
    missing = [f["file"] for f in ext_files if not f["exists"] or f["too_short"]]
    report = {"graph": label, "file": str(path), "ir_version": int(model.ir_version),
              "producer": model.producer_name, "opsets": opsets, "node_domains": node_domains,
              "node_count": len(nodes), "ops": dict(sorted(ops.items())),
              "inputs": inputs, "outputs": outputs,
              "initializers": {"count": count, "bytes": total, "external_bytes": external, "inline_bytes": inline},
              "external_data_files": ext_files, "missing_external_files": missing,
              "dynamic_dims": dynamic, "nonstandard_domains": nonstandard, "notes": notes}
    if allow is not None:
        report["disallowed_ops"] = {op: n for (op, n) in sorted(ops.items()) if _op_key(op) not in allow}
    return report


def _op_key(label: str) -> tuple[str, str]:
    if ":" in label:
        domain, op = label.rsplit(":", 1)
        return _domain(domain.strip()), op.strip()
    return DEFAULT_DOMAIN, label.strip()


def read_allow_list(path: Path) -> set[tuple[str, str]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StagepipeError(f"--allow {path}: not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise StagepipeError(f"--allow {path}: cannot read ({e})") from None
    allowed = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if len(entry.split()) != 1:
            raise StagepipeError(f"--allow {path}:{lineno}: expected one op type per line (Softmax or "
                                 f"domain:Op), got {entry!r}")
        allowed.add(_op_key(entry))
    return allowed


def graph_files(path: Path) -> tuple[list[tuple[str, Path]], int | None]:
    """[(label, graph path)] in pipeline order and the manifest opset (None without a manifest)."""
    path = Path(path)
    if not path.exists():
        raise StagepipeError(f"{path}: not found")
    if path.is_file():
        if path.suffix != ".onnx":
            raise StagepipeError(f"{path}: not an .onnx file; give an onnx_dir or one .onnx graph")
        return [(path.name, path)], None
    if (path / MANIFEST).is_file():
        from pipeline.core.jsonfile import load_manifest

        manifest = load_manifest(path)
        missing = [f"{mode}/{stage}" for mode in MODES for stage in manifest.stage_names()
                   if stage not in manifest.graphs.get(mode, {})]
        if missing:
            raise StagepipeError(f"{path}/{MANIFEST}: no graph for {missing[0]}; reconvert")
        # every graph the manifest lists: each mode's whole-cache set, then the attention windows' block graphs,
        # then a VL model's vision graphs
        C = manifest.max_cache_len
        specs = [manifest.graphs[graphs][stage]
                 for graphs in sorted(manifest.graphs, key=lambda g: (-graph_set_window(g, C),
                                                                      MODES.index(g.split("_c")[0])))
                 for stage in manifest.stage_names() if stage in manifest.graphs[graphs]]
        if manifest.vision is not None:
            specs += [manifest.vision.graphs[stage] for stage in vision_stage_names(len(manifest.vision.blocks))]
        out = []
        for spec in specs:
            f = path / spec.file
            if not f.is_file():
                raise StagepipeError(f"{f}: listed in {MANIFEST} but missing; reconvert the model")
            out.append((spec.file.removesuffix(".onnx"), f))
        return out, manifest.opset
    found = sorted(path.rglob("*.onnx"))
    if not found:
        raise StagepipeError(f"{path}: no manifest.json and no .onnx files; give an onnx_dir or a .onnx file")
    return [(str(f.relative_to(path).with_suffix("")), f) for f in found], None


def ops_report(path: Path, allow_file: Path | None = None, strict: bool = False) -> dict:
    allow = read_allow_list(allow_file) if allow_file is not None else None
    files, opset = graph_files(path)
    graphs = [graph_report(f, label, allow, opset) for label, f in files]
    all_ops = Counter()
    for g in graphs:
        all_ops.update(g["ops"])
    disallowed = sorted({op for g in graphs for op in g.get("disallowed_ops", {})})
    flagged = {"dynamic_dims": sum(len(g["dynamic_dims"]) for g in graphs),
               "nonstandard_domains": sorted({d for g in graphs for d in g["nonstandard_domains"]}),
               "missing_external_files": sum(len(g["missing_external_files"]) for g in graphs)}
    fail = bool(disallowed) or (strict and (flagged["dynamic_dims"] or flagged["nonstandard_domains"] or
                                            flagged["missing_external_files"]))
    return {"path": str(path), "allow_file": str(allow_file) if allow_file else None, "strict": strict,
            "graphs": graphs, "all_ops": dict(sorted(all_ops.items())), "disallowed_ops": disallowed,
            "flagged": flagged, "ok": not fail}


def _shape_text(v: dict) -> str:
    return "?" if v["shape"] is None else "[" + ", ".join(map(str, v["shape"])) + "]"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def print_report(r: dict):
    print(f"{r['path']}: {len(r['graphs'])} graph(s)")
    for g in r["graphs"]:
        print()
        opsets = ", ".join(f"{d} {v}" for d, v in g["opsets"].items())
        print(f"== {g['graph']}  ({g['file']})")
        print(f"  ir_version {g['ir_version']}  opsets: {opsets}  node domains: {', '.join(g['node_domains']) or '-'}"
              f"  producer: {g['producer'] or '-'}")
        print(f"  ops ({g['node_count']} nodes): " + ", ".join(f"{op} {n}" for op, n in g["ops"].items()))
        rows = [[kind, v["name"], v["dtype"], _shape_text(v), "DYNAMIC" if v["dynamic"] else ""]
                for kind, vals in (("input", g["inputs"]), ("output", g["outputs"])) for v in vals]
        print("  " + format_table(["", "name", "dtype", "shape", ""], rows).replace("\n", "\n  "))
        ini = g["initializers"]
        print(f"  initializers: {ini['count']}, {_bytes(ini['bytes'])} ({_bytes(ini['external_bytes'])} external, "
              f"{_bytes(ini['inline_bytes'])} inline)")
        for f in g["external_data_files"]:
            state = ("MISSING" if not f["exists"] else f"file {_bytes(f['size'])}" +
                     (" TOO SHORT for the tensors it should hold" if f["too_short"] else ""))
            print(f"  external data: {f['file']} ({_bytes(f['bytes_referenced'])} referenced; {state})")
        for d in g["dynamic_dims"]:
            print(f"  FLAG dynamic dimension: {d}")
        for d in g["nonstandard_domains"]:
            print(f"  FLAG non-standard domain: {d}")
        for n in g["notes"]:
            print(f"  NOTE {n}")
        if g.get("disallowed_ops"):
            print("  NOT ALLOWED: " + ", ".join(f"{op} ({n})" for op, n in g["disallowed_ops"].items()))
    print()
    print("all graphs, op types: " + " ".join(r["all_ops"]))
    fl = r["flagged"]
    print(f"dynamic dimensions: {fl['dynamic_dims']}   non-standard domains: "
          f"{', '.join(fl['nonstandard_domains']) or 'none'}   missing/short external data files: "
          f"{fl['missing_external_files']}")
    if r["allow_file"]:
        if r["disallowed_ops"]:
            print(f"FAIL: ops not in {r['allow_file']}: {', '.join(r['disallowed_ops'])}")
        else:
            print(f"OK: every op is in {r['allow_file']}")
    if r["strict"] and not r["ok"] and not r["disallowed_ops"]:
        print("FAIL (--strict): dynamic dimensions, non-standard domains or missing external data files")


@cli_entry
def main(argv=None):
    p = ArgumentParser(prog="python -m pipeline.ops", description=__doc__.split("\n")[0])
    p.add_argument("path", type=Path, help="an onnx_dir (manifest.json), a folder of .onnx files, or one .onnx file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--allow", type=Path, default=None, metavar="FILE", help="allowed op types, one per line")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 also on dynamic dims, non-standard domains or missing external data files")
    a = p.parse_args(argv)
    report = ops_report(a.path, a.allow, a.strict)
    with stdout_may_close():
        print(dump_json(report)) if a.json else print_report(report)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
