#!/usr/bin/env python3
"""The batched-inference baseline in ONNX Runtime's Python API (PyPI onnxruntime), for
benches/benches/inference.rs: runs MODEL at BATCH rows with random float32 inputs on one
intra-op thread for SECONDS and prints {"rows_per_second": ..., "runs": ...} as JSON.

    onnx_python.py MODEL.onnx BATCH SECONDS
"""
import json
import sys
import time

import numpy as np
import onnxruntime as ort


def main():
    model, batch, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    feeds = {}
    for spec in session.get_inputs():
        shape = [batch] + [int(d) for d in spec.shape[1:]]
        feeds[spec.name] = rng.uniform(-1, 1, size=shape).astype(np.float32)
    for _ in range(3):
        session.run(None, feeds)
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or runs < 10:
        session.run(None, feeds)
        runs += 1
    elapsed = time.perf_counter() - start
    print(json.dumps({"rows_per_second": runs * batch / elapsed, "runs": runs, "seconds": elapsed}))


if __name__ == "__main__":
    main()
