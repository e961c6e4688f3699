"""Latency of the README's worked example through the real stack (ADBC Flight SQL driver,
TLS, token, policy, disclosure control, audit), against a running gateway.

    python bench/worked_example_latency.py [--addr 127.0.0.1:50051] [--demo .sde-demo] [--runs 20]

Prints the median and the other order statistics of the wall time of execute + fetch, measured
on one connection after one warm-up run.
"""

import argparse
import pathlib
import statistics
import time

import adbc_driver_flightsql.dbapi as flightsql
from adbc_driver_flightsql import DatabaseOptions

SQL = "SELECT age_band, sex, COUNT(*) AS n FROM patients GROUP BY age_band, sex"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", default="127.0.0.1:50051")
    ap.add_argument("--demo", default=".sde-demo")
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    demo = pathlib.Path(args.demo)
    conn = flightsql.connect(
        f"grpc+tls://{args.addr}",
        db_kwargs={
            DatabaseOptions.TLS_ROOT_CERTS.value: (demo / "tls/ca.pem").read_text(),
            DatabaseOptions.AUTHORIZATION_HEADER.value: "Bearer " + (demo / "tokens/alice.jwt").read_text().strip(),
            DatabaseOptions.RPC_CALL_HEADER_PREFIX.value + "x-sde-project": "ews-asc-linkage",
        },
    )
    cur = conn.cursor()
    cur.execute(SQL)
    cur.fetch_arrow_table()
    times = []
    for _ in range(args.runs):
        start = time.perf_counter()
        cur.execute(SQL)
        table = cur.fetch_arrow_table()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    print(
        f"worked example, {args.runs} runs, {table.num_rows} rows: median {statistics.median(times):.1f} ms, "
        f"min {times[0]:.1f} ms, p90 {times[int(0.9 * len(times)) - 1]:.1f} ms, max {times[-1]:.1f} ms"
    )


if __name__ == "__main__":
    main()
