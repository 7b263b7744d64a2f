"""Per-row activation scales for twinq's int8 graphs: a row's result never depends on its batch.

onnxruntime's dynamic quantisation (`quantize_dynamic`) puts a DynamicQuantizeLinear before
each quantised MatMul: ONE scale and zero point for the whole activation tensor, that is for
the whole mini-batch. A pair's logit then depends on the pairs batched with it and on the
padding they bring: on 2,000 Quora pairs, 3.8% of the demo reranker's logits moved by more
than 0.5 (at most 2.2) between scored alone and scored in a batch of 32, and a question's
vector by down to cosine 0.982 (`benchmarks/bench_batch_dependence.py`, docs/performance.md).
The worker batches whatever queries arrive together and `twinq train` fits the twin decision
on other batches than the worker serves, so the same question could get another probability,
even another answer, under other traffic.

`per_row_activations` replaces each DynamicQuantizeLinear with symmetric quantisation per
row (the last axis: one token of one input): scale = max|x| / 127, q = round(x / scale) + 128
as uint8, zero point 128. The zero point stays a scalar, which MatMulInteger requires; the
scale has shape [..., 1] and multiplies the MatMul's output rows. A row's scale no longer spans
other rows' outlier tokens, so the error against fp32 fell too (a third of the logit error;
cosine to fp32 0.9978 against 0.9944), for 12 to 16% of int8's speed (still 1.6x onnx fp32).

onnxruntime's MatMulIntegerToFloat fusion assumes a scalar activation scale and silently
computes wrong results when it is not one, so the rewrite writes that fused op itself with a
scale of 1 and applies the row scale after it (`per_row_activations`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

_PREFIX = "twinq_rowq_"


def per_row_activations(model: onnx.ModelProto) -> int:
    """Rewrite, in place, every DynamicQuantizeLinear of `model` into per-row quantisation.

    The quantiser's MatMul reads `float(MatMulInteger(q, w)) * (x_scale * w_scale)`. Here it
    becomes onnxruntime's fused `MatMulIntegerToFloat(q, w, 1, w_scale)` (one kernel, as the
    quantiser's graph gets from onnxruntime's own fusion) followed by `* x_scale`, the row's
    scale. That fusion is not left to the optimiser: it wants a scalar activation scale and
    silently misreads a per-row one, and written out this way any session computes the same.

    Args:
        model: An int8 graph from `onnxruntime.quantization.quantize_dynamic`.

    Returns:
        How many activations were rewritten (0 for a graph with none: an fp32 one).

    Raises:
        ValueError: a quantised MatMul is not followed by the Cast and scale Mul the quantiser
            writes.
    """
    from onnx import helper

    graph = model.graph
    quantised = {n.output[0]: n for n in graph.node if n.op_type == "DynamicQuantizeLinear"}
    if not quantised:
        return 0
    users: dict[str, list[onnx.NodeProto]] = {}
    producer: dict[str, onnx.NodeProto] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
        for name in node.output:
            producer[name] = node
    emitted: dict[int, list[onnx.NodeProto]] = {}  # id(node) -> what replaces it
    for node in graph.node:
        if node.op_type == "DynamicQuantizeLinear":
            emitted[id(node)] = _row_quantise(node, f"{_PREFIX}{node.output[0]}_")
        elif node.op_type == "MatMulInteger" and node.input[0] in quantised:
            x_scale = quantised[node.input[0]].output[1]
            cast = _sole_user(node.output[0], "Cast", users)
            mul = _sole_user(cast.output[0], "Mul", users)
            product = next(i for i in mul.input if i != cast.output[0])
            scales = producer.get(product)
            if (scales is None or scales.op_type != "Mul" or x_scale not in scales.input
                    or users.get(product) != [mul]):
                raise ValueError(f"per-row quantisation: {mul.name!r} does not scale by "
                                 f"{x_scale!r} times a weight scale")
            w_scale = next(i for i in scales.input if i != x_scale)
            w_zero = node.input[3] if len(node.input) > 3 else ""
            unscaled = mul.output[0] + "_before_row_scale"
            emitted[id(node)] = [
                helper.make_node("MatMulIntegerToFloat",
                                 [node.input[0], node.input[1], _PREFIX + "one", w_scale,
                                  node.input[2], w_zero], [unscaled], domain="com.microsoft"),
                helper.make_node("Mul", [unscaled, x_scale], [mul.output[0]])]
            emitted[id(cast)] = emitted[id(mul)] = emitted[id(scales)] = []
    for dql in quantised.values():  # every use of q and its scale must have been rewritten
        q_users, scale_users = users.get(dql.output[0], []), users.get(dql.output[1], [])
        if any(id(n) not in emitted for n in q_users + scale_users):
            raise ValueError(f"per-row quantisation: {dql.output[0]!r} or its scale feeds a "
                             "node other than a quantised MatMul and its scale Mul")
    nodes = [new for node in graph.node for new in emitted.get(id(node), [node])]
    graph.initializer.extend(_constants())
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(quantised)


def _sole_user(name: str, op_type: str, users: dict[str, list[onnx.NodeProto]]
               ) -> onnx.NodeProto:
    found = users.get(name, [])
    if len(found) != 1 or found[0].op_type != op_type:
        raise ValueError(f"per-row quantisation: {name!r} should feed one {op_type}, not "
                         f"{[n.op_type for n in found]}")
    return found[0]


def _row_quantise(node: onnx.NodeProto, p: str) -> list[onnx.NodeProto]:
    """Nodes that compute DynamicQuantizeLinear's three outputs with one scale per row."""
    from onnx import helper

    x, (q, scale, zero) = node.input[0], node.output
    return [
        helper.make_node("Abs", [x], [p + "abs"]),
        helper.make_node("ReduceMax", [p + "abs"], [p + "max"], axes=[-1], keepdims=1),
        helper.make_node("Max", [p + "max", _PREFIX + "eps"], [p + "max_pos"]),
        helper.make_node("Mul", [p + "max_pos", _PREFIX + "inv127"], [scale]),
        # QuantizeLinear takes one scale per row along axis 0 of a 2-D [rows, K] view.
        helper.make_node("Reshape", [scale, _PREFIX + "flat"], [p + "scale_1d"]),
        helper.make_node("Shape", [x], [p + "shape"]),
        helper.make_node("Shape", [x], [p + "k"], start=-1),
        helper.make_node("Concat", [_PREFIX + "flat", p + "k"], [p + "shape_2d"], axis=0),
        helper.make_node("Reshape", [x, p + "shape_2d"], [p + "x_2d"]),
        helper.make_node("Shape", [p + "scale_1d"], [p + "rows"]),
        helper.make_node("Expand", [_PREFIX + "zero", p + "rows"], [p + "zero_1d"]),
        helper.make_node("QuantizeLinear", [p + "x_2d", p + "scale_1d", p + "zero_1d"],
                         [p + "q_2d"], axis=0),
        helper.make_node("Reshape", [p + "q_2d", p + "shape"], [q]),
        helper.make_node("Identity", [_PREFIX + "zero"], [zero]),
    ]


def _constants() -> list[onnx.TensorProto]:
    from onnx import numpy_helper

    return [numpy_helper.from_array(np.array(value, dtype=dtype), _PREFIX + name)
            for name, value, dtype in (("inv127", 1.0 / 127.0, np.float32),
                                       ("eps", 1e-8, np.float32), ("one", 1.0, np.float32),
                                       ("zero", 128, np.uint8), ("flat", [-1], np.int64))]
