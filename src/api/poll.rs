//! Flight's PollFlightInfo for statement queries, so a client can start a long query and follow
//! its progress ([`crate::gateway::progress`]) instead of holding one call open. The first poll
//! of a `CommandStatementQuery` or `CommandPreparedStatementQuery` starts the query (the same
//! walk as GetFlightInfo: authorised, checked, run, audited) and answers with a descriptor to
//! poll again; once the query is done a poll answers with its FlightInfo and progress 1.0, and
//! the ticket in it is fetched with DoGet as usual. A poll is bound to the user and project
//! that started it; one not fetched within `limits.statement_ttl_seconds` is forgotten.
//!
//! arrow-flight's Flight SQL server answers PollFlightInfo with UNIMPLEMENTED, so this wraps
//! [`FlightSqlApi`] as a `FlightService`, passing every other call through unchanged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::{Any, Command};
use arrow_flight::{
    Action, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo, HandshakeRequest, PollInfo, SchemaResult, Ticket,
};
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use super::flight_sql::{FlightSqlApi, planned_info};
use super::{call_context, status};
use crate::gateway::progress::Progress;

/// What a poll descriptor's command starts with; the rest is the poll's id.
const POLL: &[u8] = b"sde-poll:";

type Outcome = Arc<Mutex<Option<Result<Response<FlightInfo>, Status>>>>;

struct Poll {
    user: Option<String>,
    project: Option<String>,
    progress: Progress,
    outcome: Outcome,
    started: Instant,
}

/// The Flight SQL service with PollFlightInfo.
#[derive(Clone)]
pub struct Polled {
    api: FlightSqlApi,
    polls: Arc<Mutex<HashMap<String, Poll>>>,
    ttl: Duration,
}

impl Polled {
    pub fn new(api: FlightSqlApi, ttl: Duration) -> Self {
        Self {
            api,
            polls: Arc::default(),
            ttl,
        }
    }

    /// Starts the query `descriptor` asks for; returns the poll's id.
    fn start(&self, request: Request<FlightDescriptor>) -> Result<(String, Progress), Status> {
        let call = call_context(&request);
        let descriptor = request.into_inner();
        let any = Any::decode(&*descriptor.cmd).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let command = Command::try_from(any).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (core, api) = (Arc::clone(self.api.core()), self.api.clone());
        let (progress, outcome) = (Progress::default(), Outcome::default());
        let (p, o) = (progress.clone(), Arc::clone(&outcome));
        let call_for = call.clone();
        let run = async move {
            let planned = match command {
                Command::CommandStatementQuery(q) => core.plan_query(&call_for, &q.query).await,
                Command::CommandPreparedStatementQuery(q) => {
                    let handle = String::from_utf8_lossy(&q.prepared_statement_handle).into_owned();
                    core.execute_prepared(&call_for, &handle).await
                }
                _ => {
                    *o.lock().expect("poll lock") = Some(Err(Status::unimplemented(
                        "PollFlightInfo serves statement and prepared statement queries",
                    )));
                    return;
                }
            };
            let info = planned.map_err(status).and_then(|mut planned| {
                planned.schema = api.wire(planned.schema);
                planned_info(descriptor, planned)
            });
            *o.lock().expect("poll lock") = Some(info);
            p.done();
        };
        tokio::spawn(progress.track(run));
        let id = uuid::Uuid::new_v4().to_string();
        let mut polls = self.polls.lock().expect("poll lock");
        polls.retain(|_, p| p.started.elapsed() < self.ttl);
        polls.insert(
            id.clone(),
            Poll {
                user: call.authenticated.as_ref().ok().map(|s| s.user.clone()),
                project: call.project.clone(),
                progress: progress.clone(),
                outcome,
                started: Instant::now(),
            },
        );
        Ok((id, progress))
    }

    /// The state of poll `id` for this caller.
    fn state(&self, request: &Request<FlightDescriptor>, id: &str) -> Result<Response<PollInfo>, Status> {
        let call = call_context(request);
        let user = call.authenticated.as_ref().ok().map(|s| s.user.clone());
        let mut polls = self.polls.lock().expect("poll lock");
        let poll = polls
            .get(id)
            .filter(|p| p.user.is_some() && p.user == user && p.project == call.project)
            .ok_or_else(|| Status::not_found("safe-settings/unknown-statement: no such query is running for you"))?;
        let outcome = poll.outcome.lock().expect("poll lock").take();
        match outcome {
            None => Ok(Response::new(pending(id, poll.progress.get()))),
            Some(outcome) => {
                polls.remove(id);
                let info = outcome?.into_inner();
                Ok(Response::new(PollInfo {
                    info: Some(info),
                    flight_descriptor: None,
                    progress: Some(1.0),
                    expiration_time: None,
                }))
            }
        }
    }
}

fn pending(id: &str, progress: f64) -> PollInfo {
    let mut cmd = POLL.to_vec();
    cmd.extend_from_slice(id.as_bytes());
    PollInfo {
        info: None,
        flight_descriptor: Some(FlightDescriptor::new_cmd(cmd)),
        progress: Some(progress),
        expiration_time: None,
    }
}

#[tonic::async_trait]
impl FlightService for Polled {
    type HandshakeStream = <FlightSqlApi as FlightService>::HandshakeStream;
    type ListFlightsStream = <FlightSqlApi as FlightService>::ListFlightsStream;
    type DoGetStream = <FlightSqlApi as FlightService>::DoGetStream;
    type DoPutStream = <FlightSqlApi as FlightService>::DoPutStream;
    type DoActionStream = <FlightSqlApi as FlightService>::DoActionStream;
    type ListActionsStream = <FlightSqlApi as FlightService>::ListActionsStream;
    type DoExchangeStream = <FlightSqlApi as FlightService>::DoExchangeStream;

    async fn poll_flight_info(&self, request: Request<FlightDescriptor>) -> Result<Response<PollInfo>, Status> {
        if let Some(id) = request.get_ref().cmd.strip_prefix(POLL) {
            let id = String::from_utf8_lossy(id).into_owned();
            return self.state(&request, &id);
        }
        let (id, progress) = self.start(request)?;
        Ok(Response::new(pending(&id, progress.get())))
    }

    async fn handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        FlightService::handshake(&self.api, request).await
    }
    async fn list_flights(&self, request: Request<Criteria>) -> Result<Response<Self::ListFlightsStream>, Status> {
        FlightService::list_flights(&self.api, request).await
    }
    async fn get_flight_info(&self, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        FlightService::get_flight_info(&self.api, request).await
    }
    async fn get_schema(&self, request: Request<FlightDescriptor>) -> Result<Response<SchemaResult>, Status> {
        FlightService::get_schema(&self.api, request).await
    }
    async fn do_get(&self, request: Request<Ticket>) -> Result<Response<Self::DoGetStream>, Status> {
        FlightService::do_get(&self.api, request).await
    }
    async fn do_put(&self, request: Request<Streaming<FlightData>>) -> Result<Response<Self::DoPutStream>, Status> {
        FlightService::do_put(&self.api, request).await
    }
    async fn do_action(&self, request: Request<Action>) -> Result<Response<Self::DoActionStream>, Status> {
        FlightService::do_action(&self.api, request).await
    }
    async fn list_actions(&self, request: Request<Empty>) -> Result<Response<Self::ListActionsStream>, Status> {
        FlightService::list_actions(&self.api, request).await
    }
    async fn do_exchange(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        FlightService::do_exchange(&self.api, request).await
    }
}
