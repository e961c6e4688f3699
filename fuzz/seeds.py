#!/usr/bin/env python3
"""Writes the fuzz seed corpus: every SQL statement written in the tests, the docs and
shared/attacks.md, one file each, into fuzz/corpus/plan_sql (raw SQL) and fuzz/corpus/plan
(the same text behind a 0 byte, which the structured target reads as raw SQL).

fuzz/findings/*.sql (statements that once crashed the harness) are seeds too.

Statements are string literals (Rust "..." and r#"..."#, Python '...' and "...") and
`backtick` spans that start like a query; `{...}` placeholders in code become 0. The corpus is
made anew from the sources each time, so it is not kept in git.

Usage: python3 fuzz/seeds.py
"""
import hashlib
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
START = re.compile(r"^\s*\(?\s*(SELECT|WITH|VALUES|EXPLAIN|CREATE|INSERT|DROP|UPDATE|DELETE|COPY|SET|SHOW|DESCRIBE|TABLE)\b", re.I)
RUST_RAW = re.compile(r'r(#+)"(.*?)"\1', re.S)
RUST_STR = re.compile(r'"((?:[^"\\]|\\.)*)"', re.S)
PY_STR = re.compile(r'"""(.*?)"""|\'((?:[^\'\\\n]|\\.)*)\'|"((?:[^"\\\n]|\\.)*)"', re.S)
TICKS = re.compile(r"`([^`\n]+)`")
PLACEHOLDER = re.compile(r"\{[^{}]*\}")


def unescape_rust(s: str) -> str:
    s = re.sub(r"\\\n\s*", "", s)  # line continuations
    return s.replace('\\"', '"').replace("\\n", "\n").replace("\\t", "\t").replace("\\\\", "\\")


def statements():
    for path in sorted((ROOT / "src").rglob("*.rs")) + sorted((ROOT / "tests").rglob("*.rs")):
        text = path.read_text(encoding="utf-8")
        for m in RUST_RAW.finditer(text):
            yield m.group(2), True
        for m in RUST_STR.finditer(RUST_RAW.sub("", text)):
            yield unescape_rust(m.group(1)), True
    for path in sorted((ROOT / "tests").rglob("*.py")) + sorted((ROOT / "bench").rglob("*.py")):
        for m in PY_STR.finditer(path.read_text(encoding="utf-8")):
            yield next(g for g in m.groups() if g is not None), True
    # Inputs the fuzzer found that killed the process before libFuzzer could keep them: each
    # is replayed first by every run, CI's included.
    for path in sorted((ROOT / "fuzz" / "findings").glob("*.sql")):
        yield path.read_text(encoding="utf-8"), False
    docs = [ROOT / "README.md", ROOT.parent / "shared" / "attacks.md", *sorted((ROOT / "docs").glob("*.md"))]
    for path in docs:
        if path.exists():
            for m in TICKS.finditer(path.read_text(encoding="utf-8")):
                yield m.group(1).replace("…", "0"), False


def main():
    seen = set()
    for sql, formatted in statements():
        if formatted:
            sql = PLACEHOLDER.sub("0", sql.replace("{{", "(").replace("}}", ")"))
        sql = sql.strip()
        if START.match(sql) and sql not in seen:
            seen.add(sql)
    for target, prefix in (("plan_sql", b""), ("plan", b"\0")):
        out = ROOT / "fuzz" / "corpus" / target
        out.mkdir(parents=True, exist_ok=True)
        for sql in seen:
            data = prefix + sql.encode("utf-8")
            (out / f"seed-{hashlib.sha1(data).hexdigest()[:16]}").write_bytes(data)
    print(f"{len(seen)} seed statements in fuzz/corpus/plan_sql and fuzz/corpus/plan")


if __name__ == "__main__":
    main()
