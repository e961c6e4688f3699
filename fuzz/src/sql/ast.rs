//! The `arbitrary`-derived description of a statement: [`Input`] and the query, FROM,
//! expression and repetition types below it. Every recursive position goes through [`Sub`],
//! which stops descending at [`MAX_NESTING`].

use std::cell::Cell;

use arbitrary::{Arbitrary, Unstructured};

use super::MAX_NESTING;

thread_local! {
    pub(super) static NESTING: Cell<u32> = const { Cell::new(0) };
}

/// A recursive position: `None` past [`MAX_NESTING`] (or when the input runs out), rendered as
/// a leaf.
#[derive(Debug)]
pub struct Sub<T>(pub Option<Box<T>>);

impl<'a, T: Arbitrary<'a>> Arbitrary<'a> for Sub<T> {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        if u.is_empty() || NESTING.with(|n| n.get()) >= MAX_NESTING {
            return Ok(Sub(None));
        }
        NESTING.with(|n| n.set(n.get() + 1));
        let inner = T::arbitrary(u);
        NESTING.with(|n| n.set(n.get() - 1));
        Ok(Sub(inner.ok().map(Box::new)))
    }

    fn size_hint(_depth: usize) -> (usize, Option<usize>) {
        (0, None)
    }
}

/// One fuzz input.
#[derive(Debug, Arbitrary)]
pub enum Input {
    /// A query (most inputs).
    Query(Query),
    /// A query, grouped and aggregated in the usual shape, so more inputs reach a permit.
    Aggregate(AggregateQuery),
    /// A statement at or past the limits.
    Deep(DeepQuery),
    /// Another kind of statement wrapped around a query.
    Statement(StatementKind, Query),
    /// Raw text spliced into a query's WHERE clause.
    Spliced(AggregateQuery, String),
    /// Several statements, or a statement and garbage.
    Several(Query, Query),
    /// The input's text as SQL.
    Raw(String),
}

/// `SELECT keys, aggregates FROM … WHERE … GROUP BY keys HAVING …`.
#[derive(Debug, Arbitrary)]
pub struct AggregateQuery {
    pub with: Vec<Cte>,
    pub keys: Vec<Expr>,
    pub aggregates: Vec<Agg>,
    /// Arithmetic or functions over the first aggregate.
    pub post: Option<(BinOp, Expr)>,
    pub from: From,
    pub selection: Option<Expr>,
    pub group_style: GroupStyle,
    pub having: Option<Expr>,
    pub order_by: Vec<Order>,
    pub limit: Option<Limit>,
}

#[derive(Debug, Arbitrary)]
pub enum GroupStyle {
    Keys,
    Ordinals,
    All,
    Rollup,
    Cube,
    GroupingSets,
    Repeated(u8),
}

#[derive(Debug, Arbitrary)]
pub struct Query {
    pub with: Vec<Cte>,
    pub recursive: bool,
    pub body: Body,
    pub order_by: Vec<Order>,
    pub limit: Option<Limit>,
}

#[derive(Debug, Arbitrary)]
pub struct Cte {
    pub query: Sub<Query>,
    pub materialized: Option<bool>,
    pub column_list: bool,
}

#[derive(Debug, Arbitrary)]
pub enum Body {
    Select(Select),
    SetOp {
        left: Sub<Body>,
        op: SetOp,
        all: bool,
        right: Sub<Body>,
    },
    Nested(Sub<Query>),
    Values(Vec<Vec<Lit>>),
    Aggregate(Sub<AggregateQuery>),
}

#[derive(Debug, Arbitrary, Clone, Copy)]
pub enum SetOp {
    Union,
    Intersect,
    Except,
    UnionByName,
}

#[derive(Debug, Arbitrary)]
pub struct Select {
    pub distinct: Distinct,
    pub items: Vec<Item>,
    pub from: Vec<From>,
    pub selection: Option<Expr>,
    pub group_by: Vec<Expr>,
    pub having: Option<Expr>,
    pub qualify: Option<Expr>,
}

#[derive(Debug, Arbitrary)]
pub enum Distinct {
    No,
    Distinct,
    On(Vec<Expr>),
}

#[derive(Debug, Arbitrary)]
pub enum Item {
    Expr(Expr, Option<u8>),
    Agg(Agg, Option<u8>),
    Wildcard,
    QualifiedWildcard(u8),
    WildcardExcept(u8),
    Column(ColRef),
}

#[derive(Debug, Arbitrary)]
pub struct Agg {
    pub func: AggFunc,
    pub arg: AggArg,
    pub distinct: bool,
    pub filter: Option<Sub<Expr>>,
    pub order_within: Option<Sub<Expr>>,
    pub over: Option<Window>,
}

#[derive(Debug, Arbitrary, Clone, Copy)]
pub enum AggFunc {
    Count,
    CountDistinctPerson,
    Sum,
    Avg,
    Max,
    Min,
    ArrayAgg,
    Other(u8),
}

#[derive(Debug, Arbitrary)]
pub enum AggArg {
    Star,
    Column(ColRef),
    Expr(Sub<Expr>),
    PersonId,
    Two(Sub<Expr>, Sub<Expr>),
}

#[derive(Debug, Arbitrary)]
pub struct Window {
    pub partition_by: Vec<ColRef>,
    pub order_by: Option<ColRef>,
    pub frame: Option<u8>,
}

#[derive(Debug, Arbitrary)]
pub struct Order {
    pub expr: OrderKey,
    pub desc: Option<bool>,
    pub nulls_first: Option<bool>,
}

#[derive(Debug, Arbitrary)]
pub enum OrderKey {
    Ordinal(u8),
    Expr(Expr),
}

#[derive(Debug, Arbitrary)]
pub struct Limit {
    pub limit: Option<Lit>,
    pub offset: Option<Lit>,
}

#[derive(Debug, Arbitrary)]
pub struct From {
    pub base: Factor,
    pub joins: Vec<Join>,
}

#[derive(Debug, Arbitrary)]
pub enum Factor {
    Table {
        table: u8,
        alias: Option<u8>,
    },
    Derived {
        query: Sub<Query>,
        lateral: bool,
        alias: Option<u8>,
    },
    DerivedAggregate(Sub<AggregateQuery>),
    Cte(u8),
    Odd(u8),
    TableFunction(u8, Vec<Lit>),
    Nested(Sub<From>),
    Values(Vec<Vec<Lit>>),
}

#[derive(Debug, Arbitrary)]
pub struct Join {
    pub kind: JoinKind,
    pub factor: Factor,
    pub on: JoinOn,
}

#[derive(Debug, Arbitrary, Clone, Copy)]
pub enum JoinKind {
    Inner,
    Left,
    Right,
    Full,
    Cross,
    LeftSemi,
    LeftAnti,
    RightSemi,
    RightAnti,
    Comma,
}

#[derive(Debug, Arbitrary)]
pub enum JoinOn {
    PersonId,
    Using,
    Natural,
    On(Expr),
    PersonIdAnd(Expr),
    PersonIdOther(BinOp),
    Nothing,
}

#[derive(Debug, Arbitrary, Clone, Copy)]
pub struct ColRef {
    pub rel: u8,
    pub col: u8,
    pub style: ColStyle,
}

#[derive(Debug, Arbitrary, Clone, Copy)]
pub enum ColStyle {
    Qualified,
    Bare,
    Quoted,
    Odd(u8),
    PersonId,
}

#[derive(Debug, Arbitrary)]
pub enum Expr {
    Column(ColRef),
    Lit(Lit),
    Binary(Sub<Expr>, BinOp, Sub<Expr>),
    Unary(UnOp, Sub<Expr>),
    Case {
        operand: Option<Sub<Expr>>,
        branches: Vec<When>,
        otherwise: Option<Sub<Expr>>,
    },
    InList {
        expr: Sub<Expr>,
        list: Vec<Sub<Expr>>,
        negated: bool,
    },
    Between {
        expr: Sub<Expr>,
        negated: bool,
        low: Sub<Expr>,
        high: Sub<Expr>,
    },
    Like {
        expr: Sub<Expr>,
        negated: bool,
        kind: LikeKind,
        pattern: Sub<Expr>,
        escape: Option<char>,
    },
    Is(Sub<Expr>, IsTest),
    Cast {
        expr: Sub<Expr>,
        to: SqlType,
        style: CastStyle,
    },
    Function(Function, Vec<Sub<Expr>>),
    Special(Special),
    Agg(Sub<Agg>),
    InSubquery {
        expr: Option<Sub<Expr>>,
        negated: bool,
        query: Sub<Query>,
    },
    Exists {
        negated: bool,
        query: Sub<Query>,
    },
    Scalar(Sub<Query>),
    Quantified {
        expr: Sub<Expr>,
        op: BinOp,
        any: bool,
        query: Sub<Query>,
    },
    Paren(Sub<Expr>),
    Deep(Deep),
    Placeholder(u8),
    Interval(i64, u8),
    Raw(String),
    Window(u8, Window),
}

#[derive(Debug, Arbitrary)]
pub struct When {
    pub condition: Sub<Expr>,
    pub result: Sub<Expr>,
}

#[derive(Debug, Arbitrary, Clone, Copy)]
pub enum Function {
    Allowed(u16),
    Excluded(u8),
    Aggregate(u8),
}

#[derive(Debug, Arbitrary)]
pub enum Special {
    Extract(u8, Sub<Expr>),
    Substring(Sub<Expr>, Option<Sub<Expr>>, Option<Sub<Expr>>),
    Position(Sub<Expr>, Sub<Expr>),
    Trim(u8, Option<Sub<Expr>>, Sub<Expr>),
    Overlay(Sub<Expr>, Sub<Expr>, Sub<Expr>, Option<Sub<Expr>>),
    AtTimeZone(Sub<Expr>, String),
    Collate(Sub<Expr>),
    Ceil(Sub<Expr>, u8),
    ArrowCast(Sub<Expr>, u8),
    ArrayLiteral(Vec<Sub<Expr>>),
    Index(Sub<Expr>, Sub<Expr>),
    Struct(Vec<Sub<Expr>>),
    Map,
    Lambda,
    TypedString(SqlType, String),
}

#[derive(Debug, Arbitrary, Clone, Copy)]
pub enum LikeKind {
    Like,
    ILike,
    SimilarTo,
    Regex,
    RegexI,
    NotRegex,
    Glob,
}

#[derive(Debug, Arbitrary)]
pub enum IsTest {
    Null,
    NotNull,
    True,
    False,
    Unknown,
    NotTrue,
    NotFalse,
    DistinctFrom(Sub<Expr>),
    NotDistinctFrom(Sub<Expr>),
}

#[derive(Debug, Arbitrary, Clone, Copy)]
pub enum CastStyle {
    Cast,
    TryCast,
    DoubleColon,
}

#[derive(Debug, Arbitrary, Clone, Copy)]
pub enum SqlType {
    TinyInt,
    SmallInt,
    Int,
    BigInt,
    IntUnsigned,
    BigIntUnsigned,
    Real,
    Double,
    Decimal(u8, u8),
    Varchar,
    Text,
    Char(u16),
    Date,
    Timestamp,
    TimestampTz,
    Time,
    Interval,
    Boolean,
    Bytea,
    IntArray,
    Numeric,
    Unknown,
}

#[derive(Debug, Arbitrary, Clone, Copy)]
pub enum BinOp {
    Plus,
    Minus,
    Multiply,
    Divide,
    Modulo,
    Concat,
    Eq,
    NotEq,
    NotEq2,
    Lt,
    LtEq,
    Gt,
    GtEq,
    And,
    Or,
    Xor,
    BitAnd,
    BitOr,
    BitXor,
    Hash,
    ShiftLeft,
    ShiftRight,
    Arrow,
    LongArrow,
    AtArrow,
    ArrowAt,
    Tilde,
    TildeStar,
    NotTilde,
    NotTildeStar,
    LikeOp,
    Spaceship,
    IsDistinctFrom,
    IsNotDistinctFrom,
    Div,
    Question,
    AtAt,
    Caret,
}

#[derive(Debug, Arbitrary, Clone, Copy)]
pub enum UnOp {
    Not,
    Minus,
    Plus,
    BitNot,
    Sqrt,
    Abs,
}

#[derive(Debug, Arbitrary)]
pub enum Lit {
    Small(u8),
    Int(i64),
    Float(f64),
    Str(String),
    Null,
    Bool(bool),
    Odd(u8),
    Digits { digit: u8, count: u16, fraction: u16 },
    Long { ch: char, count: u32 },
    Date(u16, u8, u8),
    Hex(Vec<u8>),
    Escaped(String),
    Unicode(String),
    Dollar(String),
    DateColumn(u8),
}

#[derive(Debug, Arbitrary)]
pub struct Deep {
    pub kind: DeepKind,
    pub count: u16,
    pub inner: Sub<Expr>,
}

#[derive(Debug, Arbitrary, Clone, Copy)]
pub enum DeepKind {
    Parens,
    Not,
    Minus,
    Chain(BinOp),
    LeftChain(BinOp),
    Call(Function),
    Case,
    CaseBranches,
    CaseOperandBranches,
    ScalarSubquery,
    Cast(SqlType),
    DoubleColon(SqlType),
    IsNull,
    WideCall(Function),
    InList,
    InListExprs,
    InSubquery,
    Exists,
    Between,
    Concat,
    Like,
    OrOfEquals,
    AndOfNotEquals,
    Coalesce,
    NestedAgg,
    ArrayIndex,
    LongString,
}

#[derive(Debug, Arbitrary)]
pub struct DeepQuery {
    pub kind: DeepQueryKind,
    pub count: u16,
    pub inner: AggregateQuery,
}

#[derive(Debug, Arbitrary, Clone, Copy)]
pub enum DeepQueryKind {
    NestedDerived,
    NestedInSubquery,
    NestedExists,
    CteChain,
    CteWide,
    UnionChain(SetOp),
    JoinChain(JoinKind),
    CommaJoins,
    QueryParens,
    ManyItems,
    ManyAggregates(AggFunc),
    ManyGroupKeys,
    ManyOrderKeys,
    NestedScalar,
    SelfJoinChain,
    GroupingSets,
}

#[derive(Debug, Arbitrary, Clone, Copy)]
pub enum StatementKind {
    Explain,
    ExplainAnalyze,
    CreateTableAs,
    CreateView,
    CreateExternal,
    Insert,
    Update,
    Delete,
    Drop,
    Copy,
    Set,
    Prepare,
    Execute,
    Describe,
    Show,
    Begin,
    Truncate,
    CreateFunction,
    Merge,
    Deallocate,
}
