"""Per-row int8 activations (`twinq.shared.row_quantisation`) on hand-built graphs quantised with
the shipped recipe (`twinq.shared.onnx_backend.quantise`): the rewrite computes per-row
quantisation exactly, on any CPU, and refuses a graph it does not understand."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from twinq.shared.row_quantisation import per_row_activations  # noqa: E402

RNG = np.random.default_rng(0)
WEIGHT = RNG.normal(size=(8, 5)).astype(np.float32)


def _matmul() -> onnx.ModelProto:
    """X[rows, 8] @ W[8, 5] in fp32."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", 5])],
        [numpy_helper.from_array(WEIGHT, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _int8(tmp_path) -> onnx.ModelProto:  # noqa: ANN001
    """The shipped recipe's graph before the per-row rewrite (onnxruntime's per-batch one)."""
    from twinq.shared.onnx_backend import quantise

    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    onnx.save(_matmul(), str(fp32))
    quantise(fp32, int8, per_row=False)
    return onnx.load(str(int8))


def _quantised_weight(model: onnx.ModelProto) -> tuple[np.ndarray, np.ndarray]:
    """(integer weights, per-column scales) as the quantiser stored them."""
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    q = next(a for a in arrays.values() if a.dtype == np.int8 and a.shape == WEIGHT.shape)
    scale = next(a for a in arrays.values() if a.dtype == np.float32 and a.shape == (5,))
    return q.astype(np.int32), scale


def test_each_row_is_quantised_with_its_own_scale(tmp_path) -> None:  # noqa: ANN001
    model = _int8(tmp_path)
    q_weight, w_scale = _quantised_weight(model)
    assert per_row_activations(model) == 1
    assert not [n for n in model.graph.node if n.op_type == "DynamicQuantizeLinear"]
    # A row of large values beside a row of small ones: one shared scale would flatten the
    # small row; per row, each keeps 8 bits of its own.
    x = np.stack([RNG.normal(size=8) * 100.0, RNG.normal(size=8) * 0.01]).astype(np.float32)
    scale = np.abs(x).max(axis=1, keepdims=True) / 127.0
    dequantised = np.round(x / scale) * scale
    np.testing.assert_allclose(_run(model, x), dequantised @ (q_weight * w_scale),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(_run(model, x[1:]), _run(model, x)[1:], rtol=0, atol=0)
    assert np.abs(_run(model, x)[1] - x[1] @ WEIGHT).max() < 0.01 * np.abs(x[1] @ WEIGHT).max()


def test_no_cpu_saturates_the_shipped_int8_products(tmp_path) -> None:  # noqa: ANN001
    """Without VNNI, onnxruntime's uint8 x int8 kernel adds two products in 16 bits and clips
    (vpmaddubsw): the activations' uint8 reach 255, so weights must stay within 64 for
    2 * 255 * |w| to fit 32,767. 8-bit weights made the test above fail on an AVX2-only EPYC
    (-43 for 140) and pass on CPUs with VNNI."""
    q_weight, _ = _quantised_weight(_int8(tmp_path))
    assert 2 * 255 * int(np.abs(q_weight).max()) <= 32_767


def test_a_graph_without_quantised_activations_is_left_alone() -> None:
    model = _matmul()
    before = model.SerializeToString()
    assert per_row_activations(model) == 0
    assert model.SerializeToString() == before


def test_an_unknown_use_of_a_matmul_is_refused(tmp_path) -> None:  # noqa: ANN001
    model = _int8(tmp_path)
    cast = next(n for n in model.graph.node if n.op_type == "Cast")
    cast.op_type = "Identity"  # the quantiser's Cast -> Mul chain, broken
    del cast.attribute[:]
    with pytest.raises(ValueError, match="should feed one Cast"):
        per_row_activations(model)


def test_a_quantised_activation_read_elsewhere_is_refused(tmp_path) -> None:  # noqa: ANN001
    model = _int8(tmp_path)
    dql = next(n for n in model.graph.node if n.op_type == "DynamicQuantizeLinear")
    model.graph.node.append(helper.make_node("Identity", [dql.output[1]], ["scale_copy"]))
    model.graph.output.append(helper.make_tensor_value_info("scale_copy", TensorProto.FLOAT, []))
    with pytest.raises(ValueError, match="other than a quantised MatMul"):
        per_row_activations(model)
