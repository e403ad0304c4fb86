"""The Bytewax side of the side-by-side job (see compare.sh).

1,000,000 JSON heartbeats from one file, keyed by node, 10-second tumbling event-time
windows with count and mean cpu; one JSON line per (node, window) to the output file.

Run: python -m bytewax.run -w WORKERS benches/bytewax/job:flow
with EDGEFLOW_BENCH_INPUT and EDGEFLOW_BENCH_OUTPUT set.
"""

import json
import os
from datetime import datetime, timedelta, timezone

import bytewax.operators as op
import bytewax.operators.windowing as win
from bytewax.connectors.files import FileSink, FileSource
from bytewax.dataflow import Dataflow

INPUT = os.environ["EDGEFLOW_BENCH_INPUT"]
OUTPUT = os.environ["EDGEFLOW_BENCH_OUTPUT"]
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
LENGTH = timedelta(seconds=10)

flow = Dataflow("heartbeat_windows")
# Batched input: the file source hands lines over 10,000 at a time.
lines = op.input("read", flow, FileSource(INPUT, batch_size=10_000))
beats = op.map("parse", lines, json.loads)
keyed = op.key_on("by_node", beats, lambda hb: hb["node_id"])
clock = win.EventClock(
    ts_getter=lambda hb: EPOCH + timedelta(milliseconds=hb["timestamp"]),
    wait_for_system_duration=timedelta(seconds=5),
)
windower = win.TumblingWindower(length=LENGTH, align_to=EPOCH)


def builder():
    return [0, 0.0]


def folder(acc, hb):
    acc[0] += 1
    acc[1] += hb["cpu"]
    return acc


def merger(a, b):
    return [a[0] + b[0], a[1] + b[1]]


windows = win.fold_window("windows", keyed, clock, windower, builder, folder, merger)


def encode(item):
    node, (window_id, (count, total)) = item
    start = window_id * 10_000
    row = {"key": node, "window_start": start, "window_end": start + 10_000, "count": count, "mean": total / count}
    # FileSink is partitioned: every line goes to the one output file, key "out".
    return ("out", json.dumps(row))


op.output("write", op.map("encode", windows.down, encode), FileSink(OUTPUT))
