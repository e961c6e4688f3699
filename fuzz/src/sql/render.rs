//! The [`Renderer`]: its output and scope, the helpers the other parts share (lists, nesting,
//! aliases), and statements, queries, CTEs, set operations and `VALUES`.

use super::ast::*;
use super::{MAX_NESTING, MAX_REPEAT, MAX_SQL, TABLES};

/// How deep the renderer's own recursion goes through queries and FROM items (bounded by
/// [`MAX_NESTING`] through [`Sub`]; also checked here for safety).
pub(super) const QUERY_DEPTH: usize = MAX_NESTING as usize * 2;
/// The same, through expressions.
pub(super) const EXPR_DEPTH: usize = MAX_NESTING as usize * 4;

/// A relation in scope: its qualifier and the columns it outputs.
#[derive(Debug, Clone)]
pub(super) struct Rel {
    pub(super) name: String,
    pub(super) columns: Vec<String>,
}

impl Rel {
    pub(super) fn has_person_id(&self) -> bool {
        self.columns.iter().any(|c| c == "person_id")
    }
}

#[derive(Default)]
pub(super) struct Renderer {
    pub(super) out: String,
    /// Relations the current SELECT can refer to.
    pub(super) scope: Vec<Rel>,
    /// CTEs in scope, with their columns.
    pub(super) ctes: Vec<Rel>,
    next_alias: usize,
    /// Nesting of the renderer's own recursion ([`QUERY_DEPTH`], [`EXPR_DEPTH`]).
    depth: usize,
}

pub(super) fn pick<T: Copy>(list: &[T], i: impl Into<usize>) -> T {
    list[i.into() % list.len()]
}

pub(super) fn repeat_count(count: u16) -> usize {
    count as usize % (MAX_REPEAT + 1)
}

/// `s` as a string literal: in single quotes, its single quotes doubled.
pub(super) fn quoted(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

impl Renderer {
    pub(super) fn full(&self) -> bool {
        self.out.len() > MAX_SQL
    }

    pub(super) fn push(&mut self, s: &str) {
        if !self.full() {
            self.out.push_str(s);
        }
    }

    fn alias(&mut self) -> String {
        self.next_alias += 1;
        format!("t{}", self.next_alias)
    }

    /// ` AS tN` with a fresh alias; returns the alias.
    pub(super) fn as_alias(&mut self) -> String {
        let a = self.alias();
        self.push(" AS ");
        self.push(&a);
        a
    }

    /// A relation of the demo schema, with its columns.
    pub(super) fn table_rel(table: u8, name: String) -> Rel {
        let (_, columns) = pick(TABLES, table);
        Rel {
            name,
            columns: columns.iter().map(|c| c.to_string()).collect(),
        }
    }

    /// Each of `items`, rendered by `item`, with `sep` between them.
    pub(super) fn list<T>(&mut self, items: &[T], sep: &str, mut item: impl FnMut(&mut Self, &T)) {
        for (i, x) in items.iter().enumerate() {
            if i > 0 {
                self.push(sep);
            }
            item(self, x);
        }
    }

    /// What `render` writes, taken back out of the output (to be written elsewhere).
    pub(super) fn rendered(&mut self, render: impl FnOnce(&mut Self)) -> String {
        let mark = self.out.len();
        render(self);
        self.out.split_off(mark.min(self.out.len()))
    }

    /// A recursive position: `go` one level deeper while the renderer is under `limit` and the
    /// position is there, `leaf` otherwise.
    pub(super) fn descend<T, R>(
        &mut self,
        sub: &Sub<T>,
        limit: usize,
        go: impl FnOnce(&mut Self, &T) -> R,
        leaf: impl FnOnce(&mut Self) -> R,
    ) -> R {
        match &sub.0 {
            Some(x) if self.depth < limit => {
                self.depth += 1;
                let r = go(self, x);
                self.depth -= 1;
                r
            }
            _ => leaf(self),
        }
    }

    // ---- statements -------------------------------------------------------------------

    pub(super) fn statement(&mut self, kind: StatementKind, q: &Query) {
        use StatementKind::*;
        let (before, after) = match kind {
            Explain => ("EXPLAIN ", ""),
            ExplainAnalyze => ("EXPLAIN ANALYZE VERBOSE ", ""),
            CreateTableAs => ("CREATE TABLE leak AS ", ""),
            CreateView => ("CREATE OR REPLACE VIEW v AS ", ""),
            CreateExternal => ("CREATE EXTERNAL TABLE x STORED AS CSV LOCATION '/etc/passwd'; ", ""),
            Insert => ("INSERT INTO patients ", ""),
            Update => ("UPDATE patients SET age = 1 WHERE person_id IN (", ")"),
            Delete => ("DELETE FROM patients WHERE age IN (", ")"),
            Drop => ("DROP TABLE patients; ", ""),
            Copy => ("COPY (", ") TO '/tmp/leak.csv'"),
            Set => ("SET datafusion.execution.target_partitions = 1; ", ""),
            Prepare => ("PREPARE p(INT) AS ", ""),
            Execute => ("EXECUTE p(1); ", ""),
            Describe => ("DESCRIBE patients; ", ""),
            Show => ("SHOW ALL; ", ""),
            Begin => ("BEGIN; ", "; COMMIT"),
            Truncate => ("TRUNCATE patients; ", ""),
            CreateFunction => ("CREATE FUNCTION f(INT) RETURNS INT RETURN $1 + 1; ", ""),
            Merge => ("MERGE INTO patients USING (", ") s ON true WHEN MATCHED THEN DELETE"),
            Deallocate => ("DEALLOCATE p; ", ""),
        };
        self.push(before);
        self.query(q);
        self.push(after);
    }

    // ---- queries ------------------------------------------------------------------------

    /// Renders a query; returns the columns it outputs (as far as known).
    pub(super) fn query(&mut self, q: &Query) -> Vec<String> {
        let saved_ctes = self.ctes.len();
        self.with(&q.with, q.recursive);
        let columns = self.body(&q.body);
        self.order_limit(&q.order_by, &q.limit);
        self.ctes.truncate(saved_ctes);
        columns
    }

    pub(super) fn with(&mut self, ctes: &[Cte], recursive: bool) {
        if ctes.is_empty() {
            return;
        }
        self.push(if recursive { "WITH RECURSIVE " } else { "WITH " });
        self.list(ctes, ", ", |r, cte| {
            let name = format!("c{}", r.ctes.len());
            r.push(&name);
            let columns = r.sub_query_text(&cte.query, |text_columns| {
                let mut head = String::new();
                if cte.column_list && !text_columns.is_empty() {
                    head.push('(');
                    head.push_str(&text_columns.join(", "));
                    head.push(')');
                }
                head.push_str(" AS ");
                match cte.materialized {
                    Some(true) => head.push_str("MATERIALIZED "),
                    Some(false) => head.push_str("NOT MATERIALIZED "),
                    None => {}
                }
                head
            });
            r.ctes.push(Rel { name, columns });
        });
        self.push(" ");
    }

    /// Renders `(query)` for a CTE, with a head (column list, AS) that depends on the columns
    /// the query outputs: the query is rendered first, then spliced.
    fn sub_query_text(&mut self, q: &Sub<Query>, head: impl FnOnce(&[String]) -> String) -> Vec<String> {
        let mark = self.out.len();
        let saved_scope = std::mem::take(&mut self.scope);
        self.push("(");
        let columns = self.descend(q, QUERY_DEPTH, Self::query, Self::leaf_query);
        self.push(")");
        self.scope = saved_scope;
        let h = head(&columns);
        if mark <= self.out.len() {
            self.out.insert_str(mark, &h);
        }
        columns
    }

    /// A small query in the usual safe shape.
    fn leaf_query(&mut self) -> Vec<String> {
        self.push("SELECT person_id, age, district FROM patients");
        vec!["person_id".into(), "age".into(), "district".into()]
    }

    pub(super) fn nested_query(&mut self, q: &Sub<Query>) -> Vec<String> {
        let saved_scope = self.scope.clone();
        let columns = self.descend(q, QUERY_DEPTH, Self::query, Self::leaf_query);
        // A subquery may refer to the outer query's relations (correlated).
        self.scope = saved_scope;
        columns
    }

    fn body(&mut self, b: &Body) -> Vec<String> {
        match b {
            Body::Select(s) => self.select(s),
            Body::SetOp { left, op, all, right } => {
                let columns = self.sub_body(left);
                self.push(match op {
                    SetOp::Union => " UNION ",
                    SetOp::Intersect => " INTERSECT ",
                    SetOp::Except => " EXCEPT ",
                    SetOp::UnionByName => " UNION BY NAME ",
                });
                if *all {
                    self.push("ALL ");
                }
                self.sub_body(right);
                columns
            }
            Body::Nested(q) => {
                self.push("(");
                let c = self.nested_query(q);
                self.push(")");
                c
            }
            Body::Values(rows) => {
                self.push("VALUES ");
                self.values(rows)
            }
            Body::Aggregate(a) => self.descend(
                a,
                QUERY_DEPTH,
                |r, a| r.aggregate(a, None),
                |r| {
                    r.push("SELECT district, COUNT(*) AS n FROM patients GROUP BY district");
                    vec!["district".into(), "n".into()]
                },
            ),
        }
    }

    fn sub_body(&mut self, b: &Sub<Body>) -> Vec<String> {
        let saved = std::mem::take(&mut self.scope);
        let c = self.descend(b, QUERY_DEPTH, Self::body, |r| {
            r.push("SELECT person_id FROM gp_events");
            vec!["person_id".into()]
        });
        self.scope = saved;
        c
    }

    pub(super) fn values(&mut self, rows: &[Vec<Lit>]) -> Vec<String> {
        if rows.is_empty() {
            self.push("(1)");
        }
        self.list(rows, ", ", |r, row| {
            r.push("(");
            if row.is_empty() {
                r.push("NULL");
            }
            r.list(row, ", ", Self::lit);
            r.push(")");
        });
        let width = rows.first().map_or(1, |r| r.len().max(1));
        (1..=width).map(|i| format!("column{i}")).collect()
    }
}
