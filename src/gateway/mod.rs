//! The walk of one call, independent of transport: authenticate → authorise → plan and check →
//! execute → disclosure control → audit → release. `api/` adapts it to Flight SQL.
//!
//! Every call, accepted or refused, leaves an audit record, and nothing derived from the data
//! leaves before a durable record describes it: a query's execution record (SQL, caller, project,
//! result hash, rows, what was withheld) is synced before its FlightInfo goes out. The DoGet that
//! hands the rows over writes its own record first and has it synced with the next fsync.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use sha2::{Digest, Sha256};
use tracing::{Instrument, Span};

use crate::audit::{AuditLog, Durability, Entry, Receipt};
use crate::clock::SharedClock;
use crate::config::LimitsConfig;
use crate::disclosure::Overrides;
use crate::disclosure::Rules;
use crate::engine::{Engine, EngineError};
use crate::error::Error;
use crate::identity::{IdentityError, Subject};
use crate::limits::{LimitError, Limits};
use crate::plans::{Physical, Plans, Ready, Variant};
use crate::policy::{self, Permit, StatementLimits};
use crate::recent::{self, Recent};
use crate::registry::rules::Action;
use crate::registry::{Principal, ProjectAccess, Refusal, Registry, RegistryError};
use crate::telemetry::Metrics;
use datafusion::common::tree_node::Transformed;
use datafusion::execution::TaskContext;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::prelude::SessionContext;

mod execute;
mod prepared;
pub mod progress;
mod record;

/// Project sessions kept at most (each a catalogue of a few table providers).
const SESSIONS: usize = 256;

/// Who is calling and for which project, as the transport saw it.
#[derive(Debug, Clone)]
pub struct CallContext {
    pub authenticated: Result<Subject, IdentityError>,
    pub project: Option<String>,
    /// The approved client tool, named by the mutual-TLS client certificate.
    pub client_tool: Option<String>,
}

/// A result computed by GetFlightInfo, not yet released.
struct Computed {
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
}

/// A statement executed by GetFlightInfo, waiting for its DoGet.
struct Pending {
    user: String,
    project: String,
    result: Computed,
    /// The execution's audit entry (SQL, rows, result hash, rules, what was withheld): the
    /// release record repeats it.
    executed: Entry,
    created: Instant,
}

/// A prepared statement (JDBC and other tools prepare every query): the SQL, bound to the user
/// and project that prepared it. It is planned and checked again at each execution.
struct Prepared {
    user: String,
    project: String,
    sql: String,
    /// Placeholders the SQL has, and the values last bound to them (DoPut).
    parameters: usize,
    bound: Option<Vec<datafusion::common::ScalarValue>>,
    created: Instant,
}

/// A statement about to run: a kept plan, or one just planned and checked (to optimise).
/// One lives on the stack for the length of a call, so its size does not matter.
#[allow(clippy::large_enum_variant)]
enum Statement {
    Kept(Arc<Ready>),
    Checked(Permit),
}

/// An executed statement: the handle to fetch it with, its result schema and size.
#[derive(Debug, Clone)]
pub struct Planned {
    pub handle: String,
    pub schema: SchemaRef,
    pub rows: u64,
}

/// A released result and its audit receipt.
#[derive(Debug)]
pub struct Released {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    pub receipt: Receipt,
}

/// A permitted plan, executed with disclosure control applied.
pub(crate) struct Evaluated {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    pub rows: u64,
    pub groups_withheld: u64,
    pub cells_withheld: u64,
    pub result_hash: String,
    pub plan_hash: String,
}

/// A table as a project sees it, for catalogue browsing.
#[derive(Debug, Clone)]
pub struct TableInfo {
    pub name: String,
    pub schema: SchemaRef,
}

pub struct Core {
    pub clock: SharedClock,
    pub registry: Registry,
    pub engine: Engine,
    pub audit: AuditLog,
    pub rules: Rules,
    /// Stricter disclosure rules for particular datasets.
    pub dataset_rules: std::collections::BTreeMap<String, Overrides>,
    pub limits: LimitsConfig,
    /// Load limits: memory pools, query slots, per-user rates.
    pub limiter: Arc<Limits>,
    pub metrics: Metrics,
    /// Each project's release budget and what it has released ([`crate::budget`]).
    pub budgets: crate::budget::Budgets,
    /// Baselines (`crate::baselines`) computed once and reused across queries.
    pub baselines: crate::baselines::Baselines,
    /// The plans of repeated statements.
    pub plans: Plans,
    /// Each project's session (its catalogue of guarded tables), built once per access, data
    /// snapshot and partition count rather than for every query.
    sessions: Recent<SessionContext>,
    pending: Mutex<HashMap<String, Pending>>,
    prepared: Mutex<HashMap<String, Prepared>>,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

/// What an audit record says about the caller, filled in as the walk learns it; the call's
/// `request` span learns it too.
struct Who {
    user: Option<String>,
    principal: Option<Principal>,
    project: Option<String>,
    span: Span,
    client_tool: Option<String>,
}

impl Default for Who {
    fn default() -> Self {
        Self {
            user: None,
            principal: None,
            project: None,
            span: Span::current(),
            client_tool: None,
        }
    }
}

impl Who {
    /// What the transport already knows about the call.
    fn of(call: &CallContext) -> Self {
        Self {
            client_tool: call.client_tool.clone(),
            ..Default::default()
        }
    }

    fn entry(&self, call: &str) -> Entry {
        let mut entry = Entry {
            call: call.into(),
            ..Default::default()
        };
        self.fill(&mut entry);
        entry
    }

    fn fill(&self, entry: &mut Entry) {
        entry.user = self.user.clone();
        entry.organisation = self.principal.as_ref().map(|p| p.organisation.clone());
        entry.roles = self.principal.as_ref().map(|p| p.roles.clone()).unwrap_or_default();
        entry.project = self.project.clone();
        entry.client_tool = self.client_tool.clone();
    }
}

impl Core {
    pub fn new(
        clock: SharedClock,
        registry: Registry,
        engine: Engine,
        audit: AuditLog,
        disclosure: &crate::config::DisclosureConfig,
        limits: LimitsConfig,
    ) -> Self {
        let budgets = crate::budget::Budgets::new(disclosure.release_budget_cells, audit.released_cells());
        Self {
            clock,
            registry,
            engine,
            audit,
            budgets,
            rules: Rules::from(disclosure),
            dataset_rules: disclosure.datasets.clone(),
            limiter: Arc::new(Limits::new(&limits)),
            metrics: Metrics::disabled(),
            baselines: Default::default(),
            plans: Default::default(),
            sessions: Recent::new(SESSIONS),
            limits,
            pending: Mutex::new(HashMap::new()),
            prepared: Mutex::new(HashMap::new()),
        }
    }

    /// Reports the instruments' figures to `metrics` (the gateway's telemetry).
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        metrics.observe(&self.limiter);
        self.metrics = metrics;
        self
    }

    /// Runs one step of the walk in its own span, timing it.
    fn step<T>(&self, name: &'static str, f: impl FnOnce() -> T) -> T {
        progress::reached(name);
        let started = Instant::now();
        let out = step_span(name).in_scope(f);
        self.metrics.step(name, started.elapsed());
        out
    }

    async fn step_async<T>(&self, name: &'static str, f: impl Future<Output = T>) -> T {
        progress::reached(name);
        let started = Instant::now();
        let out = f.instrument(step_span(name)).await;
        self.metrics.step(name, started.elapsed());
        out
    }

    /// Safe People for any call.
    fn principal(&self, call: &CallContext, who: &mut Who) -> Result<Principal, Error> {
        self.step("authorise", || self.principal_inner(call, who))
    }

    fn principal_inner(&self, call: &CallContext, who: &mut Who) -> Result<Principal, Error> {
        let subject = call.authenticated.clone()?;
        who.user = Some(subject.user.clone());
        who.span.record("user", subject.user.as_str());
        let principal = self.registry.principal(&subject.user, self.clock.today())?;
        who.span.record("organisation", principal.organisation.as_str());
        who.principal = Some(principal.clone());
        Ok(principal)
    }

    /// Safe People and Safe Projects for a data call (granted decisions are remembered by the
    /// registry until it changes).
    fn access(&self, call: &CallContext, who: &mut Who) -> Result<(Principal, ProjectAccess), Error> {
        self.step("authorise", || {
            let Some(project) = call.project.clone() else {
                self.principal_inner(call, who)?;
                return Err(RegistryError::from(Refusal::NoProject).into());
            };
            let subject = call.authenticated.clone()?;
            who.user = Some(subject.user.clone());
            who.span.record("user", subject.user.as_str());
            let (principal, decided) = match self.registry.data_access(&subject.user, &project, self.clock.today()) {
                Ok((principal, access)) => (principal.clone(), Ok((principal, access))),
                Err(refused) => match *refused {
                    (Some(principal), e) => (principal, Err(e)),
                    (None, e) => return Err(e.into()),
                },
            };
            who.span.record("organisation", principal.organisation.as_str());
            who.principal = Some(principal);
            who.span.record("project", project.as_str());
            who.project = Some(project);
            decided.map_err(Into::into)
        })
    }

    /// Safe People for a call that is neither a query nor a change: who is calling, filled in
    /// on `entry` (whose project, if set, is kept).
    pub(crate) fn caller(&self, call: &CallContext, entry: &mut Entry) -> Result<Principal, Error> {
        let mut who = Who::of(call);
        let outcome = self.principal(call, &mut who);
        let project = entry.project.take();
        who.fill(entry);
        entry.project = project.or(entry.project.take());
        outcome
    }

    /// Confirms the caller's identity (handshake, SqlInfo, catalogue listing).
    pub async fn identify(&self, call: &CallContext, call_name: &str) -> Result<Principal, Error> {
        let started = Instant::now();
        let mut who = Who::of(call);
        let outcome = self.principal(call, &mut who);
        Ok(self.record(who.entry(call_name), started, outcome).await?.0)
    }

    /// The project's tables, for metadata calls.
    pub async fn tables(&self, call: &CallContext) -> Result<Vec<TableInfo>, Error> {
        let started = Instant::now();
        let mut who = Who::of(call);
        let outcome = self
            .access(call, &mut who)
            .and_then(|(_, access)| Ok(self.engine.granted_schemas(&access)?))
            .map(|tables| {
                tables
                    .into_iter()
                    .map(|(name, schema)| TableInfo { name, schema })
                    .collect()
            });
        Ok(self.record(who.entry("metadata.tables"), started, outcome).await?.0)
    }

    /// GetFlightInfo: authorise, plan, check, execute and apply disclosure control. The result
    /// waits, bound to this user and project, for its DoGet; nothing is released yet.
    pub async fn plan_query(&self, call: &CallContext, sql: &str) -> Result<Planned, Error> {
        let started = Instant::now();
        let mut who = Who::of(call);
        let mut entry = Entry {
            call: "query.execute".into(),
            ..Default::default()
        };
        entry.sql = Some(sql.chars().take(self.limits.max_sql_bytes).collect());
        let _call = self.limiter.call();
        // If the client goes away, this future is dropped mid-walk: the guard records that.
        let mut cancelled = Cancelled::new(self, &entry, started);
        let outcome = self.execute(call, sql, &mut who, &mut entry, &mut cancelled).await;
        who.fill(&mut entry);
        cancelled.disarm();
        // A result whose record cannot be written is not released: its charge is given back.
        let charged = match (&outcome, &entry.project, entry.cells_released) {
            (Ok(_), Some(project), Some(cells)) => Some((project.clone(), cells)),
            _ => None,
        };
        match self.record(entry, started, outcome).await {
            Ok((planned, _)) => Ok(planned),
            Err(e) => {
                if let Some((project, cells)) = charged {
                    self.budgets.refund(&project, cells);
                }
                Err(e)
            }
        }
    }

    /// Authorises, admits (rate, concurrency) and runs the query under its deadline.
    async fn execute(
        &self,
        call: &CallContext,
        sql: &str,
        who: &mut Who,
        entry: &mut Entry,
        cancelled: &mut Cancelled,
    ) -> Result<Planned, Error> {
        let (principal, access) = self.access(call, who)?;
        cancelled.note(who);
        self.limiter.check_rate(&principal.user)?;
        // On record before anything runs: if the process dies during this query (killed for
        // memory, say), the log still shows what was running, and who sent it.
        let mut received = who.entry("query.received");
        received.sql = entry.sql.clone();
        received.decision = "received".into();
        received.policy_hash = Some(self.registry.rules_hash().to_owned());
        self.step_async("audit", self.audit.append_as(received, Durability::Deferred))
            .await?;
        let deadline = self.limiter.query_timeout();
        let run = async {
            let _slot = self.limiter.admit(&principal.user).await?;
            match tokio::time::timeout(deadline, self.run(principal, access, sql, entry)).await {
                Ok(outcome) => outcome,
                // Dropping the run stops its DataFusion streams and frees their memory.
                Err(_) => Err(LimitError::Deadline(deadline.as_secs()).into()),
            }
        };
        tokio::select! {
            outcome = run => outcome,
            _ = self.limiter.cut() => Err(LimitError::ShuttingDown.into()),
        }
    }

    /// Plans and checks under the strictest of the gateway's, the project's and the datasets'
    /// disclosure rules.
    async fn check(&self, session: &SessionContext, access: &ProjectAccess, sql: &str) -> Result<Permit, Error> {
        let rules = self.rules.tightened(&access.disclosure);
        Ok(policy::plan_and_check_with(
            session,
            sql,
            rules,
            &self.dataset_rules,
            &StatementLimits::from(&self.limits),
        )
        .await?)
    }

    /// DoGet: authorise again, check the ticket belongs to this user and project, write the
    /// release record, and only then hand the result over. Everything the rows are (the SQL,
    /// caller, project, result hash, rows, what was withheld) is in the execution record, made
    /// durable before the FlightInfo went out; this record, repeating it and saying the ticket
    /// was used, is synced with the next fsync (`audit.delivery_sync_ms` at most).
    pub async fn run_query(&self, call: &CallContext, handle: &str) -> Result<Released, Error> {
        let started = Instant::now();
        let mut who = Who::of(call);
        let mut entry = Entry {
            call: "query.release".into(),
            ..Default::default()
        };
        let outcome = self.take(call, handle, &mut who, &mut entry);
        who.fill(&mut entry);
        let (result, receipt) = self.record_as(entry, started, outcome, Durability::Deferred).await?;
        Ok(Released {
            schema: result.schema,
            batches: result.batches,
            receipt,
        })
    }

    fn take(&self, call: &CallContext, handle: &str, who: &mut Who, entry: &mut Entry) -> Result<Computed, Error> {
        let (principal, access) = self.access(call, who)?;
        let mut pending = self.pending.lock().expect("pending lock");
        let ttl = Duration::from_secs(self.limits.statement_ttl_seconds);
        match pending.remove(handle) {
            // A ticket is bound to the user and project that planned it, and used once.
            Some(p) if p.user == principal.user && p.project == access.project && p.created.elapsed() < ttl => {
                *entry = Entry {
                    call: std::mem::take(&mut entry.call),
                    ..p.executed
                };
                Ok(p.result)
            }
            Some(p) if p.created.elapsed() < ttl => {
                pending.insert(handle.to_owned(), p);
                Err(Error::UnknownStatement)
            }
            _ => Err(Error::UnknownStatement),
        }
    }
}

/// A step's span: named by the step in exported telemetry (`otel.name`).
fn step_span(name: &'static str) -> Span {
    tracing::info_span!("step", otel.name = name, step = name)
}

/// Records a query whose handling was dropped half-way (the client went away) as `cancelled`,
/// so that no call goes unaudited. Disarmed once the walk reaches its own audit record.
struct Cancelled {
    audit: AuditLog,
    metrics: Metrics,
    entry: Option<Entry>,
    started: Instant,
}

impl Cancelled {
    fn new(core: &Core, entry: &Entry, started: Instant) -> Self {
        Self {
            audit: core.audit.clone(),
            metrics: core.metrics.clone(),
            entry: Some(entry.clone()),
            started,
        }
    }

    /// What the walk has learnt about the caller so far.
    fn note(&mut self, who: &Who) {
        if let Some(entry) = &mut self.entry {
            who.fill(entry);
        }
    }

    fn disarm(&mut self) {
        self.entry = None;
    }
}

impl Drop for Cancelled {
    fn drop(&mut self) {
        let Some(mut entry) = self.entry.take() else { return };
        entry.decision = "cancelled".into();
        entry.rule = Some("client/cancelled".into());
        entry.duration_ms = Some(self.started.elapsed().as_millis() as u64);
        self.metrics.request(&entry.call, "cancelled", Some("client/cancelled"));
        tracing::info!(call = %entry.call, "cancelled: the client went away");
        self.audit.append_detached(entry);
    }
}

/// The hash of a released result ([`crate::audit::result_hash`]): what a receipt proves was released.
pub fn result_hash(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<String, Error> {
    crate::audit::result_hash(schema, batches).map_err(|e| Error::Internal(e.to_string()))
}
