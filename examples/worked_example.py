# The README's worked example: one aggregate query and one refused query, as researcher alice.
# SDE_ADDR (default 127.0.0.1:50051) and SDE_DEMO_DIR (default .sde-demo) say where the demo is.
import os
import pathlib

import adbc_driver_flightsql.dbapi as flightsql
from adbc_driver_flightsql import DatabaseOptions

addr = os.environ.get("SDE_ADDR", "127.0.0.1:50051")
demo = pathlib.Path(os.environ.get("SDE_DEMO_DIR", ".sde-demo"))
token = (demo / "tokens/alice.jwt").read_text().strip()
conn = flightsql.connect(
    f"grpc+tls://{addr}",
    db_kwargs={
        DatabaseOptions.TLS_ROOT_CERTS.value: (demo / "tls/ca.pem").read_text(),
        DatabaseOptions.AUTHORIZATION_HEADER.value: f"Bearer {token}",
        DatabaseOptions.RPC_CALL_HEADER_PREFIX.value + "x-sde-project": "ews-asc-linkage",
    },
    autocommit=True,  # the gateway only reads: there are no transactions
)
cur = conn.cursor()
cur.execute("SELECT age_band, sex, COUNT(*) AS n FROM patients GROUP BY age_band, sex ORDER BY age_band, sex")
table = cur.fetch_arrow_table()
for row in table.to_pylist()[:6]:
    print(row)
print("...", table.num_rows, "groups released")
for key, value in sorted(table.schema.metadata.items()):
    print(f"{key.decode()}: {value.decode()}")

try:
    cur.execute("SELECT age, district FROM patients")
except flightsql.ProgrammingError as e:
    print("refused:", str(e).splitlines()[0])
cur.close()
conn.close()
