//! The fixed answers of Flight SQL's metadata calls that do not depend on the project: what the
//! server is (SqlInfo), which SQL types its results use (XdbcTypeInfo, for JDBC and DBeaver),
//! and the schemas of the key calls, which are always empty: served datasets have no primary or
//! foreign keys, and a pseudonym column is not one. Which tables a project may see is answered
//! by the walk ([`crate::gateway`]), not here.

use std::sync::{Arc, LazyLock};

use arrow_flight::sql::metadata::{
    SqlInfoData, SqlInfoDataBuilder, XdbcTypeInfo, XdbcTypeInfoData, XdbcTypeInfoDataBuilder,
};
use arrow_flight::sql::{Nullable, Searchable, SqlInfo, XdbcDataType};
use datafusion::arrow::array::{RecordBatch, new_empty_array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};

pub(super) static SQL_INFO: LazyLock<SqlInfoData> = LazyLock::new(|| {
    let mut b = SqlInfoDataBuilder::new();
    b.append(SqlInfo::FlightSqlServerName, "sde-gateway");
    b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
    b.append(SqlInfo::FlightSqlServerArrowVersion, "1.3");
    b.append(SqlInfo::FlightSqlServerReadOnly, true);
    b.append(SqlInfo::FlightSqlServerSql, true);
    b.append(SqlInfo::FlightSqlServerSubstrait, false);
    b.append(SqlInfo::FlightSqlServerTransaction, 0_i32);
    b.append(SqlInfo::FlightSqlServerCancel, false);
    b.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
    b.append(SqlInfo::SqlDdlCatalog, false);
    b.append(SqlInfo::SqlDdlSchema, false);
    b.append(SqlInfo::SqlDdlTable, false);
    b.build().expect("static SqlInfo builds")
});

/// The SQL types a result can hold, by their JDBC codes.
pub(super) static XDBC_TYPES: LazyLock<XdbcTypeInfoData> = LazyLock::new(|| {
    let mut b = XdbcTypeInfoDataBuilder::new();
    for (name, code, quote, radix) in [
        ("BOOLEAN", XdbcDataType::XdbcBit, None, None),
        ("INTEGER", XdbcDataType::XdbcInteger, None, Some(10)),
        ("BIGINT", XdbcDataType::XdbcBigint, None, Some(10)),
        ("DOUBLE", XdbcDataType::XdbcDouble, None, Some(2)),
        ("DECIMAL", XdbcDataType::XdbcDecimal, None, Some(10)),
        ("VARCHAR", XdbcDataType::XdbcVarchar, Some("'"), None),
        ("DATE", XdbcDataType::XdbcDate, Some("DATE '"), None),
        ("TIMESTAMP", XdbcDataType::XdbcTimestamp, Some("TIMESTAMP '"), None),
    ] {
        b.append(XdbcTypeInfo {
            type_name: name.into(),
            data_type: code,
            literal_prefix: quote.map(Into::into),
            literal_suffix: quote.map(|_| "'".into()),
            nullable: Nullable::NullabilityNullable,
            case_sensitive: code == XdbcDataType::XdbcVarchar,
            searchable: Searchable::Full,
            unsigned_attribute: radix.map(|_| false),
            local_type_name: Some(name.into()),
            sql_data_type: code,
            num_prec_radix: radix,
            ..Default::default()
        });
    }
    b.build().expect("static XdbcTypeInfo builds")
});

/// The schema of GetPrimaryKeys (Flight SQL's `CommandGetPrimaryKeys`).
pub(super) fn primary_keys_schema() -> SchemaRef {
    let text = |name: &str, nullable| Field::new(name, DataType::Utf8, nullable);
    Arc::new(Schema::new(vec![
        text("catalog_name", true),
        text("db_schema_name", true),
        text("table_name", false),
        text("column_name", false),
        text("key_name", true),
        Field::new("key_sequence", DataType::Int32, false),
    ]))
}

/// The schema of GetExportedKeys, GetImportedKeys and GetCrossReference.
pub(super) fn foreign_keys_schema() -> SchemaRef {
    let text = |name: &str, nullable| Field::new(name, DataType::Utf8, nullable);
    Arc::new(Schema::new(vec![
        text("pk_catalog_name", true),
        text("pk_db_schema_name", true),
        text("pk_table_name", false),
        text("pk_column_name", false),
        text("fk_catalog_name", true),
        text("fk_db_schema_name", true),
        text("fk_table_name", false),
        text("fk_column_name", false),
        Field::new("key_sequence", DataType::Int32, false),
        text("fk_key_name", true),
        text("pk_key_name", true),
        Field::new("update_rule", DataType::UInt8, false),
        Field::new("delete_rule", DataType::UInt8, false),
    ]))
}

/// A batch of no rows in `schema`.
pub(super) fn no_rows(schema: &SchemaRef) -> Result<RecordBatch, datafusion::arrow::error::ArrowError> {
    let columns = schema.fields().iter().map(|f| new_empty_array(f.data_type())).collect();
    RecordBatch::try_new(Arc::clone(schema), columns)
}
