"""The README's worked example, run with the client researchers really use: the Python ADBC
Flight SQL driver, unmodified, over TLS with the demo CA, a demo token and the project header.

Needs a running gateway: SDE_ADDR (host:port) and SDE_DEMO_DIR (the demo world folder).
`.ci/run` starts one with `sde-gateway serve --demo` and runs this file with pytest.
"""

import os
import pathlib

import adbc_driver_flightsql.dbapi as flightsql
import pyarrow.parquet as pq
import pytest
from adbc_driver_flightsql import DatabaseOptions

ADDR = os.environ.get("SDE_ADDR", "127.0.0.1:50051")
DEMO = pathlib.Path(os.environ.get("SDE_DEMO_DIR", ".sde-demo"))


def connect(user="alice", project="ews-asc-linkage"):
    token = (DEMO / "tokens" / f"{user}.jwt").read_text().strip()
    return flightsql.connect(
        f"grpc+tls://{ADDR}",
        db_kwargs={
            DatabaseOptions.TLS_ROOT_CERTS.value: (DEMO / "tls" / "ca.pem").read_text(),
            DatabaseOptions.AUTHORIZATION_HEADER.value: f"Bearer {token}",
            f"{DatabaseOptions.RPC_CALL_HEADER_PREFIX.value}x-sde-project": project,
        },
    )


def expected_worked_example():
    """Counts from the raw Parquet files: opt-outs removed, small groups withheld, rounded."""
    patients = pq.read_table(DEMO / "data" / "patients").to_pylist()
    opted_out = {r["person_id"] for r in pq.read_table(DEMO / "data" / "opt_outs").to_pylist()}
    groups = {}
    for r in patients:
        if r["person_id"] not in opted_out:
            key = (r["age_band"], r["sex"])
            groups[key] = groups.get(key, 0) + 1
    return {k: 5 * ((n + 2) // 5) for k, n in groups.items() if n >= 10}, len(groups)


def test_worked_example():
    with connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT age_band, sex, COUNT(*) AS n FROM patients GROUP BY age_band, sex")
        table = cur.fetch_arrow_table()
    got = {(r["age_band"], r["sex"]): r["n"] for r in table.to_pylist()}
    want, all_groups = expected_worked_example()
    assert got == want
    assert len(want) < all_groups, "some groups should be withheld"
    metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    assert metadata["sde.groups_withheld"] == str(all_groups - len(want))


def test_row_level_query_is_refused_with_the_rule():
    with connect() as conn, conn.cursor() as cur:
        with pytest.raises(Exception, match="safe-outputs/aggregate-only"):
            cur.execute("SELECT age, district FROM patients")
            cur.fetch_arrow_table()


def test_user_without_the_right_is_refused():
    with connect(user="dave") as conn, conn.cursor() as cur:
        with pytest.raises(Exception, match="safe-projects/not-a-member"):
            cur.execute("SELECT COUNT(*) FROM patients")
            cur.fetch_arrow_table()
