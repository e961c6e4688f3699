//! Expressions: column references (picked from the relations in scope), operators, CASE,
//! IN / BETWEEN / LIKE / IS, casts, calls, subqueries, and the special forms (EXTRACT,
//! SUBSTRING, TRIM, arrays, structs, …).

use super::TABLES;
use super::ast::*;
use super::names::{ARROW_TYPES, ODD_COLUMNS, WINDOW_FUNCTIONS};
use super::render::{EXPR_DEPTH, Renderer, pick, quoted};

impl Renderer {
    pub(super) fn expr_list(&mut self, exprs: &[Expr]) {
        self.list(exprs, ", ", Self::expr);
    }

    pub(super) fn sub(&mut self, e: &Sub<Expr>) {
        self.descend(e, EXPR_DEPTH, Self::expr, |r| r.push("age"));
    }

    /// `open`, the subquery, `)`.
    fn subquery(&mut self, open: &str, q: &Sub<Query>) {
        self.push(open);
        self.nested_query(q);
        self.push(")");
    }

    pub(super) fn column_name(&self, c: &ColRef) -> String {
        match c.style {
            ColStyle::Odd(i) => pick(ODD_COLUMNS, i).to_string(),
            ColStyle::PersonId => "person_id".to_string(),
            _ => match self.scope.is_empty() {
                true => pick(TABLES[0].1, c.col).to_string(),
                false => {
                    let rel = &self.scope[c.rel as usize % self.scope.len()];
                    match rel.columns.is_empty() {
                        true => "age".to_string(),
                        false => rel.columns[c.col as usize % rel.columns.len()].clone(),
                    }
                }
            },
        }
    }

    pub(super) fn column(&mut self, c: &ColRef) {
        let name = self.column_name(c);
        let rel = match self.scope.is_empty() {
            true => None,
            false => Some(self.scope[c.rel as usize % self.scope.len()].name.clone()),
        };
        let text = match (c.style, rel) {
            (ColStyle::Qualified, Some(rel)) => format!("{rel}.{name}"),
            (ColStyle::Quoted, Some(rel)) => format!("\"{rel}\".\"{}\"", name.replace('"', "\"\"")),
            (ColStyle::Quoted, None) => format!("\"{}\"", name.replace('"', "\"\"")),
            (ColStyle::PersonId, Some(rel)) if c.col % 2 == 0 => format!("{rel}.person_id"),
            _ => name,
        };
        self.push(&text);
    }

    pub(super) fn expr(&mut self, e: &Expr) {
        if self.full() {
            return;
        }
        match e {
            Expr::Column(c) => self.column(c),
            Expr::Lit(l) => self.lit(l),
            Expr::Binary(l, op, r) => {
                self.sub(l);
                self.push(" ");
                self.binop(*op);
                self.push(" ");
                self.sub(r);
            }
            Expr::Unary(op, e) => {
                self.unop(*op);
                self.sub(e);
            }
            Expr::Case {
                operand,
                branches,
                otherwise,
            } => {
                self.push("CASE ");
                if let Some(o) = operand {
                    self.sub(o);
                    self.push(" ");
                }
                if branches.is_empty() {
                    self.push("WHEN age = 99 THEN 1 ");
                }
                for b in branches {
                    self.push("WHEN ");
                    self.sub(&b.condition);
                    self.push(" THEN ");
                    self.sub(&b.result);
                    self.push(" ");
                }
                if let Some(o) = otherwise {
                    self.push("ELSE ");
                    self.sub(o);
                    self.push(" ");
                }
                self.push("END");
            }
            Expr::InList { expr, list, negated } => {
                self.sub(expr);
                self.push(if *negated { " NOT IN (" } else { " IN (" });
                if list.is_empty() {
                    self.push("1");
                }
                self.list(list, ", ", Self::sub);
                self.push(")");
            }
            Expr::Between {
                expr,
                negated,
                low,
                high,
            } => {
                self.sub(expr);
                self.push(if *negated { " NOT BETWEEN " } else { " BETWEEN " });
                self.sub(low);
                self.push(" AND ");
                self.sub(high);
            }
            Expr::Like {
                expr,
                negated,
                kind,
                pattern,
                escape,
            } => {
                self.sub(expr);
                let op = match (kind, negated) {
                    (LikeKind::Like, false) => " LIKE ",
                    (LikeKind::Like, true) => " NOT LIKE ",
                    (LikeKind::ILike, false) => " ILIKE ",
                    (LikeKind::ILike, true) => " NOT ILIKE ",
                    (LikeKind::SimilarTo, false) => " SIMILAR TO ",
                    (LikeKind::SimilarTo, true) => " NOT SIMILAR TO ",
                    (LikeKind::Regex, _) => " ~ ",
                    (LikeKind::RegexI, _) => " ~* ",
                    (LikeKind::NotRegex, _) => " !~ ",
                    (LikeKind::Glob, _) => " GLOB ",
                };
                self.push(op);
                self.sub(pattern);
                if let Some(c) = escape {
                    let c = if *c == '\'' { "''".to_string() } else { c.to_string() };
                    self.push(&format!(" ESCAPE '{c}'"));
                }
            }
            Expr::Is(e, test) => {
                self.sub(e);
                match test {
                    IsTest::Null => self.push(" IS NULL"),
                    IsTest::NotNull => self.push(" IS NOT NULL"),
                    IsTest::True => self.push(" IS TRUE"),
                    IsTest::False => self.push(" IS FALSE"),
                    IsTest::Unknown => self.push(" IS UNKNOWN"),
                    IsTest::NotTrue => self.push(" IS NOT TRUE"),
                    IsTest::NotFalse => self.push(" IS NOT FALSE"),
                    IsTest::DistinctFrom(o) => {
                        self.push(" IS DISTINCT FROM ");
                        self.sub(o);
                    }
                    IsTest::NotDistinctFrom(o) => {
                        self.push(" IS NOT DISTINCT FROM ");
                        self.sub(o);
                    }
                }
            }
            Expr::Cast { expr, to, style } => match style {
                CastStyle::Cast | CastStyle::TryCast => {
                    self.push(if matches!(style, CastStyle::Cast) {
                        "CAST("
                    } else {
                        "TRY_CAST("
                    });
                    self.sub(expr);
                    self.push(" AS ");
                    self.sql_type(*to);
                    self.push(")");
                }
                CastStyle::DoubleColon => {
                    self.push("(");
                    self.sub(expr);
                    self.push(")::");
                    self.sql_type(*to);
                }
            },
            Expr::Function(f, args) => {
                self.function_name(*f);
                self.push("(");
                self.list(args, ", ", Self::sub);
                self.push(")");
            }
            Expr::Special(s) => self.special(s),
            Expr::Agg(a) => self.descend(a, EXPR_DEPTH, Self::agg, |r| r.push("COUNT(*)")),
            Expr::InSubquery { expr, negated, query } => {
                match expr {
                    Some(e) => self.sub(e),
                    None => self.push("person_id"),
                }
                self.subquery(if *negated { " NOT IN (" } else { " IN (" }, query);
            }
            Expr::Exists { negated, query } => {
                self.subquery(if *negated { "NOT EXISTS (" } else { "EXISTS (" }, query);
            }
            Expr::Scalar(q) => self.subquery("(", q),
            Expr::Quantified { expr, op, any, query } => {
                self.sub(expr);
                self.push(" ");
                self.binop(*op);
                self.subquery(if *any { " ANY (" } else { " ALL (" }, query);
            }
            Expr::Paren(e) => {
                self.push("(");
                self.sub(e);
                self.push(")");
            }
            Expr::Deep(d) => self.deep(d),
            Expr::Placeholder(n) => match n % 3 {
                0 => self.push(&format!("${}", n % 5)),
                1 => self.push("?"),
                _ => self.push(&format!(":p{n}")),
            },
            Expr::Interval(v, unit) => {
                const UNITS: &[&str] = &[
                    "YEAR",
                    "MONTH",
                    "DAY",
                    "HOUR",
                    "MINUTE",
                    "SECOND",
                    "MILLISECOND",
                    "WEEK",
                    "NANOSECOND",
                    "CENTURY",
                ];
                self.push(&format!("INTERVAL '{v}' {}", pick(UNITS, *unit)));
            }
            Expr::Raw(s) => self.push(s),
            Expr::Window(f, w) => {
                self.push(pick(WINDOW_FUNCTIONS, *f));
                self.window(w);
            }
        }
    }

    fn special(&mut self, s: &Special) {
        match s {
            Special::Extract(field, e) => {
                const FIELDS: &[&str] = &[
                    "YEAR",
                    "MONTH",
                    "DAY",
                    "DOW",
                    "DOY",
                    "EPOCH",
                    "HOUR",
                    "QUARTER",
                    "WEEK",
                    "MILLENNIUM",
                    "NANOSECOND",
                    "ISODOW",
                    "TIMEZONE",
                    "julian",
                ];
                self.push(&format!("EXTRACT({} FROM ", pick(FIELDS, *field)));
                self.sub(e);
                self.push(")");
            }
            Special::Substring(e, from, len) => {
                self.push("SUBSTRING(");
                self.sub(e);
                if let Some(f) = from {
                    self.push(" FROM ");
                    self.sub(f);
                }
                if let Some(l) = len {
                    self.push(" FOR ");
                    self.sub(l);
                }
                self.push(")");
            }
            Special::Position(a, b) => {
                self.push("POSITION(");
                self.sub(a);
                self.push(" IN ");
                self.sub(b);
                self.push(")");
            }
            Special::Trim(how, what, from) => {
                self.push("TRIM(");
                self.push(match how % 4 {
                    0 => "BOTH ",
                    1 => "LEADING ",
                    2 => "TRAILING ",
                    _ => "",
                });
                if let Some(w) = what {
                    self.sub(w);
                    self.push(" ");
                }
                self.push("FROM ");
                self.sub(from);
                self.push(")");
            }
            Special::Overlay(a, b, c, d) => {
                self.push("OVERLAY(");
                self.sub(a);
                self.push(" PLACING ");
                self.sub(b);
                self.push(" FROM ");
                self.sub(c);
                if let Some(d) = d {
                    self.push(" FOR ");
                    self.sub(d);
                }
                self.push(")");
            }
            Special::AtTimeZone(e, tz) => {
                self.push("(");
                self.sub(e);
                self.push(&format!(") AT TIME ZONE {}", quoted(tz)));
            }
            Special::Collate(e) => {
                self.sub(e);
                self.push(" COLLATE \"C\"");
            }
            Special::Ceil(e, unit) => {
                self.push("CEIL(");
                self.sub(e);
                self.push(match unit % 3 {
                    0 => " TO DAY)",
                    1 => ")",
                    _ => " TO YEAR)",
                });
            }
            Special::ArrowCast(e, t) => {
                self.push("arrow_cast(");
                self.sub(e);
                self.push(&format!(", {})", quoted(pick(ARROW_TYPES, *t))));
            }
            Special::ArrayLiteral(items) => {
                self.push("[");
                self.list(items, ", ", Self::sub);
                self.push("]");
            }
            Special::Index(a, b) => {
                self.push("(");
                self.sub(a);
                self.push(")[");
                self.sub(b);
                self.push("]");
            }
            Special::Struct(items) => {
                self.push("STRUCT(");
                self.list(items, ", ", Self::sub);
                self.push(")");
            }
            Special::Map => self.push("MAP {'a': 1, 'b': 2}"),
            Special::Lambda => self.push("array_transform([1, 2], x -> x + 1)"),
            Special::TypedString(t, s) => {
                self.sql_type(*t);
                self.push(&format!(" {}", quoted(s)));
            }
        }
    }
}
