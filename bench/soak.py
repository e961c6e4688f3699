"""Soak: many researchers at once, some of them hostile, against one gateway.

Starts `sde-gateway serve --demo` (or uses a running one with --addr/--demo-dir/--pid), runs
CLIENTS Python ADBC clients for SECONDS, each sending a mix of ordinary queries and queries from
the hostile corpus (deep chains, huge CASEs, size-amplifying functions, overflowing sums, table
functions, odd literals), and reports:

- queries served (answered, refused with a rule, failed otherwise), per kind;
- crashes: the gateway process dying, or a transport error (must be 0);
- peak resident memory of the gateway (VmHWM), next to limits.memory_pool_bytes;
- p50/p99 latency of the ordinary queries.

Exits non-zero on a crash, on a hostile query answered with an internal error, or on an
ordinary query that failed. Usage:

    python bench/soak.py --binary target/release/sde-gateway --seconds 600 --clients 32
"""

import argparse
import os
import pathlib
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import adbc_driver_flightsql.dbapi as flightsql
from adbc_driver_flightsql import DatabaseOptions

ORDINARY = [
    "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex",
    "SELECT age_band, COUNT(*) AS n FROM patients GROUP BY age_band",
    "SELECT district, COUNT(DISTINCT person_id) AS people FROM patients GROUP BY district",
    "SELECT service_type, SUM(weekly_cost) AS cost FROM asc_services GROUP BY service_type",
    "SELECT referral_source, COUNT(*) AS n FROM ews_referrals GROUP BY referral_source",
    "SELECT COUNT(*) AS n FROM patients WHERE age >= 65",
]


def chain(op, n, term):
    return op.join(term(i) for i in range(n))


def hostile():
    """The hostile corpus (the same classes as tests/api/corpus.rs), ten times past the limits."""
    q = []
    q.append(f"SELECT COUNT(*) FROM patients WHERE {chain(' AND ', 1000, lambda i: f'age <> {i}')}")
    q.append(f"SELECT COUNT(*) FROM patients WHERE {chain(' OR ', 2000, lambda i: f'age = {i}')}")
    q.append(f"SELECT COUNT(*) FROM patients WHERE district = {chain(' || ', 2000, lambda i: repr('a'))}")
    for op in ["+", "*", "-", "/", "%", "<", "=", "AND", "OR", "||"]:
        q.append(f"SELECT COUNT(*) FROM patients WHERE ({chain(f' {op} ', 1000, lambda i: 'age')}) IS NULL")
    q.append(f"SELECT SUM(CASE {chain(' ', 1000, lambda i: f'WHEN age = {i} THEN {i}')} END) FROM patients")
    q.append(f"SELECT SUM({'abs(' * 1000}age{')' * 1000}) FROM patients")
    q.append(f"SELECT COUNT(DISTINCT person_id) FROM ({chain(' UNION ALL ', 5000, lambda i: 'SELECT person_id FROM patients')}) u")
    q.append(f"SELECT nth_value(lag({'CAST(' * 6540}age), 1) OVER () FROM patients")
    q.append("SELECT SUM(length(repeat(district, 100000000))) FROM patients")
    q.append("SELECT COUNT(*) FROM patients WHERE repeat(district, 1000000000000) = 'x'")
    q.append("SELECT SUM(length(lpad(district, 2000000000, 'x'))) FROM patients")
    q.append("SELECT rpad(district, 2000000000) AS d, COUNT(*) FROM patients GROUP BY 1")
    q.append(f"SELECT SUM(length(replace(district, '', '{'y' * 4000}'))) FROM patients")
    q.append("SELECT SUM(length(regexp_replace(district, '.', '$0$0$0$0$0$0$0$0', 'g'))) FROM patients")
    q.append(f"SELECT SUM(length(concat({chain(', ', 200, lambda i: 'repeat(district, 1000)')}))) FROM patients")
    q.append(f"SELECT SUM(length({chain(' || ', 90, lambda i: 'repeat(district, 1000)')})) FROM patients")
    q.append("SELECT SUM(cardinality(array_repeat(age, 1000000000))) FROM patients")
    q.append("SELECT COUNT(*) FROM range(10000000000)")
    q.append("SELECT COUNT(*) FROM generate_series(1, 10000000000)")
    q.append("SELECT SUM(CAST(age AS BIGINT) * 1000000000000000) FROM patients")
    q.append("SELECT SUM(9223372036854775807) FROM patients")
    q.append("SELECT COUNT(*) FROM patients WHERE district = 'a\x00b'")
    q.append("SELECT COUNT(*) FROM patients WHERE district IN ('\u202ex', '\U0001F600', 'e\u0301', '\ufeff')")
    q.append(f"SELECT COUNT(*) FROM patients WHERE district NOT IN ({chain(', ', 10000, lambda i: repr(f'{100000000 + i:09}'))})")
    q.append("SELECT COUNT(*) FROM patients p JOIN gp_events g ON g.person_id = p.person_id JOIN gp_events h ON h.person_id = p.person_id")
    return q


def connect(addr, demo, user="alice", project="ews-asc-linkage"):
    token = (demo / "tokens" / f"{user}.jwt").read_text().strip()
    return flightsql.connect(
        f"grpc+tls://{addr}",
        db_kwargs={
            DatabaseOptions.TLS_ROOT_CERTS.value: (demo / "tls" / "ca.pem").read_text(),
            DatabaseOptions.AUTHORIZATION_HEADER.value: f"Bearer {token}",
            f"{DatabaseOptions.RPC_CALL_HEADER_PREFIX.value}x-sde-project": project,
        },
        autocommit=True,
    )


RULE = re.compile(r"(safe-[a-z]+/[a-z-]+)")


def rss_kib(pid, field):
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def start(binary, people):
    work = pathlib.Path(tempfile.mkdtemp(prefix="soak-"))
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    env = dict(os.environ)
    # One demo researcher plays every client: lift the per-user limits and the project's release
    # budget (a day's exploration, spent in seconds here), keep every other one.
    env.update({
        "SDE_DISCLOSURE__RELEASE_BUDGET_CELLS": "1000000000000",
        "SDE_LIMITS__USER_QUERIES_PER_MINUTE": "1000000",
        "SDE_LIMITS__MAX_CONCURRENT_QUERIES_PER_USER": "64",
        "SDE_LIMITS__QUERY_TIMEOUT_SECONDS": "30",
    })
    log = open(work / "gateway.log", "w")
    proc = subprocess.Popen(
        [binary, "serve", "--demo", "--dir", str(work / "world"), "--listen", f"127.0.0.1:{port}", "--people", str(people)],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    for _ in range(600):
        if "demo ready" in (work / "gateway.log").read_text():
            break
        if proc.poll() is not None:
            sys.exit(f"gateway exited at start:\n{(work / 'gateway.log').read_text()}")
        time.sleep(0.2)
    return proc, f"127.0.0.1:{port}", work / "world"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default="target/release/sde-gateway")
    ap.add_argument("--addr")
    ap.add_argument("--demo-dir")
    ap.add_argument("--pid", type=int)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--hostile-share", type=float, default=0.3)
    ap.add_argument("--people", type=int, default=20000)
    args = ap.parse_args()

    proc = None
    if args.addr:
        addr, demo, pid = args.addr, pathlib.Path(args.demo_dir), args.pid
    else:
        proc, addr, demo = start(args.binary, args.people)
        pid = proc.pid
    corpus = hostile()
    deadline = time.monotonic() + args.seconds
    lock = threading.Lock()
    counts = {}
    ordinary_ms = []
    problems = []
    peak = [0]

    def note(key):
        with lock:
            counts[key] = counts.get(key, 0) + 1

    def client(i):
        rng = random.Random(i)
        conn = connect(addr, demo)
        while time.monotonic() < deadline:
            is_hostile = rng.random() < args.hostile_share
            sql = rng.choice(corpus) if is_hostile else rng.choice(ORDINARY)
            kind = "hostile" if is_hostile else "ordinary"
            started = time.monotonic()
            try:
                with conn.cursor() as cur:
                    cur.execute(sql)
                    cur.fetch_arrow_table()
                note(f"{kind} answered")
                if not is_hostile:
                    with lock:
                        ordinary_ms.append((time.monotonic() - started) * 1000)
            except Exception as e:  # noqa: BLE001 — every outcome is classified below
                text = str(e)
                rule = RULE.search(text)
                if rule:
                    note(f"{kind} refused {rule.group(1)}")
                    if not is_hostile and rule.group(1) != "safe-settings/concurrency":
                        problems.append(f"ordinary query refused: {sql}: {text[:200]}")
                elif "INVALID_ARGUMENT" in text or "InvalidArgument" in text:
                    note(f"{kind} refused (invalid query)")
                else:
                    note(f"{kind} failed")
                    problems.append(f"{kind} query failed: {sql[:120]}: {text[:300]}")
                    if "UNAVAILABLE" in text or "IO" in text:
                        conn.close()
                        conn = connect(addr, demo)
        conn.close()

    def sampler():
        while time.monotonic() < deadline:
            rss = rss_kib(pid, "VmRSS")
            if rss:
                peak[0] = max(peak[0], rss)
            time.sleep(0.1)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    threads.append(threading.Thread(target=sampler))
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    alive = pid is not None and pathlib.Path(f"/proc/{pid}").exists() and (proc is None or proc.poll() is None)
    hwm = rss_kib(pid, "VmHWM") if alive else None
    crashes = 0 if alive else 1
    served = sum(counts.values())
    ordinary_ms.sort()
    pct = lambda p: ordinary_ms[min(len(ordinary_ms) - 1, int(p * len(ordinary_ms)))] if ordinary_ms else float("nan")
    print(f"soak: {args.clients} clients for {args.seconds:.0f} s, {args.hostile_share:.0%} hostile, {len(corpus)} hostile queries")
    print(f"queries served: {served}")
    for key in sorted(counts):
        print(f"  {key}: {counts[key]}")
    print(f"crashes: {crashes}")
    print(f"peak resident memory: {(hwm or peak[0]) / 1024:.0f} MiB (VmHWM; sampled VmRSS peak {peak[0] / 1024:.0f} MiB)")
    print(f"ordinary queries: {len(ordinary_ms)}, p50 {pct(0.5):.1f} ms, p99 {pct(0.99):.1f} ms")
    for p in problems[:20]:
        print(f"problem: {p}")
    if proc is not None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        verify = subprocess.run(
            [args.binary, "audit", "verify", "--dir", str(demo / "audit"), "--public-key", str(demo / "audit.pub")],
            capture_output=True, text=True,
        )
        print(f"audit verify: exit {verify.returncode}: {verify.stdout.strip()} {verify.stderr.strip()}")
        if verify.returncode != 0:
            problems.append("the audit log did not verify")
    sys.exit(1 if crashes or problems else 0)


if __name__ == "__main__":
    main()
