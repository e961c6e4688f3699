//! AuditService over gRPC: a thin adapter on the auditor's side of [`Core`] (`crate::auditor`).
//! Role checks, recording of every read and replay live there; this maps messages and errors.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status};

use super::call_context;
use super::proto::{self, audit_service_server::AuditService};
use crate::auditor::RecordFilter;
use crate::gateway::Core;

pub struct AuditApi {
    core: Arc<Core>,
}

impl AuditApi {
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

fn some(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

impl From<proto::ListRecordsRequest> for RecordFilter {
    fn from(r: proto::ListRecordsRequest) -> Self {
        Self {
            user: some(r.user),
            organisation: some(r.organisation),
            project: some(r.project),
            decision: some(r.decision),
            from: some(r.from_time),
            to: some(r.to_time),
            from_seq: r.from_seq,
            limit: r.limit as usize,
        }
    }
}

fn record(r: crate::audit::Record) -> proto::AuditRecord {
    let json = serde_json::to_string(&r).expect("record serialises");
    let e = r.entry;
    proto::AuditRecord {
        seq: r.seq,
        time: r.time,
        prev_hash: r.prev_hash,
        hash: r.hash,
        call: e.call,
        user: e.user.unwrap_or_default(),
        organisation: e.organisation.unwrap_or_default(),
        roles: e.roles,
        client_tool: e.client_tool.unwrap_or_default(),
        project: e.project.unwrap_or_default(),
        sql: e.sql.unwrap_or_default(),
        plan_hash: e.plan_hash.unwrap_or_default(),
        policy_hash: e.policy_hash.unwrap_or_default(),
        snapshot: e.snapshot.into_iter().collect(),
        decision: e.decision,
        rule: e.rule.unwrap_or_default(),
        result_hash: e.result_hash.unwrap_or_default(),
        rows: e.rows,
        groups_withheld: e.groups_withheld,
        cells_withheld: e.cells_withheld,
        cells_released: e.cells_released,
        duration_ms: e.duration_ms,
        json,
    }
}

fn checkpoint(c: crate::audit::Checkpoint) -> proto::Checkpoint {
    proto::Checkpoint {
        size: c.size,
        root: c.root,
        time: c.time,
        signature: c.signature,
    }
}

type RecordStream = Pin<Box<dyn Stream<Item = Result<proto::AuditRecord, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl AuditService for AuditApi {
    async fn list_records(
        &self,
        request: Request<proto::ListRecordsRequest>,
    ) -> Result<Response<proto::ListRecordsResponse>, Status> {
        let call = call_context(&request);
        let filter = RecordFilter::from(request.into_inner());
        let records = self.core.audit_records(&call, &filter).await.map_err(super::status)?;
        Ok(Response::new(proto::ListRecordsResponse {
            records: records.into_iter().map(record).collect(),
        }))
    }

    type StreamRecordsStream = RecordStream;

    async fn stream_records(
        &self,
        request: Request<proto::ListRecordsRequest>,
    ) -> Result<Response<RecordStream>, Status> {
        let call = call_context(&request);
        let filter = RecordFilter::from(request.into_inner());
        let records = self.core.audit_records(&call, &filter).await.map_err(super::status)?;
        let stream = futures::stream::iter(records.into_iter().map(|r| Ok(record(r))));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_checkpoint(
        &self,
        request: Request<proto::GetCheckpointRequest>,
    ) -> Result<Response<proto::GetCheckpointResponse>, Status> {
        let call = call_context(&request);
        let latest = self.core.audit_checkpoint(&call).await.map_err(super::status)?;
        Ok(Response::new(proto::GetCheckpointResponse {
            checkpoint: latest.map(checkpoint),
        }))
    }

    async fn get_inclusion_proof(
        &self,
        request: Request<proto::InclusionProofRequest>,
    ) -> Result<Response<proto::InclusionProofResponse>, Status> {
        let call = call_context(&request);
        let r = request.into_inner();
        let (rec, tree_size, proof, signed) = self
            .core
            .audit_inclusion(&call, r.seq, r.tree_size)
            .await
            .map_err(super::status)?;
        Ok(Response::new(proto::InclusionProofResponse {
            record: Some(record(rec)),
            tree_size,
            proof,
            checkpoint: signed.map(checkpoint),
        }))
    }

    async fn get_consistency_proof(
        &self,
        request: Request<proto::ConsistencyProofRequest>,
    ) -> Result<Response<proto::ConsistencyProofResponse>, Status> {
        let call = call_context(&request);
        let r = request.into_inner();
        let proof = self
            .core
            .audit_consistency(&call, r.old_size, r.new_size)
            .await
            .map_err(super::status)?;
        Ok(Response::new(proto::ConsistencyProofResponse { proof }))
    }

    async fn replay(&self, request: Request<proto::ReplayRequest>) -> Result<Response<proto::ReplayResponse>, Status> {
        let call = call_context(&request);
        let seq = request.into_inner().seq;
        let r = self.core.replay(&call, seq).await.map_err(super::status)?;
        Ok(Response::new(proto::ReplayResponse {
            seq: r.seq,
            recorded_result_hash: r.recorded_hash,
            replayed_result_hash: r.replayed_hash,
            confirmed: r.confirmed,
            plan_matches: r.plan_matches,
            replay_seq: r.receipt.seq,
            replay_hash: r.receipt.hash,
        }))
    }
}
