//! The repetition renderers: [`Deep`] expressions and [`DeepQuery`] statements, `n` copies of
//! a unit (parentheses, operators, subqueries, joins, CTEs, …) up to the size cap.

use std::fmt::Write as _;

use super::TABLES;
use super::ast::*;
use super::render::{Renderer, repeat_count};
use super::terms::binop_text;

impl Renderer {
    /// `item(i)` for each `i` of `range`, with `sep` between them, until the size cap (checked
    /// before each item; the separator and the item are written unchecked after it).
    fn each(&mut self, range: impl IntoIterator<Item = usize>, sep: &str, mut item: impl FnMut(&mut Self, usize)) {
        for (k, i) in range.into_iter().enumerate() {
            if self.full() {
                break;
            }
            if k > 0 {
                self.out.push_str(sep);
            }
            item(self, i);
        }
    }

    /// `n` copies of `unit`, stopping at the size cap.
    fn repeat(&mut self, unit: &str, n: usize) {
        self.each(0..n, "", |r, _| r.out.push_str(unit));
    }

    /// `open` `n` times, `inner`, then `close` `n` times.
    fn nest(&mut self, open: &str, n: usize, inner: impl FnOnce(&mut Self), close: &str) {
        self.repeat(open, n);
        inner(self);
        self.repeat(close, n);
    }

    pub(super) fn deep(&mut self, d: &Deep) {
        let n = repeat_count(d.count);
        let inner = |r: &mut Self| r.sub(&d.inner);
        match d.kind {
            DeepKind::Parens => self.nest("(", n, inner, ")"),
            DeepKind::Not => {
                self.repeat("NOT ", n);
                inner(self);
            }
            DeepKind::Minus => {
                self.repeat("- ", n);
                inner(self);
            }
            DeepKind::Chain(op) => {
                inner(self);
                let unit = format!(" {} ", binop_text(op));
                self.each(0..n, "", |r, _| {
                    r.out.push_str(&unit);
                    inner(r);
                });
            }
            DeepKind::LeftChain(op) => {
                // ((((a op a) op a) op a) …): parenthesised to the left.
                self.repeat("(", n);
                inner(self);
                let unit = format!(" {} ", binop_text(op));
                self.each(0..n, "", |r, _| {
                    r.out.push_str(&unit);
                    inner(r);
                    r.out.push(')');
                });
            }
            DeepKind::Call(f) => {
                let name = self.rendered(|r| r.function_name(f));
                self.nest(&format!("{name}("), n, inner, ")");
            }
            DeepKind::Case => self.nest("CASE WHEN age > 1 THEN ", n, inner, " ELSE 0 END"),
            DeepKind::CaseBranches => {
                self.push("CASE");
                self.each(0..n, "", |r, i| {
                    let _ = write!(r.out, " WHEN age = {i} THEN ");
                    inner(r);
                });
                self.push(" ELSE 0 END");
            }
            DeepKind::CaseOperandBranches => {
                self.push("CASE district");
                self.each(0..n, "", |r, i| {
                    let _ = write!(r.out, " WHEN 'd{i}' THEN {i}");
                });
                self.push(" END");
            }
            DeepKind::ScalarSubquery => self.nest("(SELECT ", n, inner, ")"),
            DeepKind::Cast(t) => {
                self.repeat("CAST(", n);
                inner(self);
                let ty = self.rendered(|r| r.sql_type(t));
                self.repeat(&format!(" AS {ty})"), n);
            }
            DeepKind::DoubleColon(t) => {
                inner(self);
                let ty = self.rendered(|r| r.sql_type(t));
                self.repeat(&format!("::{ty}"), n);
            }
            DeepKind::IsNull => {
                inner(self);
                self.repeat(" IS NULL", n);
            }
            DeepKind::WideCall(f) => {
                self.function_name(f);
                self.push("(");
                inner(self);
                self.each(0..n, "", |r, _| {
                    r.out.push_str(", ");
                    inner(r);
                });
                self.push(")");
            }
            DeepKind::InList => {
                inner(self);
                self.push(" IN (");
                self.each(0..n * 25, ", ", |r, i| {
                    let _ = write!(r.out, "'{:09}'", 100_000_000 + i);
                });
                self.push(")");
            }
            DeepKind::InListExprs => {
                inner(self);
                self.push(" IN (");
                self.each(0..n, ", ", |r, i| {
                    let _ = write!(r.out, "{i} + age");
                });
                self.push(")");
            }
            DeepKind::InSubquery => self.nest("person_id IN (SELECT person_id FROM patients WHERE ", n, inner, ")"),
            DeepKind::Exists => self.nest("EXISTS (SELECT 1 FROM gp_events WHERE ", n, inner, ")"),
            DeepKind::Between => {
                inner(self);
                self.each(0..n, "", |r, _| {
                    r.out.push_str(" BETWEEN 1 AND ");
                    inner(r);
                });
            }
            DeepKind::Concat => {
                self.push("district");
                self.repeat(" || 'a'", n);
            }
            DeepKind::Like => {
                inner(self);
                self.repeat(" LIKE '%a%'", n);
            }
            DeepKind::OrOfEquals => self.each(0..n.max(1), " OR ", |r, i| {
                let _ = write!(r.out, "age = {i}");
            }),
            DeepKind::AndOfNotEquals => self.each(0..n.max(1), " AND ", |r, i| {
                let _ = write!(r.out, "age <> {i}");
            }),
            DeepKind::Coalesce => self.nest("coalesce(NULL, ", n, inner, ")"),
            DeepKind::NestedAgg => self.nest("SUM(", n, inner, ")"),
            DeepKind::ArrayIndex => {
                inner(self);
                self.repeat("[1]", n);
            }
            DeepKind::LongString => {
                self.push("'");
                self.repeat("\u{202E}\u{1F600}\0x", n * 50);
                self.push("'");
            }
        }
    }

    pub(super) fn deep_query(&mut self, d: &DeepQuery) {
        let n = repeat_count(d.count);
        let inner = |r: &mut Self| {
            r.aggregate(&d.inner, None);
        };
        match d.kind {
            DeepQueryKind::NestedDerived => {
                self.push("SELECT COUNT(*) AS n FROM ");
                self.repeat("(SELECT * FROM ", n);
                self.push("patients");
                self.each(0..n, "", |r, i| {
                    let _ = write!(r.out, ") AS d{i}");
                });
            }
            DeepQueryKind::NestedInSubquery => {
                self.push("SELECT COUNT(*) AS n FROM patients WHERE ");
                self.nest(
                    "person_id IN (SELECT person_id FROM gp_events WHERE ",
                    n,
                    |r| r.push("true"),
                    ")",
                );
            }
            DeepQueryKind::NestedExists => {
                self.push("SELECT district, COUNT(*) AS n FROM patients p WHERE ");
                self.nest(
                    "EXISTS (SELECT 1 FROM gp_events g WHERE g.person_id = p.person_id AND ",
                    n,
                    |r| r.push("true"),
                    ")",
                );
                self.push(" GROUP BY district");
            }
            DeepQueryKind::CteChain => {
                self.push("WITH c0 AS (SELECT * FROM patients)");
                self.each(1..=n, "", |r, i| {
                    let _ = write!(r.out, ", c{i} AS (SELECT * FROM c{})", i - 1);
                });
                let _ = write!(self.out, " SELECT district, COUNT(*) AS n FROM c{n} GROUP BY district");
            }
            DeepQueryKind::CteWide => {
                self.push("WITH ");
                self.each(0..=n, ", ", |r, i| {
                    let _ = write!(r.out, "c{i} AS (");
                    inner(r);
                    r.push(")");
                });
                self.push(" SELECT COUNT(*) AS n FROM c0");
            }
            DeepQueryKind::UnionChain(op) => {
                self.push("SELECT COUNT(DISTINCT person_id) AS n FROM (SELECT person_id FROM patients");
                let op = match op {
                    SetOp::Union => " UNION ALL ",
                    SetOp::Intersect => " INTERSECT ",
                    SetOp::Except => " EXCEPT ",
                    SetOp::UnionByName => " UNION ",
                };
                self.each(0..n, "", |r, i| {
                    r.out.push_str(op);
                    let _ = write!(r.out, "SELECT person_id FROM {}", TABLES[i % TABLES.len()].0);
                });
                self.push(") AS u");
            }
            DeepQueryKind::JoinChain(kind) => {
                self.push("SELECT p.district, COUNT(*) AS n FROM patients p");
                let kw = match kind {
                    JoinKind::Left => "LEFT JOIN",
                    JoinKind::Right => "RIGHT JOIN",
                    JoinKind::Full => "FULL JOIN",
                    JoinKind::LeftSemi => "LEFT SEMI JOIN",
                    JoinKind::LeftAnti => "LEFT ANTI JOIN",
                    _ => "JOIN",
                };
                self.each(0..n, "", |r, i| {
                    let t = TABLES[1 + i % (TABLES.len() - 1)].0;
                    let _ = write!(r.out, " {kw} {t} j{i} ON j{i}.person_id = p.person_id");
                });
                self.push(" GROUP BY p.district");
            }
            DeepQueryKind::CommaJoins => {
                self.push("SELECT COUNT(*) AS n FROM patients p");
                self.each(0..n, "", |r, i| {
                    let _ = write!(r.out, ", gp_events g{i}");
                });
                self.push(" WHERE true");
                self.each(0..n, "", |r, i| {
                    let _ = write!(r.out, " AND g{i}.person_id = p.person_id");
                });
            }
            DeepQueryKind::QueryParens => self.nest("(", n, inner, ")"),
            DeepQueryKind::ManyItems => {
                self.push("SELECT district");
                self.each(0..n, "", |r, i| {
                    let _ = write!(r.out, ", COUNT(*) AS n{i}");
                });
                self.push(" FROM patients GROUP BY district");
            }
            DeepQueryKind::ManyAggregates(f) => {
                let agg = self.rendered(|r| {
                    r.agg(&Agg {
                        func: f,
                        arg: AggArg::Column(ColRef {
                            rel: 0,
                            col: 2,
                            style: ColStyle::Bare,
                        }),
                        distinct: false,
                        filter: None,
                        order_within: None,
                        over: None,
                    })
                });
                self.push("SELECT district");
                self.each(0..n, "", |r, i| {
                    let _ = write!(r.out, ", {agg} + {i} AS a{i}");
                });
                self.push(" FROM patients GROUP BY district");
            }
            DeepQueryKind::ManyGroupKeys => {
                self.push("SELECT COUNT(*) AS n FROM patients GROUP BY district");
                self.each(0..n, "", |r, i| {
                    let _ = write!(r.out, ", age + {i}");
                });
            }
            DeepQueryKind::ManyOrderKeys => {
                inner(self);
                self.push(" ORDER BY 1");
                self.repeat(", 1", n);
            }
            DeepQueryKind::NestedScalar => {
                self.push("SELECT COUNT(*) AS n FROM patients WHERE age > ");
                self.nest("(SELECT ", n, |r| r.push("1"), ")");
            }
            DeepQueryKind::SelfJoinChain => {
                self.push("SELECT COUNT(*) AS n FROM patients p0");
                self.each(1..=n, "", |r, i| {
                    let _ = write!(r.out, " JOIN patients p{i} USING (person_id)");
                });
            }
            DeepQueryKind::GroupingSets => {
                self.push("SELECT district, sex, age_band, COUNT(*) AS n FROM patients GROUP BY GROUPING SETS (");
                self.each(0..=n, ", ", |r, i| {
                    r.out.push_str(match i % 4 {
                        0 => "(district)",
                        1 => "(district, sex)",
                        2 => "(sex, age_band)",
                        _ => "()",
                    });
                });
                self.push(")");
            }
        }
    }
}
