"""Compares the window results of edgeflow and Bytewax: same (key, window) set, same counts,
means equal to 1e-9 relative. Exits non-zero with the first differences otherwise."""

import json
import sys


def load(path):
    results = {}
    with open(path) as lines:
        for line in lines:
            if not line.strip():
                continue
            row = json.loads(line)
            results[(row["key"], row["window_start"])] = (row["count"], row["mean"])
    return results


edgeflow, bytewax = load(sys.argv[1]), load(sys.argv[2])
problems = []
for key in sorted(set(edgeflow) | set(bytewax)):
    a, b = edgeflow.get(key), bytewax.get(key)
    if a is None or b is None or a[0] != b[0] or abs(a[1] - b[1]) > 1e-9 * max(1.0, abs(b[1])):
        problems.append(f"{key}: edgeflow {a} bytewax {b}")
if problems:
    print(f"results differ in {len(problems)} of {len(set(edgeflow) | set(bytewax))} windows:", *problems[:10], sep="\n  ")
    sys.exit(1)
print(f"results equal: {len(edgeflow)} (node, window) results, {sum(c for c, _ in edgeflow.values())} heartbeats")
