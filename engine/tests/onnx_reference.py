#!/usr/bin/env python3
"""Reference outputs for the inference tests, from ONNX Runtime's Python API, one request
at a time (no batching):

    onnx_reference.py REQUESTS.jsonl MODEL.onnx > reference.jsonl

Each output line is {"id": ..., "outputs": {name: {"shape": [...], "data": [...]}}} for a
request whose tensors fit the model; requests that do not fit are skipped.
"""
import json
import sys

import numpy as np
import onnxruntime as ort


def main():
    requests, model = sys.argv[1], sys.argv[2]
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    for line in open(requests):
        if not line.strip():
            continue
        try:
            request = json.loads(line)
        except json.JSONDecodeError:
            continue
        feeds = {}
        try:
            for name in names:
                tensor = request["inputs"][name]
                feeds[name] = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
            results = session.run(outputs, feeds)
        except Exception:
            continue
        print(json.dumps({
            "id": request["id"],
            "outputs": {n: {"shape": list(r.shape), "data": [float(v) for v in r.reshape(-1)]} for n, r in zip(outputs, results)},
        }))


if __name__ == "__main__":
    main()
