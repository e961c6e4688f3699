"""The README's worked example, run with the client researchers really use: the Python ADBC
Flight SQL driver, unmodified, over TLS with the demo CA, a demo token and the project header.
The tests also run `examples/worked_example.py` and the snippets of `docs/researcher.md`, and
check that they print what those documents show.

Needs a running gateway: SDE_ADDR (host:port) and SDE_DEMO_DIR (the demo world folder).
`.ci/run` starts one with `sde-gateway serve --demo --people 20000` and runs this file with pytest.
"""

import os
import pathlib
import re
import subprocess
import sys

import adbc_driver_flightsql.dbapi as flightsql
import pyarrow.parquet as pq
import pytest
from adbc_driver_flightsql import DatabaseOptions

ADDR = os.environ.get("SDE_ADDR", "127.0.0.1:50051")
DEMO = pathlib.Path(os.environ.get("SDE_DEMO_DIR", ".sde-demo"))
ROOT = pathlib.Path(__file__).resolve().parents[2]


def connect(user="alice", project="ews-asc-linkage"):
    token = (DEMO / "tokens" / f"{user}.jwt").read_text().strip()
    return flightsql.connect(
        f"grpc+tls://{ADDR}",
        db_kwargs={
            DatabaseOptions.TLS_ROOT_CERTS.value: (DEMO / "tls" / "ca.pem").read_text(),
            DatabaseOptions.AUTHORIZATION_HEADER.value: f"Bearer {token}",
            f"{DatabaseOptions.RPC_CALL_HEADER_PREFIX.value}x-sde-project": project,
        },
        autocommit=True,
    )


def doc_block(path, name):
    """The fenced block between `<!-- name:start -->` and `<!-- name:end -->` in a document."""
    text = (ROOT / path).read_text(encoding="utf-8")
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    assert text.count(start) == 1 and text.count(end) == 1, f"{path} needs one pair of {name} markers"
    lines = text.split(start, 1)[1].split(end, 1)[0].strip().splitlines()
    assert lines[0].startswith("```") and lines[-1] == "```", f"{path}: {name} is not one fenced block"
    return "\n".join(lines[1:-1]) + "\n"


def run_python(code):
    """Runs `code` as a script in a fresh interpreter against the demo; returns its stdout."""
    env = {**os.environ, "SDE_ADDR": ADDR, "SDE_DEMO_DIR": str(DEMO)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", f"unexpected output on stderr (warnings?):\n{result.stderr}"
    return result.stdout


def expected_worked_example():
    """True counts from the raw Parquet files: opt-outs removed, small groups withheld."""
    patients = pq.read_table(DEMO / "data" / "patients").to_pylist()
    opted_out = {r["person_id"] for r in pq.read_table(DEMO / "data" / "opt_outs").to_pylist()}
    groups = {}
    for r in patients:
        if r["person_id"] not in opted_out:
            key = (r["age_band"], r["sex"])
            groups[key] = groups.get(key, 0) + 1
    return {k: n for k, n in groups.items() if n >= 10}, len(groups)


def test_worked_example():
    with connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT age_band, sex, COUNT(*) AS n FROM patients GROUP BY age_band, sex")
        table = cur.fetch_arrow_table()
    got = {(r["age_band"], r["sex"]): r["n"] for r in table.to_pylist()}
    want, all_groups = expected_worked_example()
    # The groups with 10 people or more, each count perturbed by at most 3 and rounded to 5.
    assert got.keys() == want.keys()
    for key, n in got.items():
        assert n % 5 == 0 and abs(n - want[key]) <= 5, (key, n, want[key])
    assert len(want) < all_groups, "some groups should be withheld"
    metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    assert metadata["sde.groups_withheld"] == str(all_groups - len(want))


def test_readme_shows_the_worked_example_file():
    source = (ROOT / "examples" / "worked_example.py").read_text(encoding="utf-8")
    assert doc_block("README.md", "worked-example") == source


def budget_left_out(output):
    """The output with the release budget left: it depends on what the project released before."""
    return re.sub(r"^sde\.budget_remaining: \d+$", "sde.budget_remaining: N", output, flags=re.M)


def test_worked_example_prints_what_the_readme_shows():
    source = (ROOT / "examples" / "worked_example.py").read_text(encoding="utf-8")
    printed = run_python(source)
    assert re.search(r"^sde\.budget_remaining: \d+$", printed, flags=re.M), printed
    assert budget_left_out(printed) == budget_left_out(doc_block("README.md", "worked-example-output"))


def test_researcher_guide_dataframes_print_what_it_shows():
    code = doc_block("docs/researcher.md", "connect") + doc_block("docs/researcher.md", "dataframes")
    assert run_python(code) == doc_block("docs/researcher.md", "dataframes-output")


def test_researcher_guide_reads_a_receipt():
    out = run_python(doc_block("docs/researcher.md", "receipt"))
    assert re.fullmatch(r"\[\{'sex': 'F', 'n': \d+\}, \{'sex': 'M', 'n': \d+\}\]\nreceipt: \d+ [0-9a-f]{64}\n", out), out


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


def test_bound_parameters_answer_as_literals_and_stay_values():
    sql = "SELECT district, COUNT(*) AS n FROM patients WHERE age >= ? GROUP BY district ORDER BY district"
    with connect() as conn, conn.cursor() as cur:
        cur.execute(sql, (90,))
        bound = cur.fetch_arrow_table().to_pylist()
        cur.execute(sql.replace("?", "90"))
        literal = cur.fetch_arrow_table().to_pylist()
        assert bound == literal and bound, bound
        # A quote in a parameter stays inside the string: no row matches it.
        cur.execute("SELECT COUNT(*) AS n FROM patients WHERE district = ?", ("Colchester' OR '1'='1",))
        assert cur.fetch_arrow_table().to_pylist() == [{"n": None}]
        with pytest.raises(Exception, match="safe-outputs/aggregate-only"):
            cur.execute("SELECT person_id FROM patients WHERE age > ?", (90,))
            cur.fetch_arrow_table()
