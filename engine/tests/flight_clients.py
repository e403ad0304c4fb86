"""Queries a running edgeflow pipeline over Arrow Flight SQL with clients no one here
wrote: the ADBC Flight SQL driver (adbc-driver-flightsql) and pyarrow.flight. Prints one
JSON report on standard output for the Rust test to check.

usage: flight_clients.py HOST:PORT TOKEN NODES
"""

import json
import sys
import time

import adbc_driver_flightsql
import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import pyarrow.flight as flight

address, token, fleet = sys.argv[1], sys.argv[2], int(sys.argv[3])
uri = f"grpc://{address}"
report = {}


def connect(with_token):
    options = {adbc_driver_flightsql.DatabaseOptions.AUTHORIZATION_HEADER.value: f"Bearer {with_token}"}
    return flightsql.connect(uri, db_kwargs=options)


def error_of(call):
    """The error a call raises, as (class name, message)."""
    try:
        call()
    except Exception as err:  # noqa: BLE001 - any refusal is what is looked for
        return [type(err).__name__, str(err)]
    return None


connection = connect(token)
cursor = connection.cursor()

# The first query waits for every node to have sent a heartbeat (the pipeline just started;
# before its tables complete a time, a query is refused as unavailable).
deadline = time.time() + 60
while True:
    try:
        cursor.execute(
            "SELECT node_id, status, CAST(last_heartbeat AS BIGINT) AS last_heartbeat, cpu FROM nodes ORDER BY node_id"
        )
        nodes = cursor.fetch_arrow_table()
        if nodes.num_rows >= fleet:
            break
    except adbc_driver_manager.Error as err:
        report.setdefault("waited_for", str(err))
    if time.time() > deadline:
        raise SystemExit(f"the table did not reach {fleet} nodes: {report.get('waited_for')}")
    time.sleep(0.2)
metadata = nodes.schema.metadata or {}
report["as_of"] = int(metadata[b"edgeflow.as_of"])
report["nodes"] = [
    list(row)
    for row in zip(*(nodes.column(name).to_pylist() for name in ("node_id", "status", "last_heartbeat", "cpu")))
]
report["nodes_schema"] = [[f.name, str(f.type), f.nullable] for f in nodes.schema]

# One time for the whole query, in the metadata and from edgeflow_as_of().
cursor.execute(
    "SELECT edgeflow_as_of() AS at, (SELECT count(*) FROM nodes) AS nodes, (SELECT count(*) FROM changes) AS changes"
)
table = cursor.fetch_arrow_table()
report["as_of_fn"] = [
    int(table.schema.metadata[b"edgeflow.as_of"]),
    table.column("at").cast("int64").to_pylist()[0],
]
report["counts"] = [table.column("nodes").to_pylist()[0], table.column("changes").to_pylist()[0]]

# A prepared statement with a parameter, executed twice with different values.
first, second = report["nodes"][0][0], report["nodes"][-1][0]
prepared = []
for node in (first, second):
    cursor.execute("SELECT node_id FROM nodes WHERE node_id = $1", parameters=(node,))
    prepared.append(cursor.fetch_arrow_table().column("node_id").to_pylist())
report["prepared"] = [[first, second], prepared]

# Catalog calls.
report["table_types"] = connection.adbc_get_table_types()
objects = connection.adbc_get_objects(depth="tables").read_all().to_pylist()
report["objects"] = [
    [catalog["catalog_name"], schema["db_schema_name"], sorted(t["table_name"] for t in schema["db_schema_tables"])]
    for catalog in objects
    for schema in catalog["catalog_db_schemas"]
]
schema = connection.adbc_get_table_schema("changes", catalog_filter="edgeflow", db_schema_filter="live")
report["changes_schema"] = [[f.name, str(f.type), f.nullable] for f in schema]
info = connection.adbc_get_info()
report["vendor"] = info.get("vendor_name")

# Refusals: bad SQL, an unknown table, a statement that is not a query, a wrong token.
report["bad_sql"] = error_of(lambda: cursor.execute("SELEC node_id FROM nodes"))
report["unknown_table"] = error_of(lambda: cursor.execute("SELECT * FROM nowhere"))
report["not_a_query"] = error_of(lambda: cursor.execute("DROP TABLE nodes"))
cursor.close()
connection.close()


def wrong_token():
    with connect("x" * 32) as refused:
        with refused.cursor() as c:
            c.execute("SELECT * FROM nodes")
            c.fetch_arrow_table()


report["wrong_token"] = error_of(wrong_token)

# pyarrow.flight, by hand: the Basic -> Bearer handshake, then a CommandStatementQuery whose
# FlightInfo schema must equal the schema DoGet sends, metadata and nullability included.


def varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number, payload):
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def command(name, body):
    any_type = f"type.googleapis.com/arrow.flight.protocol.sql.{name}".encode()
    return field(1, any_type) + field(2, body)


client = flight.FlightClient(uri)
header = client.authenticate_basic_token("analyst", token)
options = flight.FlightCallOptions(headers=[header])
report["handshake_header"] = [header[0].decode(), header[1].decode().split(" ")[0]]
query = command("CommandStatementQuery", field(1, b"SELECT node_id, region, status FROM nodes WHERE region IS NOT NULL"))
info = client.get_flight_info(flight.FlightDescriptor.for_command(query), options)
reader = client.do_get(info.endpoints[0].ticket, options)
fetched = reader.read_all()
report["flight_schema_equal"] = info.schema.equals(fetched.schema, check_metadata=True)
report["flight_rows"] = fetched.num_rows
try:
    client.get_flight_info(flight.FlightDescriptor.for_command(query))
    report["flight_no_token"] = None
except flight.FlightUnauthenticatedError as err:
    report["flight_no_token"] = ["FlightUnauthenticatedError", str(err)]
try:
    flight.FlightClient(uri).authenticate_basic_token("analyst", "not-the-token-at-all")
    report["flight_bad_basic"] = None
except flight.FlightUnauthenticatedError as err:
    report["flight_bad_basic"] = ["FlightUnauthenticatedError", str(err)]

# A subscription (DoGet with an `Any` of type edgeflow.Subscribe whose value is the SQL):
# the first batch is the result as +1 rows, then changes and progress rows. Replayed up to
# the last time read, the changes are the table as of that time.
subscription = flight.Ticket(
    field(1, b"type.googleapis.com/edgeflow.Subscribe") + field(2, b"SELECT node_id, status FROM nodes")
)
reader = client.do_get(subscription, options)
state, last, progress, retracted, schema = {}, None, 0, 0, None
deadline = time.time() + 60
while time.time() < deadline:
    batch = reader.read_chunk().data
    schema = batch.schema
    times = batch.column("time").cast("int64").to_pylist()
    for at, progressed, diff, node, status in zip(
        times, *(batch.column(name).to_pylist() for name in ("progressed", "diff", "node_id", "status"))
    ):
        assert last is None or at >= last, "times go forward"
        last = at
        if progressed:
            progress += 1
            continue
        key = (node, status)
        state[key] = state.get(key, 0) + diff
        retracted += diff < 0
    if progress > 0 and retracted > 0 and time.time() > deadline - 55:
        break
reader.cancel()
report["subscription"] = {
    "time": last,
    "rows": sorted([node, status, count] for (node, status), count in state.items() if count != 0),
    "progress": progress,
    "retracted": retracted,
    "schema": [[f.name, str(f.type), f.nullable] for f in schema],
}

print(json.dumps(report))
