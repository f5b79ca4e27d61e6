"""The captured decode step's CUDA graph, by variant: kernel nodes, edges and each edge's dependency type (H200).
v27 asks why the head in `dense_linear` cancels all of PDL's gain for LaRoSA with the overlapped adapters
(benchmarks/NOTES.md v27): are the programmatic edges of the step still there with it? CUDA's dot dump does not
name edge kinds (v27), so v28 reads them through the driver API (`cuGraphGetEdges_v2`, CUDA >= 12.3, via ctypes
on libcuda): per edge its from-port, to-port and type, and per kernel node its name and whether its incoming edge
is programmatic.

    PYTHONPATH=src python3 benchmarks/graph_dump.py --out /tmp/graphs   # writes VARIANT.dot and summary.json

Random weights at the LLaMA2-7B shape, bf16, batch 1, LaRoSA at p = 0.5 (paper split) unless --method says else.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from larosa.engine import DecodeEngine  # noqa: E402
from larosa.shapes import get_shape, random_base, sparse_variant  # noqa: E402

EDGE = re.compile(r'^\s*"?([\w]+)"?\s*->\s*"?([\w]+)"?(.*)$')


def summarize(dot: str) -> dict:
    """Counts from a CUDA graph debug dump: nodes per kernel name, edges, and the attributes edges carry (CUDA
    12.3+ writes the dependency type of non-default edges, e.g. programmatic ones)."""
    edges, attrs = 0, collections.Counter()
    for line in dot.splitlines():
        m = EDGE.match(line)
        if m:
            edges += 1
            attrs[m.group(3).strip().rstrip(";") or "(plain)"] += 1
    kernels = collections.Counter(re.findall(r"\b([A-Za-z_]\w*_kernel\w*|nvjet\w*|splitKreduce\w*)", dot))
    low = dot.lower()
    return {"edges": edges, "edge_attributes": attrs.most_common(12),
            "mentions": {w: low.count(w) for w in ("programmatic", "launch_completion", "port", "pdl")},
            "kernel_names_top": kernels.most_common(12), "bytes": len(dot)}


class _EdgeData(ctypes.Structure):
    """CUgraphEdgeData: from_port (0 default, 1 programmatic, 2 launch order), to_port, type (0 default,
    1 programmatic)."""
    _fields_ = [("from_port", ctypes.c_ubyte), ("to_port", ctypes.c_ubyte), ("type", ctypes.c_ubyte),
                ("reserved", ctypes.c_ubyte * 5)]


NODE_TYPES = {0: "kernel", 1: "memcpy", 2: "memset", 3: "host", 4: "graph", 5: "empty", 6: "wait_event",
              7: "event_record", 10: "mem_alloc", 11: "mem_free", 13: "conditional"}


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what} failed with CUresult {rc}")


def _kernel_name(cu, node: ctypes.c_void_p) -> str:
    """The kernel node's function name (cuGraphKernelNodeGetParams_v2, then cuFuncGetName / cuKernelGetName)."""
    buf = (ctypes.c_ubyte * 256)()  # CUDA_KERNEL_NODE_PARAMS_v2 is < 100 bytes: func first, kern at offset 56
    if cu.cuGraphKernelNodeGetParams_v2(node, buf) != 0:
        return "?"
    func = ctypes.c_void_p.from_buffer(buf, 0).value
    kern = ctypes.c_void_p.from_buffer(buf, 56).value
    name = ctypes.c_char_p()
    if func and cu.cuFuncGetName(ctypes.byref(name), ctypes.c_void_p(func)) == 0 and name.value:
        return name.value.decode(errors="replace")
    if kern and cu.cuKernelGetName(ctypes.byref(name), ctypes.c_void_p(kern)) == 0 and name.value:
        return name.value.decode(errors="replace")
    return "?"


def _short(name: str) -> str:
    return name if len(name) <= 48 else name[:45] + "..."


def graph_edges(raw_graph: int) -> dict:
    """Nodes by type, edges by (from_port, to_port, type), and per kernel name how many of its nodes are entered
    through a programmatic edge, read from a cudaGraph_t through the driver API."""
    cu = ctypes.CDLL("libcuda.so.1")
    g = ctypes.c_void_p(raw_graph)
    n = ctypes.c_size_t(0)
    _check(cu.cuGraphGetNodes(g, None, ctypes.byref(n)), "cuGraphGetNodes")
    nodes = (ctypes.c_void_p * n.value)()
    _check(cu.cuGraphGetNodes(g, nodes, ctypes.byref(n)), "cuGraphGetNodes")
    types, names = {}, {}
    for node in nodes:
        t = ctypes.c_int(-1)
        _check(cu.cuGraphNodeGetType(ctypes.c_void_p(node), ctypes.byref(t)), "cuGraphNodeGetType")
        types[node] = NODE_TYPES.get(t.value, str(t.value))
        names[node] = _kernel_name(cu, ctypes.c_void_p(node)) if t.value == 0 else types[node]
    e = ctypes.c_size_t(0)
    _check(cu.cuGraphGetEdges_v2(g, None, None, None, ctypes.byref(e)), "cuGraphGetEdges_v2")
    src, dst, data = (ctypes.c_void_p * e.value)(), (ctypes.c_void_p * e.value)(), (_EdgeData * e.value)()
    _check(cu.cuGraphGetEdges_v2(g, src, dst, data, ctypes.byref(e)), "cuGraphGetEdges_v2")
    kinds = collections.Counter()
    entered = collections.defaultdict(collections.Counter)  # kernel name -> {programmatic: n, default: n}
    chain = []
    for i in range(e.value):
        d = data[i]
        kind = f"from_port={d.from_port} to_port={d.to_port} type={d.type}"
        kinds[kind] += 1
        entered[_short(names[dst[i]])]["programmatic" if d.type == 1 else "default"] += 1
        if len(chain) < 40:
            chain.append(f"{_short(names[src[i]])} -> {_short(names[dst[i]])} [{kind}]")
    return {"nodes": len(nodes), "node_types": dict(collections.Counter(types.values())), "edges": e.value,
            "edge_kinds": dict(kinds), "entered_by_kernel": {k: dict(v) for k, v in sorted(entered.items())},
            "first_edges": chain}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shape", default="llama2-7b")
    ap.add_argument("--method", default="larosa")
    ap.add_argument("--sparsity", type=float, default=0.5)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base = random_base(get_shape(args.shape), torch.bfloat16, "cuda", 0)
    w = base if args.method == "dense" else sparse_variant(base, args.method, args.sparsity)
    prompt = torch.randint(0, 1000, (1, 128), device="cuda")
    res = {"shape": args.shape, "method": args.method, "sparsity": args.sparsity, "gpu": torch.cuda.get_device_name(),
           "torch": torch.__version__, "variants": {}}
    # "dense-head": the head in `dense_linear` as a programmatic dependent (v27's question; since v28 the engine
    # launches it in order beside Top-K sites unless asked)
    for label, kw in (("cublas-head", {"dense_head": False}), ("dense-head", {"dense_head": True, "head_pdl": True})):
        eng = DecodeEngine(w, max_len=256, **kw)
        eng.generate(prompt, 4)  # compile, capture, warm up
        path = eng.dump_graph(str(args.out / f"{label}.dot"))
        res["variants"][label] = summarize(Path(path).read_text(errors="replace"))
        try:
            res["variants"][label]["driver"] = graph_edges(eng.captured_graph.raw_cuda_graph())
        except (OSError, AttributeError, RuntimeError) as exc:  # no libcuda symbol, or an older torch / driver
            res["variants"][label]["driver"] = {"error": f"{type(exc).__name__}: {exc}"}
        print(label, json.dumps(res["variants"][label], indent=1))
        del eng
        torch.cuda.empty_cache()
    (args.out / "summary.json").write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
