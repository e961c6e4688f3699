//! SELECT bodies: the projection and its items, the grouped-and-aggregated query shape,
//! WHERE / GROUP BY / HAVING / QUALIFY, and ORDER BY / LIMIT.

use super::ast::*;
use super::render::Renderer;

impl Renderer {
    /// `keyword expr`, if there is an expression.
    fn clause(&mut self, keyword: &str, e: &Option<Expr>) {
        if let Some(e) = e {
            self.push(keyword);
            self.expr(e);
        }
    }

    /// `keyword literal`, if there is a literal.
    fn lit_clause(&mut self, keyword: &str, l: &Option<Lit>) {
        if let Some(l) = l {
            self.push(keyword);
            self.lit(l);
        }
    }

    pub(super) fn select(&mut self, s: &Select) -> Vec<String> {
        // FROM first, to know the scope; spliced in after the projection.
        let saved = std::mem::take(&mut self.scope);
        let mut from_text = String::new();
        if !s.from.is_empty() {
            from_text = self.rendered(|r| {
                r.push(" FROM ");
                r.list(&s.from, ", ", Self::from);
            });
        }
        self.push("SELECT ");
        match &s.distinct {
            Distinct::No => {}
            Distinct::Distinct => self.push("DISTINCT "),
            Distinct::On(exprs) => {
                self.push("DISTINCT ON (");
                self.expr_list(exprs);
                self.push(") ");
            }
        }
        let mut columns = vec![];
        if s.items.is_empty() {
            self.push("COUNT(*)");
            columns.push("count(*)".into());
        }
        self.list(&s.items, ", ", |r, item| {
            let c = r.item(item);
            columns.extend(c);
        });
        self.push(&from_text);
        self.clause(" WHERE ", &s.selection);
        if !s.group_by.is_empty() {
            self.push(" GROUP BY ");
            self.expr_list(&s.group_by);
        }
        self.clause(" HAVING ", &s.having);
        self.clause(" QUALIFY ", &s.qualify);
        self.scope = saved;
        columns
    }

    pub(super) fn aggregate(&mut self, a: &AggregateQuery, splice: Option<&str>) -> Vec<String> {
        let saved_ctes = self.ctes.len();
        self.with(&a.with, false);
        let saved = std::mem::take(&mut self.scope);
        let from_text = self.rendered(|r| {
            r.push(" FROM ");
            r.from(&a.from);
        });
        self.push("SELECT ");
        let mut columns = vec![];
        let mut key_texts = vec![];
        for (i, k) in a.keys.iter().enumerate() {
            let mark = self.out.len();
            self.expr(k);
            key_texts.push(self.out.get(mark..).unwrap_or_default().to_owned());
            let name = format!("k{i}");
            self.push(" AS ");
            self.push(&name);
            self.push(", ");
            columns.push(name);
        }
        if a.aggregates.is_empty() {
            self.push("COUNT(*) AS n");
            columns.push("n".into());
        }
        for (i, agg) in a.aggregates.iter().enumerate() {
            if i > 0 {
                self.push(", ");
            }
            if i == 0
                && let Some((op, e)) = &a.post
            {
                self.push("(");
                self.agg(agg);
                self.push(") ");
                self.binop(*op);
                self.push(" ");
                self.expr(e);
            } else {
                self.agg(agg);
            }
            let name = format!("a{i}");
            self.push(" AS ");
            self.push(&name);
            columns.push(name);
        }
        self.push(&from_text);
        if a.selection.is_some() || splice.is_some() {
            self.push(" WHERE ");
            if let Some(w) = &a.selection {
                self.expr(w);
            }
            if let Some(raw) = splice {
                self.push(raw);
            }
        }
        if !a.keys.is_empty() || matches!(a.group_style, GroupStyle::All) {
            self.push(" GROUP BY ");
            let keys = key_texts.join(", ");
            match a.group_style {
                GroupStyle::Keys => self.push(&keys),
                GroupStyle::Ordinals => {
                    let ordinals: Vec<String> = (1..=a.keys.len()).map(|i| i.to_string()).collect();
                    self.push(&ordinals.join(", "));
                }
                GroupStyle::All => self.push("ALL"),
                GroupStyle::Rollup => self.push(&format!("ROLLUP ({keys})")),
                GroupStyle::Cube => self.push(&format!("CUBE ({keys})")),
                GroupStyle::GroupingSets => {
                    let sets: Vec<String> = key_texts.iter().map(|k| format!("({k})")).collect();
                    self.push(&format!("GROUPING SETS ({}, ())", sets.join(", ")));
                }
                GroupStyle::Repeated(n) => {
                    let copies = vec![keys; 1 + n as usize % 8];
                    self.list(&copies, ", ", |r, k| r.push(k));
                }
            }
        }
        self.clause(" HAVING ", &a.having);
        self.scope = saved;
        self.order_limit(&a.order_by, &a.limit);
        self.ctes.truncate(saved_ctes);
        columns
    }

    pub(super) fn order_limit(&mut self, order_by: &[Order], limit: &Option<Limit>) {
        if !order_by.is_empty() {
            self.push(" ORDER BY ");
            self.list(order_by, ", ", |r, o| {
                match &o.expr {
                    OrderKey::Ordinal(n) => r.push(&(n % 4 + 1).to_string()),
                    OrderKey::Expr(e) => r.expr(e),
                }
                match o.desc {
                    Some(true) => r.push(" DESC"),
                    Some(false) => r.push(" ASC"),
                    None => {}
                }
                match o.nulls_first {
                    Some(true) => r.push(" NULLS FIRST"),
                    Some(false) => r.push(" NULLS LAST"),
                    None => {}
                }
            });
        }
        if let Some(l) = limit {
            self.lit_clause(" LIMIT ", &l.limit);
            self.lit_clause(" OFFSET ", &l.offset);
        }
    }

    fn item(&mut self, item: &Item) -> Vec<String> {
        let named = |r: &mut Self, alias: &Option<u8>, default: Option<String>| match alias {
            Some(a) => {
                let name = if a % 16 == 15 {
                    format!("__sde_x{a}")
                } else if a % 16 == 14 {
                    "\"person_id\"".to_string()
                } else {
                    format!("c{a}")
                };
                r.push(" AS ");
                r.push(&name);
                vec![name]
            }
            None => default.into_iter().collect(),
        };
        match item {
            Item::Expr(e, alias) => {
                let bare = match e {
                    Expr::Column(c) => Some(self.column_name(c)),
                    _ => None,
                };
                self.expr(e);
                named(self, alias, bare)
            }
            Item::Agg(a, alias) => {
                self.agg(a);
                named(self, alias, None)
            }
            Item::Wildcard => {
                self.push("*");
                self.scope.iter().flat_map(|r| r.columns.clone()).collect()
            }
            Item::QualifiedWildcard(i) => match self.scope.is_empty() {
                true => {
                    self.push("patients.*");
                    vec![]
                }
                false => {
                    let rel = self.scope[*i as usize % self.scope.len()].clone();
                    self.push(&format!("{}.*", rel.name));
                    rel.columns
                }
            },
            Item::WildcardExcept(i) => {
                let all: Vec<String> = self.scope.iter().flat_map(|r| r.columns.clone()).collect();
                if all.is_empty() {
                    self.push("*");
                    return vec![];
                }
                let except = all[*i as usize % all.len()].clone();
                self.push(&format!("* EXCLUDE ({except})"));
                all.into_iter().filter(|c| *c != except).collect()
            }
            Item::Column(c) => {
                let name = self.column_name(c);
                self.column(c);
                vec![name]
            }
        }
    }
}
