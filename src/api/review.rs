//! ReviewService (`proto/sde/v1/review.proto`): a thin adapter from gRPC messages to output
//! checking ([`crate::review`]).

use std::sync::Arc;

use datafusion::arrow::ipc::writer::StreamWriter;
use tonic::{Request, Response, Status};

use super::proto::review_service_server::ReviewService;
use super::proto::{self as pb};
use super::{call_context, status};
use crate::error::Error;
use crate::gateway::{Core, Released};
use crate::registry::releases::Release;
use crate::review::ReviewView;

pub struct ReviewApi {
    core: Arc<Core>,
}

impl ReviewApi {
    pub fn new(core: Arc<Core>) -> Self {
        Self { core }
    }
}

impl From<Release> for pb::ReleaseRequest {
    fn from(r: Release) -> Self {
        Self {
            id: r.id,
            project: r.request.project,
            author: r.request.author,
            receipt: r.request.receipt,
            sql: r.request.sql,
            justification: r.request.justification,
            state: r.state,
            round: r.round,
            reviews: r
                .reviews
                .into_iter()
                .map(|v| pb::CheckerReview {
                    round: v.round,
                    checker: v.checker,
                    decision: v.decision,
                    comment: v.comment,
                    decided_at: v.decided_at,
                })
                .collect(),
            created_at: r.created_at,
            updated_at: r.updated_at,
            released_receipt: r.released.map_or(0, |(seq, _)| seq),
            snapshot: r.request.snapshot.into_iter().collect(),
        }
    }
}

fn view(release: Release, view: ReviewView) -> pb::ReviewView {
    let count = |prefix: &str| {
        view.rows
            .iter()
            .flat_map(|r| &r.cells)
            .filter(|c| c.outcome.starts_with(prefix))
            .count() as u64
    };
    let (cells, groups) = (
        count("withheld: fewer"),
        view.rows
            .iter()
            .filter(|r| r.cells.iter().any(|c| c.outcome.starts_with("withheld: group")))
            .count() as u64,
    );
    pb::ReviewView {
        rules: release.request.rules.clone(),
        request: Some(release.into()),
        key_columns: view.key_columns,
        rows: view
            .rows
            .into_iter()
            .map(|r| pb::ReviewRow {
                keys: r.keys,
                people: r.people,
                cells: r
                    .cells
                    .into_iter()
                    .map(|c| pb::ReviewCell {
                        column: c.column,
                        true_value: c.true_value,
                        release_value: c.release_value,
                        author_value: c.author_value,
                        outcome: c.outcome,
                    })
                    .collect(),
            })
            .collect(),
        cells_withheld: cells,
        groups_withheld: groups,
    }
}

/// A result as one Arrow IPC stream.
fn ipc(released: &Released) -> Result<Vec<u8>, Error> {
    let mut out = Vec::new();
    let err = |e: datafusion::arrow::error::ArrowError| Error::Internal(format!("release as Arrow IPC: {e}"));
    let mut writer = StreamWriter::try_new(&mut out, &released.schema).map_err(err)?;
    for b in &released.batches {
        writer.write(b).map_err(err)?;
    }
    writer.finish().map_err(err)?;
    drop(writer);
    Ok(out)
}

fn reply<T, R: From<T>>(outcome: Result<T, Error>) -> Result<Response<R>, Status> {
    outcome.map(|v| Response::new(R::from(v))).map_err(status)
}

#[tonic::async_trait]
impl ReviewService for ReviewApi {
    async fn request_release(&self, r: Request<pb::NewReleaseRequest>) -> Result<Response<pb::ReleaseRequest>, Status> {
        let m = r.get_ref();
        reply(
            self.core
                .request_release(&call_context(&r), m.receipt, &m.justification)
                .await,
        )
    }

    async fn list_releases(
        &self,
        r: Request<pb::ListReleasesRequest>,
    ) -> Result<Response<pb::ListReleasesResponse>, Status> {
        let queue = self
            .core
            .releases(&call_context(&r), r.get_ref().queue)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ListReleasesResponse {
            requests: queue.releases.into_iter().map(Into::into).collect(),
            changes: queue
                .changes
                .into_iter()
                .map(|(project, c, role)| pb::ChangeToSign {
                    project,
                    change: c.id,
                    description: c.change,
                    requested_by: c.requested_by,
                    requested_at: c.requested_at,
                    role: role.to_owned(),
                })
                .collect(),
        }))
    }

    async fn get_release(&self, r: Request<pb::ReleaseRef>) -> Result<Response<pb::ReleaseRequest>, Status> {
        reply(self.core.release(&call_context(&r), r.get_ref().id).await)
    }

    async fn withdraw_release(&self, r: Request<pb::ReleaseRef>) -> Result<Response<pb::ReleaseRequest>, Status> {
        reply(self.core.withdraw_release(&call_context(&r), r.get_ref().id).await)
    }

    async fn resubmit_release(&self, r: Request<pb::Resubmission>) -> Result<Response<pb::ReleaseRequest>, Status> {
        let m = r.get_ref();
        reply(
            self.core
                .resubmit_release(&call_context(&r), m.id, &m.justification)
                .await,
        )
    }

    async fn fetch_release(&self, r: Request<pb::ReleaseRef>) -> Result<Response<pb::ReleasedResult>, Status> {
        let (release, released) = self
            .core
            .fetch_release(&call_context(&r), r.get_ref().id)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ReleasedResult {
            arrow_ipc: ipc(&released).map_err(status)?,
            request: Some(release.into()),
            receipt_seq: released.receipt.seq,
            receipt_hash: released.receipt.hash,
        }))
    }

    async fn show_review(&self, r: Request<pb::ReleaseRef>) -> Result<Response<pb::ReviewView>, Status> {
        let (release, v) = self
            .core
            .show_review(&call_context(&r), r.get_ref().id)
            .await
            .map_err(status)?;
        Ok(Response::new(view(release, v)))
    }

    async fn decide_review(&self, r: Request<pb::ReviewDecision>) -> Result<Response<pb::ReleaseRequest>, Status> {
        let m = r.get_ref();
        reply(
            self.core
                .decide_review(&call_context(&r), m.id, &m.decision, &m.comment)
                .await,
        )
    }
}
