//! FROM items and joins: tables, derived tables and CTEs (each brought into scope with the
//! columns it outputs), odd relations, table functions, and the join kinds and conditions.

use super::TABLES;
use super::ast::*;
use super::names::ODD_TABLES;
use super::render::{QUERY_DEPTH, Rel, Renderer, pick};
use super::terms::binop_text;

impl Renderer {
    pub(super) fn from(&mut self, f: &From) {
        self.factor(&f.base);
        for j in &f.joins {
            self.join(j);
        }
    }

    fn factor(&mut self, f: &Factor) {
        match f {
            Factor::Table { table, alias } => {
                let (name, _) = pick(TABLES, *table);
                self.push(name);
                let qualifier = match alias {
                    Some(_) => self.as_alias(),
                    None => name.to_string(),
                };
                self.scope.push(Self::table_rel(*table, qualifier));
            }
            Factor::Derived { query, lateral, alias } => {
                if *lateral {
                    self.push("LATERAL ");
                }
                self.push("(");
                let saved = match lateral {
                    true => self.scope.clone(),
                    false => std::mem::take(&mut self.scope),
                };
                let columns = self.nested_query(query);
                self.scope = saved;
                self.push(")");
                let a = self.as_alias();
                let columns = match alias {
                    Some(n) if !columns.is_empty() => {
                        // Renamed columns: (x0, x1, …), as many as the query outputs.
                        let renamed: Vec<String> = (0..columns.len()).map(|i| format!("x{}_{i}", n % 4)).collect();
                        self.push(&format!("({})", renamed.join(", ")));
                        renamed
                    }
                    _ => columns,
                };
                self.scope.push(Rel { name: a, columns });
            }
            Factor::DerivedAggregate(a) => {
                self.push("(");
                let saved = std::mem::take(&mut self.scope);
                let columns = self.descend(
                    a,
                    QUERY_DEPTH,
                    |r, a| r.aggregate(a, None),
                    |r| {
                        r.push("SELECT district, COUNT(*) AS n FROM patients GROUP BY 1");
                        vec!["district".into(), "n".into()]
                    },
                );
                self.scope = saved;
                self.push(")");
                let a = self.as_alias();
                self.scope.push(Rel { name: a, columns });
            }
            Factor::Cte(i) => {
                if self.ctes.is_empty() {
                    self.push("patients");
                    self.scope.push(Self::table_rel(0, "patients".into()));
                } else {
                    let rel = self.ctes[*i as usize % self.ctes.len()].clone();
                    self.push(&rel.name);
                    self.scope.push(rel);
                }
            }
            Factor::Odd(i) => {
                let name = pick(ODD_TABLES, *i);
                self.push(name);
                self.scope.push(Rel {
                    name: name.to_string(),
                    columns: vec!["person_id".into()],
                });
            }
            Factor::TableFunction(i, args) => {
                const FUNCS: &[&str] = &[
                    "range",
                    "generate_series",
                    "unnest",
                    "read_csv",
                    "read_parquet",
                    "patients",
                ];
                self.push(pick(FUNCS, *i));
                self.push("(");
                self.list(args, ", ", Self::lit);
                self.push(")");
                self.scope.push(Rel {
                    name: "value".into(),
                    columns: vec!["value".into()],
                });
            }
            Factor::Nested(from) => self.descend(
                from,
                QUERY_DEPTH,
                |r, from| {
                    r.push("(");
                    r.from(from);
                    r.push(")");
                },
                |r| {
                    r.push("(patients JOIN gp_events USING (person_id))");
                    r.scope.push(Self::table_rel(0, "patients".into()));
                    r.scope.push(Self::table_rel(1, "gp_events".into()));
                },
            ),
            Factor::Values(rows) => {
                self.push("(VALUES ");
                let columns = self.values(rows);
                self.push(")");
                let a = self.as_alias();
                self.scope.push(Rel { name: a, columns });
            }
        }
    }

    fn join(&mut self, j: &Join) {
        let left_pid = self
            .scope
            .iter()
            .rev()
            .find(|r| r.has_person_id())
            .map(|r| r.name.clone());
        self.push(match j.kind {
            JoinKind::Inner => " JOIN ",
            JoinKind::Left => " LEFT JOIN ",
            JoinKind::Right => " RIGHT JOIN ",
            JoinKind::Full => " FULL OUTER JOIN ",
            JoinKind::Cross => " CROSS JOIN ",
            JoinKind::LeftSemi => " LEFT SEMI JOIN ",
            JoinKind::LeftAnti => " LEFT ANTI JOIN ",
            JoinKind::RightSemi => " RIGHT SEMI JOIN ",
            JoinKind::RightAnti => " RIGHT ANTI JOIN ",
            JoinKind::Comma => ", ",
        });
        if matches!(j.on, JoinOn::Natural) && matches!(j.kind, JoinKind::Inner) && self.out.ends_with(" JOIN ") {
            // NATURAL goes before the join keyword.
            self.out.truncate(self.out.len() - " JOIN ".len());
            self.push(" NATURAL JOIN ");
        }
        self.factor(&j.factor);
        if matches!(j.kind, JoinKind::Comma | JoinKind::Cross) {
            return;
        }
        let right_pid = self.scope.last().filter(|r| r.has_person_id()).map(|r| r.name.clone());
        // ` ON l.person_id op r.person_id` (or ` ON true` without a person_id on each side).
        let pid_on = |r: &mut Self, op: &str| {
            let on = match (&left_pid, &right_pid) {
                (Some(l), Some(r)) => format!("{l}.person_id {op} {r}.person_id"),
                _ => "true".to_string(),
            };
            r.push(" ON ");
            r.push(&on);
        };
        match &j.on {
            JoinOn::PersonId => pid_on(self, "="),
            JoinOn::Using => self.push(" USING (person_id)"),
            JoinOn::Natural => {}
            JoinOn::On(e) => {
                self.push(" ON ");
                self.expr(e);
            }
            JoinOn::PersonIdAnd(e) => {
                pid_on(self, "=");
                self.push(" AND ");
                self.expr(e);
            }
            JoinOn::PersonIdOther(op) => pid_on(self, binop_text(*op)),
            JoinOn::Nothing => {}
        }
    }
}
