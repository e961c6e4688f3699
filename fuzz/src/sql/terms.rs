//! The terms of expressions: windows, aggregate calls, function and operator names, SQL
//! types and literals.

use std::fmt::Write as _;

use super::MAX_SQL;
use super::ast::*;
use super::names::{EXCLUDED_FUNCTIONS, ODD_LITERALS, OTHER_AGGREGATES};
use super::render::{Renderer, pick, quoted};

impl Renderer {
    pub(super) fn window(&mut self, w: &Window) {
        self.push(" OVER (");
        if !w.partition_by.is_empty() {
            self.push("PARTITION BY ");
            self.list(&w.partition_by, ", ", Self::column);
            self.push(" ");
        }
        if let Some(o) = &w.order_by {
            self.push("ORDER BY ");
            self.column(o);
            self.push(" ");
        }
        if let Some(f) = w.frame {
            self.push(match f % 4 {
                0 => "ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW",
                1 => "ROWS BETWEEN 1 PRECEDING AND 1 FOLLOWING",
                2 => "RANGE BETWEEN 9223372036854775807 PRECEDING AND CURRENT ROW",
                _ => "GROUPS BETWEEN 1 PRECEDING AND UNBOUNDED FOLLOWING",
            });
        }
        self.push(")");
    }

    pub(super) fn agg(&mut self, a: &Agg) {
        let name = match a.func {
            AggFunc::Count | AggFunc::CountDistinctPerson => "COUNT",
            AggFunc::Sum => "SUM",
            AggFunc::Avg => "AVG",
            AggFunc::Max => "MAX",
            AggFunc::Min => "MIN",
            AggFunc::ArrayAgg => "array_agg",
            AggFunc::Other(i) => pick(OTHER_AGGREGATES, i),
        };
        self.push(name);
        self.push("(");
        if matches!(a.func, AggFunc::CountDistinctPerson) {
            self.push("DISTINCT ");
            let pid = self
                .scope
                .iter()
                .find(|r| r.has_person_id())
                .map(|r| format!("{}.person_id", r.name))
                .unwrap_or_else(|| "person_id".into());
            self.push(&pid);
        } else {
            if a.distinct {
                self.push("DISTINCT ");
            }
            match &a.arg {
                AggArg::Star => self.push("*"),
                AggArg::Column(c) => self.column(c),
                AggArg::Expr(e) => self.sub(e),
                AggArg::PersonId => self.push("person_id"),
                AggArg::Two(x, y) => {
                    self.sub(x);
                    self.push(", ");
                    self.sub(y);
                }
            }
        }
        if let Some(o) = &a.order_within {
            self.push(" ORDER BY ");
            self.sub(o);
        }
        self.push(")");
        if let Some(f) = &a.filter {
            self.push(" FILTER (WHERE ");
            self.sub(f);
            self.push(")");
        }
        if let Some(w) = &a.over {
            self.window(w);
        }
    }

    pub(super) fn function_name(&mut self, f: Function) {
        let scalar = sde_gateway::policy::statement::functions::SCALAR;
        let name = match f {
            Function::Allowed(i) => pick(scalar, i),
            Function::Excluded(i) => pick(EXCLUDED_FUNCTIONS, i),
            Function::Aggregate(i) => pick(OTHER_AGGREGATES, i),
        };
        self.push(name);
    }

    pub(super) fn binop(&mut self, op: BinOp) {
        self.push(binop_text(op));
    }

    pub(super) fn unop(&mut self, op: UnOp) {
        self.push(match op {
            UnOp::Not => "NOT ",
            UnOp::Minus => "- ",
            UnOp::Plus => "+ ",
            UnOp::BitNot => "~ ",
            UnOp::Sqrt => "|/ ",
            UnOp::Abs => "@ ",
        });
    }

    pub(super) fn sql_type(&mut self, t: SqlType) {
        let s = match t {
            SqlType::TinyInt => "TINYINT".to_string(),
            SqlType::SmallInt => "SMALLINT".into(),
            SqlType::Int => "INT".into(),
            SqlType::BigInt => "BIGINT".into(),
            SqlType::IntUnsigned => "INT UNSIGNED".into(),
            SqlType::BigIntUnsigned => "BIGINT UNSIGNED".into(),
            SqlType::Real => "REAL".into(),
            SqlType::Double => "DOUBLE".into(),
            SqlType::Decimal(p, s) => format!("DECIMAL({}, {})", p % 80, s % 82),
            SqlType::Varchar => "VARCHAR".into(),
            SqlType::Text => "TEXT".into(),
            SqlType::Char(n) => format!("CHAR({n})"),
            SqlType::Date => "DATE".into(),
            SqlType::Timestamp => "TIMESTAMP".into(),
            SqlType::TimestampTz => "TIMESTAMP WITH TIME ZONE".into(),
            SqlType::Time => "TIME".into(),
            SqlType::Interval => "INTERVAL".into(),
            SqlType::Boolean => "BOOLEAN".into(),
            SqlType::Bytea => "BYTEA".into(),
            SqlType::IntArray => "INT[]".into(),
            SqlType::Numeric => "NUMERIC".into(),
            SqlType::Unknown => "NO_SUCH_TYPE".into(),
        };
        self.push(&s);
    }

    pub(super) fn lit(&mut self, l: &Lit) {
        let text = match l {
            Lit::Small(n) => (n % 100).to_string(),
            Lit::Int(n) => n.to_string(),
            Lit::Float(f) if f.is_finite() => format!("{f:?}"),
            Lit::Float(f) if f.is_nan() => "'NaN'::DOUBLE".into(),
            Lit::Float(f) => format!("'{}inf'::DOUBLE", if *f < 0.0 { "-" } else { "" }),
            Lit::Str(s) => quoted(s),
            Lit::Null => "NULL".into(),
            Lit::Bool(b) => b.to_string(),
            Lit::Odd(i) => pick(ODD_LITERALS, *i).to_string(),
            Lit::Digits { digit, count, fraction } => {
                let d = char::from(b'0' + digit % 10);
                let mut s: String = std::iter::repeat_n(d, 1 + *count as usize % 4096).collect();
                if *fraction > 0 {
                    s.push('.');
                    s.extend(std::iter::repeat_n('9', *fraction as usize % 4096));
                }
                s
            }
            Lit::Long { ch, count } => {
                let n = *count as usize % 200_000;
                let mut s = String::with_capacity(n + 2);
                s.push('\'');
                let ch = if *ch == '\'' { 'x' } else { *ch };
                s.extend(std::iter::repeat_n(
                    ch,
                    n.min(MAX_SQL.saturating_sub(self.out.len()) / ch.len_utf8().max(1)),
                ));
                s.push('\'');
                s
            }
            Lit::Date(y, m, d) => format!("DATE '{:04}-{:02}-{:02}'", y, m % 14, d % 33),
            Lit::Hex(bytes) => {
                let mut s = String::from("X'");
                for b in bytes {
                    let _ = write!(s, "{b:02X}");
                }
                s.push('\'');
                s
            }
            Lit::Escaped(s) => format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "\\'")),
            Lit::Unicode(s) => {
                let mut out = String::from("U&'");
                for c in s.chars() {
                    let _ = write!(out, "\\+{:06X}", c as u32);
                }
                out.push('\'');
                out
            }
            Lit::Dollar(s) => format!("$q${}$q$", s.replace('$', "")),
            Lit::DateColumn(i) => pick(
                &[
                    "event_date",
                    "start_date",
                    "end_date",
                    "referral_date",
                    "CURRENT_DATE",
                    "now()",
                    "DATE '2024-01-01'",
                ],
                *i,
            )
            .to_string(),
        };
        self.push(&text);
    }
}

pub(super) fn binop_text(op: BinOp) -> &'static str {
    match op {
        BinOp::Plus => "+",
        BinOp::Minus => "-",
        BinOp::Multiply => "*",
        BinOp::Divide => "/",
        BinOp::Modulo => "%",
        BinOp::Concat => "||",
        BinOp::Eq => "=",
        BinOp::NotEq => "<>",
        BinOp::NotEq2 => "!=",
        BinOp::Lt => "<",
        BinOp::LtEq => "<=",
        BinOp::Gt => ">",
        BinOp::GtEq => ">=",
        BinOp::And => "AND",
        BinOp::Or => "OR",
        BinOp::Xor => "XOR",
        BinOp::BitAnd => "&",
        BinOp::BitOr => "|",
        BinOp::BitXor => "^",
        BinOp::Hash => "#",
        BinOp::ShiftLeft => "<<",
        BinOp::ShiftRight => ">>",
        BinOp::Arrow => "->",
        BinOp::LongArrow => "->>",
        BinOp::AtArrow => "@>",
        BinOp::ArrowAt => "<@",
        BinOp::Tilde => "~",
        BinOp::TildeStar => "~*",
        BinOp::NotTilde => "!~",
        BinOp::NotTildeStar => "!~*",
        BinOp::LikeOp => "~~",
        BinOp::Spaceship => "<=>",
        BinOp::IsDistinctFrom => "IS DISTINCT FROM",
        BinOp::IsNotDistinctFrom => "IS NOT DISTINCT FROM",
        BinOp::Div => "DIV",
        BinOp::Question => "?",
        BinOp::AtAt => "@@",
        BinOp::Caret => "^",
    }
}
