//! Safe Outputs, identifier rules: which columns of a plan are identifiers, by lineage, and the
//! checks that keep them out of places where they would release a person.
//!
//! A column is an identifier if it is one in a table (`person_id`, or another marked in the
//! dataset config), or a bare pass-through of one; its [`Mask`] entry says which kind. This
//! module only answers questions about columns and expressions; it rewrites nothing.

use std::sync::Arc;

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, DFSchemaRef};
use datafusion::logical_expr::Expr;

use super::PolicyError;

/// Prefix of identifier columns appended to projections so people can be counted.
pub(super) const HIDDEN_PID: &str = "__sde_pid_";

/// The schema a join condition is written against: both inputs, side by side (for every join
/// type, unlike the join's output schema).
pub(super) fn both_sides_schema(j: &datafusion::logical_expr::Join) -> datafusion::error::Result<DFSchemaRef> {
    Ok(Arc::new(j.left.schema().join(j.right.schema())?))
}

/// For each output field of a plan: is it an identifier?
pub(super) type Mask = Vec<Id>;

/// What a column is, by lineage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Id {
    /// Not an identifier.
    No,
    /// The person identifier: the privacy unit, counted for every cell.
    Person,
    /// Another identifier marked in the dataset config: placed like `person_id`, not counted.
    Other,
}

/// Looks a column up in a schema and says whether it is an identifier.
pub(super) fn is_identifier_column(c: &Column, schema: &DFSchemaRef, mask: &Mask) -> bool {
    kind_of(c, schema, mask) != Id::No
}

pub(super) fn kind_of(c: &Column, schema: &DFSchemaRef, mask: &Mask) -> Id {
    schema.index_of_column(c).map(|i| mask[i]).unwrap_or(Id::No)
}

/// The kind of identifier `expr` is, without aliases, if it is a bare column.
pub(super) fn bare_kind(expr: &Expr, schema: &DFSchemaRef, mask: &Mask) -> Id {
    match expr.clone().unalias_nested().data {
        Expr::Column(c) => kind_of(&c, schema, mask),
        _ => Id::No,
    }
}

pub(super) fn has_person(mask: &Mask) -> bool {
    mask.contains(&Id::Person)
}

/// `expr`, without aliases, is a bare identifier column.
pub(super) fn bare_identifier(expr: &Expr, schema: &DFSchemaRef, mask: &Mask) -> bool {
    bare_kind(expr, schema, mask) != Id::No
}

/// Refuses `expr` if it mentions an identifier column anywhere.
pub(super) fn no_identifier(
    expr: &Expr,
    schema: &DFSchemaRef,
    mask: &Mask,
    place: &'static str,
) -> Result<(), PolicyError> {
    let mut found = None;
    expr.apply(|e| {
        if let Expr::Column(c) = e
            && is_identifier_column(c, schema, mask)
        {
            found = Some(c.name.clone());
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    })
    .map_err(PolicyError::from_df)?;
    match found {
        Some(column) => Err(PolicyError::Identifier { column, place }),
        None => Ok(()),
    }
}
