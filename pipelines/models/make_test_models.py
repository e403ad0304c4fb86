#!/usr/bin/env python3
"""Writes the small ONNX models the inference tests and benchmarks use.

    .venv/bin/python pipelines/models/make_test_models.py [OUT_DIR]

OUT_DIR defaults to engine/tests/models. It gets a model registry:

    linear/model.json    declared interface (checked against every version)
    linear/1/model.onnx  y = relu(x @ W1 + b1), x: float32 [N, 4], y: float32 [N, 3]
    linear/2/model.onnx  the same graph with other weights (for version swaps)
    mlp/1/model.onnx     a 64 -> 256 -> 256 -> 16 MLP, x: float32 [N, 64] (benchmarks)
    loose/1/model.onnx   linear's graph with x declared [N, D]: a request with D != 4 passes
                         the interface check and fails in ONNX Runtime (tests that one bad
                         request fails alone, not its batch)

The weights come from a fixed seed, so the files are reproducible.
"""
import json
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def save(model, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    onnx.checker.check_model(model)
    onnx.save(model, path)


def linear(version, seed, columns=4):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    b = rng.normal(size=(3,)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["xw"]),
            helper.make_node("Add", ["xw", "b"], ["z"]),
            helper.make_node("Relu", ["z"], ["y"]),
        ],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", columns])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgeflow-tests")
    model.ir_version = 8
    model.model_version = version
    helper.set_model_props(model, {"description": f"linear test model, version {version}"})
    return model


def mlp(seed):
    rng = np.random.default_rng(seed)
    sizes = [64, 256, 256, 16]
    nodes, inits, prev = [], [], "x"
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        w = (rng.normal(size=(a, b)) / np.sqrt(a)).astype(np.float32)
        bias = np.zeros(b, dtype=np.float32)
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(bias, f"b{i}")]
        out = "y" if i == len(sizes) - 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [prev, f"W{i}", f"b{i}"], [out if out == "y" else f"g{i}"]))
        if out != "y":
            nodes.append(helper.make_node("Relu", [f"g{i}"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgeflow-tests")
    model.ir_version = 8
    model.model_version = 1
    return model


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "../../engine/tests/models")
    save(linear(1, 1), os.path.join(out, "linear/1/model.onnx"))
    save(linear(2, 2), os.path.join(out, "linear/2/model.onnx"))
    with open(os.path.join(out, "linear/model.json"), "w") as f:
        json.dump(
            {
                "description": "y = relu(x W + b); a test model",
                "inputs": [{"name": "x", "type": "float32", "shape": [-1, 4]}],
                "outputs": [{"name": "y", "type": "float32", "shape": [-1, 3]}],
            },
            f,
            indent=2,
        )
        f.write("\n")
    save(mlp(3), os.path.join(out, "mlp/1/model.onnx"))
    save(linear(1, 1, columns="D"), os.path.join(out, "loose/1/model.onnx"))
    with open(os.path.join(out, "loose/model.json"), "w") as f:
        json.dump(
            {
                "description": "y = relu(x W + b) with x declared [N, D]: only D = 4 runs",
                "inputs": [{"name": "x", "type": "float32", "shape": [-1, -1]}],
                "outputs": [{"name": "y", "type": "float32", "shape": [-1, 3]}],
            },
            f,
            indent=2,
        )
        f.write("\n")
    print(f"wrote test models to {os.path.normpath(out)}")


if __name__ == "__main__":
    main()
