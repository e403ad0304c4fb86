#!/usr/bin/env python3
"""Trains the heartbeat anomaly model that pipelines/edge-fleet.yaml serves, and exports it
to ONNX in the model registry (pipelines/models/anomaly/VERSION/model.onnx).

    .venv/bin/python pipelines/models/train_anomaly.py [--heartbeats FILE] [--version N]

Without --heartbeats, the training data comes from edgeflow's own fleet generator: the
script runs `edgeflow run pipelines/models/training-data.yaml` (500 nodes, 2 h of event time,
about 120,000 heartbeats). The model is scikit-learn's IsolationForest on (cpu, memory,
disk), exported with skl2onnx: input `features` float32 [N, 3]; outputs `label` int64 [N, 1]
(1 normal, -1 anomaly) and `scores` float32 [N, 1] (the decision function: below 0 is
anomalous). Everything is seeded, so a rebuild gives the same model.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.ensemble import IsolationForest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
FEATURES = ["cpu", "memory", "disk"]


def edgeflow_command():
    for build in ("release", "debug"):
        binary = os.path.join(ROOT, "target", build, "edgeflow")
        if os.access(binary, os.X_OK):
            return [binary]
    return ["cargo", "run", "--release", "--quiet", "--bin", "edgeflow", "--"]


def generate(path):
    env = dict(os.environ, TRAINING_DATA=path)
    command = edgeflow_command() + ["run", os.path.join(HERE, "training-data.yaml")]
    print("generating training data:", " ".join(command), file=sys.stderr)
    subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)


def load(path):
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                beat = json.loads(line)
                rows.append([beat[name] for name in FEATURES])
    return np.asarray(rows, dtype=np.float32)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heartbeats", help="JSON lines of heartbeats (default: generate them)")
    parser.add_argument("--version", type=int, default=1, help="registry version to write (default 1)")
    parser.add_argument("--registry", default=HERE, help="model registry directory")
    args = parser.parse_args()

    path = args.heartbeats
    if path is None:
        path = "/tmp/edgeflow-training-heartbeats.jsonl"
        generate(path)
    x = load(path)
    model = IsolationForest(n_estimators=50, max_samples=512, contamination=0.05, random_state=0).fit(x)
    onx = to_onnx(
        model,
        initial_types=[("features", FloatTensorType([None, len(FEATURES)]))],
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    onx.doc_string = "IsolationForest on heartbeat (cpu, memory, disk); trained by train_anomaly.py"
    meta = onx.metadata_props.add()
    meta.key, meta.value = "features", ",".join(FEATURES)
    meta = onx.metadata_props.add()
    meta.key, meta.value = "training_rows", str(len(x))

    model_dir = os.path.join(args.registry, "anomaly")
    version_dir = os.path.join(model_dir, str(args.version))
    staging = version_dir + ".tmp"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    with open(os.path.join(staging, "model.onnx"), "wb") as f:
        f.write(onx.SerializeToString())
    shutil.rmtree(version_dir, ignore_errors=True)
    os.rename(staging, version_dir)  # a running engine never sees a half-written version
    with open(os.path.join(model_dir, "model.json"), "w") as f:
        json.dump(
            {
                "description": "Heartbeat anomaly score: IsolationForest on cpu, memory and disk percent",
                "inputs": [{"name": "features", "type": "float32", "shape": [-1, 3]}],
                "outputs": [
                    {"name": "label", "type": "int64", "shape": [-1, 1]},
                    {"name": "scores", "type": "float32", "shape": [-1, 1]},
                ],
            },
            f,
            indent=2,
        )
        f.write("\n")
    predicted = model.predict(x)
    print(
        f"trained on {len(x)} heartbeats: {np.mean(predicted == -1):.1%} flagged anomalous; "
        f"wrote {os.path.relpath(version_dir, ROOT)}/model.onnx"
    )


if __name__ == "__main__":
    main()
