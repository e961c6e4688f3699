//! Arrow Flight SQL for researchers: statement queries (GetFlightInfo, then DoGet with the ticket
//! authorised again), catalogue browsing limited to the project's grants, and SqlInfo so that
//! JDBC/ODBC-style tools can connect: type info, and the key calls DBeaver and JDBC make,
//! which are empty. Everything else is refused as unimplemented.

use std::pin::Pin;
use std::sync::Arc;

use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::sql::DoPutPreparedStatementResult;
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult,
    CommandGetCatalogs, CommandGetCrossReference, CommandGetDbSchemas, CommandGetExportedKeys, CommandGetImportedKeys,
    CommandGetPrimaryKeys, CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandGetXdbcTypeInfo,
    CommandPreparedStatementQuery, CommandStatementQuery, ProstMessageExt, SqlInfo, TicketStatementQuery,
};
use arrow_flight::{Action, IpcMessage, SchemaAsIpc};
use arrow_flight::{FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse, Ticket};
use datafusion::arrow::array::{RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::ipc::writer::IpcWriteOptions;
use datafusion::common::ScalarValue;
use futures::{Stream, TryStreamExt, stream};
use prost::Message;
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};

use super::metadata::{SQL_INFO, XDBC_TYPES, foreign_keys_schema, no_rows, primary_keys_schema};
use super::{RECEIPT_HASH_HEADER, RECEIPT_SEQ_HEADER, call_context, status};
use crate::engine::{CATALOG, SCHEMA};
use crate::gateway::{Core, Planned};

/// The audited name of the key calls (GetPrimaryKeys, GetExportedKeys, GetImportedKeys,
/// GetCrossReference).
const KEYS_CALL: &str = "metadata.keys";

/// The Flight SQL service: a thin adapter over [`Core`].
#[derive(Clone)]
pub struct FlightSqlApi {
    core: Arc<Core>,
    /// Results with plain `Utf8` strings (`data.string_view = false`, [`super::strings`]).
    plain_strings: bool,
}

impl FlightSqlApi {
    pub fn new(core: Arc<Core>) -> Self {
        Self {
            core,
            plain_strings: false,
        }
    }

    /// Sends strings as plain `Utf8` rather than `Utf8View`.
    pub fn with_plain_strings(mut self, plain: bool) -> Self {
        self.plain_strings = plain;
        self
    }

    /// The walk this service adapts.
    pub(super) fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// A result's schema as this service sends it.
    pub(super) fn wire(&self, schema: SchemaRef) -> SchemaRef {
        match self.plain_strings {
            true => super::strings::plain(&schema),
            false => schema,
        }
    }

    /// A metadata call: the caller must be known and allowed, and the call is audited.
    async fn identify<T>(&self, request: &Request<T>, call: &str) -> Result<(), Status> {
        self.core.identify(&call_context(request), call).await.map_err(status)?;
        Ok(())
    }

    /// A key call's FlightInfo: `schema`, and a ticket for [`Self::no_keys`].
    async fn key_info(
        &self,
        request: Request<FlightDescriptor>,
        ticket: Vec<u8>,
        schema: SchemaRef,
    ) -> Result<Response<FlightInfo>, Status> {
        self.identify(&request, KEYS_CALL).await?;
        info_for(request.into_inner(), ticket, &schema)
    }

    /// A key call's answer: no rows (served datasets have no primary or foreign keys).
    async fn no_keys(&self, request: &Request<Ticket>, schema: SchemaRef) -> Result<Response<DoGetStream>, Status> {
        self.identify(request, KEYS_CALL).await?;
        one_batch(Arc::clone(&schema), no_rows(&schema))
    }
}

type DoGetStream = Pin<Box<dyn Stream<Item = Result<arrow_flight::FlightData, Status>> + Send + 'static>>;

/// Reads who is calling (set by the authentication layer) and the project header.
fn info_for(descriptor: FlightDescriptor, ticket: Vec<u8>, schema: &Schema) -> Result<Response<FlightInfo>, Status> {
    let endpoint = FlightEndpoint::new().with_ticket(Ticket::new(ticket));
    let info = FlightInfo::new()
        .try_with_schema(schema)
        .map_err(|e| Status::internal(format!("cannot encode schema: {e}")))?
        .with_endpoint(endpoint)
        .with_descriptor(descriptor);
    Ok(Response::new(info))
}

/// A statement handle from its bytes (handles are UUIDs; anything else matches nothing).
fn handle_of(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The FlightInfo of an executed statement: its ticket, schema (with disclosure metadata) and size.
pub(super) fn planned_info(descriptor: FlightDescriptor, planned: Planned) -> Result<Response<FlightInfo>, Status> {
    let ticket = TicketStatementQuery {
        statement_handle: planned.handle.into_bytes().into(),
    };
    let mut info = info_for(descriptor, ticket.as_any().encode_to_vec(), &planned.schema)?;
    info.get_mut().total_records = planned.rows as i64;
    Ok(info)
}

fn batch_stream(schema: SchemaRef, batches: Vec<RecordBatch>) -> DoGetStream {
    let stream = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(stream::iter(batches.into_iter().map(Ok)))
        .map_err(Status::from);
    Box::pin(stream)
}

fn one_batch<E: std::fmt::Display>(
    schema: SchemaRef,
    batch: Result<RecordBatch, E>,
) -> Result<Response<DoGetStream>, Status> {
    let batch = batch.map_err(|e| Status::internal(format!("cannot build metadata: {e}")))?;
    Ok(Response::new(batch_stream(schema, vec![batch])))
}

#[tonic::async_trait]
impl FlightSqlService for FlightSqlApi {
    type FlightService = FlightSqlApi;

    /// A handshake confirms the bearer token and hands it back, for clients that expect one.
    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>>, Status> {
        let call = call_context(&request);
        let token = request.metadata().get("authorization").cloned();
        self.core.identify(&call, "handshake").await.map_err(status)?;
        let reply = HandshakeResponse {
            protocol_version: 0,
            payload: Default::default(),
        };
        let mut response: Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>> =
            Response::new(Box::pin(stream::iter(vec![Ok(reply)])));
        if let Some(token) = token {
            response.metadata_mut().insert("authorization", token);
        }
        Ok(response)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let call = call_context(&request);
        let mut planned = self.core.plan_query(&call, &query.query).await.map_err(status)?;
        planned.schema = self.wire(planned.schema);
        planned_info(request.into_inner(), planned)
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let call = call_context(&request);
        let handle = handle_of(&ticket.statement_handle);
        let released = self.core.run_query(&call, &handle).await.map_err(status)?;
        let schema = self.wire(Arc::clone(&released.schema));
        let batches = match self.plain_strings {
            true => super::strings::plain_batches(&schema, released.batches)
                .map_err(|e| Status::internal(format!("cannot send the result as plain strings: {e}")))?,
            false => released.batches,
        };
        let mut response = Response::new(batch_stream(schema, batches));
        let md = response.metadata_mut();
        md.insert(RECEIPT_SEQ_HEADER, MetadataValue::from(released.receipt.seq));
        if let Ok(hash) = MetadataValue::try_from(released.receipt.hash.as_str()) {
            md.insert(RECEIPT_HASH_HEADER, hash);
        }
        Ok(response)
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.core
            .identify(&call_context(&request), "metadata.catalogs")
            .await
            .map_err(status)?;
        let ticket = query.as_any().encode_to_vec();
        let schema = query.into_builder().schema();
        info_for(request.into_inner(), ticket, &schema)
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.core
            .identify(&call_context(&request), "metadata.catalogs")
            .await
            .map_err(status)?;
        let mut builder = query.into_builder();
        builder.append(CATALOG);
        one_batch(builder.schema(), builder.build())
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.core
            .identify(&call_context(&request), "metadata.schemas")
            .await
            .map_err(status)?;
        let ticket = query.as_any().encode_to_vec();
        let schema = query.into_builder().schema();
        info_for(request.into_inner(), ticket, &schema)
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.core
            .identify(&call_context(&request), "metadata.schemas")
            .await
            .map_err(status)?;
        let mut builder = query.into_builder();
        builder.append(CATALOG, SCHEMA);
        one_batch(builder.schema(), builder.build())
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.core.tables(&call_context(&request)).await.map_err(status)?;
        let ticket = query.as_any().encode_to_vec();
        let schema = query.into_builder().schema();
        info_for(request.into_inner(), ticket, &schema)
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let tables = self.core.tables(&call_context(&request)).await.map_err(status)?;
        let mut builder = query.into_builder();
        for table in tables {
            builder
                .append(CATALOG, SCHEMA, &table.name, "TABLE", &table.schema)
                .map_err(|e| Status::internal(format!("cannot list tables: {e}")))?;
        }
        one_batch(builder.schema(), builder.build())
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.core
            .identify(&call_context(&request), "metadata.table_types")
            .await
            .map_err(status)?;
        info_for(
            request.into_inner(),
            query.as_any().encode_to_vec(),
            &table_types_schema(),
        )
    }

    async fn do_get_table_types(
        &self,
        _query: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.core
            .identify(&call_context(&request), "metadata.table_types")
            .await
            .map_err(status)?;
        let schema = Arc::new(table_types_schema());
        let batch = RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(StringArray::from(vec!["TABLE"]))]);
        one_batch(schema, batch)
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.core
            .identify(&call_context(&request), "metadata.sql_info")
            .await
            .map_err(status)?;
        let ticket = query.as_any().encode_to_vec();
        let schema = query.into_builder(&SQL_INFO).schema();
        info_for(request.into_inner(), ticket, &schema)
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.core
            .identify(&call_context(&request), "metadata.sql_info")
            .await
            .map_err(status)?;
        let builder = query.into_builder(&SQL_INFO);
        one_batch(builder.schema(), builder.build())
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let call = call_context(&request);
        let (handle, schema, parameters) = self.core.prepare(&call, &query.query).await.map_err(status)?;
        let schema = self.wire(schema);
        let encode = |schema: &Schema| -> Result<_, Status> {
            let IpcMessage(bytes) = SchemaAsIpc::new(schema, &IpcWriteOptions::default())
                .try_into()
                .map_err(|e| Status::internal(format!("cannot encode schema: {e}")))?;
            Ok(bytes)
        };
        // Parameters are untyped: whatever a client binds becomes a literal of its own type.
        let parameter_schema = match parameters {
            0 => Default::default(),
            n => encode(&Schema::new(
                (1..=n)
                    .map(|i| Field::new(format!("${i}"), DataType::Null, true))
                    .collect::<Vec<_>>(),
            ))?,
        };
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: handle.into_bytes().into(),
            dataset_schema: encode(&schema)?,
            parameter_schema,
        })
    }

    /// Bound parameters for a prepared statement: one row, kept for its next execution.
    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        let call = call_context(&request);
        let data = request.into_inner().map_err(FlightError::from);
        let batches: Vec<RecordBatch> = FlightRecordBatchStream::new_from_flight_data(data)
            .try_collect()
            .await
            .map_err(|e| {
                Status::invalid_argument(format!(
                    "safe-outputs/invalid-query: the bound parameters cannot be read: {e}"
                ))
            })?;
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        let values = match (rows, batches.iter().find(|b| b.num_rows() > 0)) {
            (0, _) => vec![],
            (1, Some(batch)) => batch
                .columns()
                .iter()
                .map(|c| ScalarValue::try_from_array(c, 0))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    Status::invalid_argument(format!(
                        "safe-outputs/invalid-query: a bound parameter cannot be read: {e}"
                    ))
                })?,
            (n, _) => {
                return Err(Status::invalid_argument(format!(
                    "safe-outputs/invalid-query: bind one row of parameters to a query ({n} were sent); run it once for each"
                )));
            }
        };
        let handle = handle_of(&query.prepared_statement_handle);
        self.core.bind_prepared(&call, &handle, values).await.map_err(status)?;
        Ok(DoPutPreparedStatementResult {
            prepared_statement_handle: Some(query.prepared_statement_handle),
        })
    }

    async fn get_flight_info_prepared_statement(
        &self,
        cmd: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let call = call_context(&request);
        let handle = handle_of(&cmd.prepared_statement_handle);
        let mut planned = self.core.execute_prepared(&call, &handle).await.map_err(status)?;
        planned.schema = self.wire(planned.schema);
        planned_info(request.into_inner(), planned)
    }

    async fn do_action_close_prepared_statement(
        &self,
        query: ActionClosePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<(), Status> {
        let call = call_context(&request);
        let handle = handle_of(&query.prepared_statement_handle);
        self.core.close_prepared(&call, &handle);
        Ok(())
    }

    async fn get_flight_info_xdbc_type_info(
        &self,
        query: CommandGetXdbcTypeInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.identify(&request, "metadata.xdbc_type_info").await?;
        let ticket = query.as_any().encode_to_vec();
        let schema = query.into_builder(&XDBC_TYPES).schema();
        info_for(request.into_inner(), ticket, &schema)
    }

    async fn do_get_xdbc_type_info(
        &self,
        query: CommandGetXdbcTypeInfo,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.identify(&request, "metadata.xdbc_type_info").await?;
        let builder = query.into_builder(&XDBC_TYPES);
        one_batch(builder.schema(), builder.build())
    }

    async fn get_flight_info_primary_keys(
        &self,
        query: CommandGetPrimaryKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.key_info(request, query.as_any().encode_to_vec(), primary_keys_schema())
            .await
    }

    async fn do_get_primary_keys(
        &self,
        _query: CommandGetPrimaryKeys,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.no_keys(&request, primary_keys_schema()).await
    }

    async fn get_flight_info_exported_keys(
        &self,
        query: CommandGetExportedKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.key_info(request, query.as_any().encode_to_vec(), foreign_keys_schema())
            .await
    }

    async fn do_get_exported_keys(
        &self,
        _query: CommandGetExportedKeys,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.no_keys(&request, foreign_keys_schema()).await
    }

    async fn get_flight_info_imported_keys(
        &self,
        query: CommandGetImportedKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.key_info(request, query.as_any().encode_to_vec(), foreign_keys_schema())
            .await
    }

    async fn do_get_imported_keys(
        &self,
        _query: CommandGetImportedKeys,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.no_keys(&request, foreign_keys_schema()).await
    }

    async fn get_flight_info_cross_reference(
        &self,
        query: CommandGetCrossReference,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.key_info(request, query.as_any().encode_to_vec(), foreign_keys_schema())
            .await
    }

    async fn do_get_cross_reference(
        &self,
        _query: CommandGetCrossReference,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.no_keys(&request, foreign_keys_schema()).await
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

fn table_types_schema() -> Schema {
    Schema::new(vec![Field::new("table_type", DataType::Utf8, false)])
}
