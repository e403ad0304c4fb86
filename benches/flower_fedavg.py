#!/usr/bin/env python3
"""Flower's FedAvg aggregation (flwr.server.strategy.aggregate.aggregate) on the arrays of
benches/benches/federated.rs, for its side-by-side run:

    flower_fedavg.py CLIENTS PARAMETERS ROUNDS

Client c's update is value[i] = ((i * 7919 + c * 104729) % 1000) / 1000 - 0.5 (float32), its
weight (number of examples) 100 + c. Prints {"seconds": median aggregation time, "checksum":
sum of the aggregate's first 1000 values} as JSON.
"""
import json
import statistics
import sys
import time

import numpy as np
from flwr.server.strategy.aggregate import aggregate


def main():
    clients, parameters, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    index = np.arange(parameters, dtype=np.int64)
    results = []
    for c in range(clients):
        values = (((index * 7919 + c * 104729) % 1000) / 1000.0 - 0.5).astype(np.float32)
        results.append(([values], 100 + c))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        out = aggregate(results)
        times.append(time.perf_counter() - start)
    print(json.dumps({"seconds": statistics.median(times), "checksum": float(np.sum(out[0][:1000], dtype=np.float64))}))


if __name__ == "__main__":
    main()
