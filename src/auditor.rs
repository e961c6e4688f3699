//! The auditor's side of [`Core`]: reading the audit log, its checkpoints and proofs, and
//! replaying released queries. Every call needs the `auditor` role and is itself written to the
//! log before anything is returned, so reading the log leaves a trace in it.

use std::collections::BTreeMap;
use std::time::Instant;

use chrono::{DateTime, FixedOffset};
use datafusion::prelude::SessionContext;

use crate::audit::{Checkpoint, Entry, Receipt, Record};
use crate::disclosure::Rules;
use crate::error::Error;
use crate::gateway::{CallContext, Core, Evaluated};
use crate::policy;
use crate::registry::{Principal, Refusal, RegistryError};

/// The role every audit call needs.
pub const AUDITOR: &str = "auditor";
/// Most records one list call returns.
pub const MAX_RECORDS: usize = 10_000;

/// Which records to list: every field given must match.
#[derive(Debug, Clone, Default)]
pub struct RecordFilter {
    pub user: Option<String>,
    pub organisation: Option<String>,
    pub project: Option<String>,
    pub decision: Option<String>,
    /// RFC 3339 bounds on the record's time, inclusive.
    pub from: Option<String>,
    pub to: Option<String>,
    /// First sequence number to consider.
    pub from_seq: u64,
    pub limit: usize,
}

fn time(field: &str, value: &Option<String>) -> Result<Option<DateTime<FixedOffset>>, Error> {
    value
        .as_deref()
        .map(|v| {
            DateTime::parse_from_rfc3339(v).map_err(|_| {
                Error::Replay(format!(
                    "audit/bad-filter: {field} must be an RFC 3339 time such as 2026-11-24T09:00:00Z"
                ))
            })
        })
        .transpose()
}

impl RecordFilter {
    fn describe(&self) -> String {
        format!(
            "list records from {} (user {:?}, organisation {:?}, project {:?}, decision {:?}, from {:?}, to {:?})",
            self.from_seq, self.user, self.organisation, self.project, self.decision, self.from, self.to
        )
    }
}

/// What a replay found.
#[derive(Debug, Clone)]
pub struct Replayed {
    pub seq: u64,
    pub recorded_hash: String,
    pub replayed_hash: String,
    /// The replayed result has the recorded hash.
    pub confirmed: bool,
    /// The optimised plan is the one recorded (it can differ if the project's grants or cohort
    /// changed since).
    pub plan_matches: bool,
    /// The replay's own audit record.
    pub receipt: Receipt,
}

fn refuse(message: String) -> Error {
    Error::Replay(message)
}

impl Core {
    /// Computes a recorded query again, on the data it ran on: checks that every dataset of
    /// `snapshot` still has its recorded content hash (refusing, under `rule`-data-changed, if
    /// not), then plans, checks and executes `sql` as `project` under `rules` (the recorded
    /// rules, which already include every tightening that applied at the time). `what` names
    /// the record in refusals. Replays and reviewed releases ([`crate::review`]) both use it.
    pub(crate) async fn recompute(
        &self,
        project: &str,
        sql: &str,
        rules: Rules,
        snapshot: &BTreeMap<String, String>,
        what: &str,
        rule: &str,
    ) -> Result<(SessionContext, policy::Permit, Evaluated), Error> {
        // The project's grants as they are now: a dataset whose granted version changed has
        // changed for the recomputation too.
        let access = self.registry.project_data(project)?;
        for (dataset, hash) in snapshot {
            match self.engine.fingerprint_now(&access, dataset) {
                Some(now) if &now == hash => {}
                Some(now) => {
                    return Err(refuse(format!(
                        "{rule}-data-changed: dataset {dataset} has changed since {what} was written (then {hash}, now {now}); the query cannot be computed again on the data it ran on"
                    )));
                }
                None => {
                    return Err(refuse(format!(
                        "{rule}-data-changed: dataset {dataset}, read by {what}, is no longer served"
                    )));
                }
            }
        }
        let session = self.engine.session(&access)?;
        let permit = policy::plan_and_check_with(
            &session,
            sql,
            rules,
            &BTreeMap::new(),
            &policy::StatementLimits::from(&self.limits),
        )
        .await?;
        let evaluated = self.evaluate(&session, &permit).await?;
        Ok((session, permit, evaluated))
    }

    /// Safe People for an auditor, filling in who they are on `entry`.
    fn auditor(&self, call: &CallContext, entry: &mut Entry) -> Result<Principal, Error> {
        let subject = call.authenticated.clone()?;
        entry.user = Some(subject.user.clone());
        let principal = self.registry.principal(&subject.user, self.clock.today())?;
        entry.organisation = Some(principal.organisation.clone());
        entry.roles = principal.roles.clone();
        if !principal.has_role(AUDITOR) {
            return Err(RegistryError::from(Refusal::MissingRole(AUDITOR)).into());
        }
        Ok(principal)
    }

    /// Authorises and records an audit read (described by `detail`) before it is served.
    async fn audit_read(&self, call: &CallContext, name: &str, detail: String) -> Result<Receipt, Error> {
        let started = Instant::now();
        let mut entry = Entry {
            call: name.into(),
            rule: Some(detail),
            ..Default::default()
        };
        let outcome = self.auditor(call, &mut entry);
        Ok(self.record(entry, started, outcome).await?.1)
    }

    /// Records matching `filter`, oldest first.
    pub async fn audit_records(&self, call: &CallContext, filter: &RecordFilter) -> Result<Vec<Record>, Error> {
        let (from, to) = (time("from", &filter.from)?, time("to", &filter.to)?);
        self.audit_read(call, "audit.list", filter.describe()).await?;
        let limit = if filter.limit == 0 {
            MAX_RECORDS
        } else {
            filter.limit.min(MAX_RECORDS)
        };
        let matches = |want: &Option<String>, have: &Option<String>| want.is_none() || want == have;
        let keep = |r: &Record| {
            let at = DateTime::parse_from_rfc3339(&r.time).ok();
            matches(&filter.user, &r.entry.user)
                && matches(&filter.organisation, &r.entry.organisation)
                && matches(&filter.project, &r.entry.project)
                && filter.decision.as_ref().is_none_or(|d| *d == r.entry.decision)
                && from.is_none_or(|f| at.is_some_and(|t| t >= f))
                && to.is_none_or(|u| at.is_some_and(|t| t <= u))
        };
        Ok(self.audit.read(filter.from_seq, limit, keep)?)
    }

    /// The latest signed checkpoint.
    pub async fn audit_checkpoint(&self, call: &CallContext) -> Result<Option<Checkpoint>, Error> {
        self.audit_read(call, "audit.checkpoint", "latest checkpoint".into())
            .await?;
        Ok(self.audit.latest_checkpoint())
    }

    /// Record `seq` and its inclusion proof in the tree of `size` records (0: the latest
    /// checkpoint's size), with the checkpoint of that size if one was signed.
    pub async fn audit_inclusion(
        &self,
        call: &CallContext,
        seq: u64,
        size: u64,
    ) -> Result<(Record, u64, Vec<String>, Option<Checkpoint>), Error> {
        self.audit_read(
            call,
            "audit.inclusion",
            format!("inclusion proof of record {seq} in tree size {size}"),
        )
        .await?;
        let size = match size {
            0 => self.audit.latest_checkpoint().map_or(0, |c| c.size),
            n => n,
        };
        let proof = self.audit.inclusion_proof(seq, size).ok_or_else(|| {
            refuse(format!(
                "audit/bad-proof-request: record {seq} is not in a tree of {size} records (the log has {})",
                self.audit.len()
            ))
        })?;
        let record = self
            .audit
            .record(seq)?
            .ok_or_else(|| refuse(format!("audit/bad-proof-request: there is no record {seq}")))?;
        Ok((record, size, proof, self.audit.checkpoint_of(size)))
    }

    /// A consistency proof between the trees of `old` and `new` records.
    pub async fn audit_consistency(&self, call: &CallContext, old: u64, new: u64) -> Result<Vec<String>, Error> {
        self.audit_read(
            call,
            "audit.consistency",
            format!("consistency proof from {old} to {new}"),
        )
        .await?;
        self.audit.consistency_proof(old, new).ok_or_else(|| {
            refuse(format!(
                "audit/bad-proof-request: need 0 < old <= new <= {} (got {old} and {new})",
                self.audit.len()
            ))
        })
    }

    /// Re-runs the released query of record `seq`: checks that every dataset it read still has
    /// the recorded content hash (refusing if not), re-executes the SQL as the recorded project
    /// under the recorded disclosure rules, and compares result hashes. The replay is recorded
    /// with its outcome before it is returned.
    pub async fn replay(&self, call: &CallContext, seq: u64) -> Result<Replayed, Error> {
        let started = Instant::now();
        let mut entry = Entry {
            call: "audit.replay".into(),
            ..Default::default()
        };
        let outcome = match self.auditor(call, &mut entry) {
            Ok(_) => self.replay_inner(seq, &mut entry).await,
            Err(e) => Err(e),
        };
        let (replayed, receipt) = self.record(entry, started, outcome).await?;
        Ok(Replayed { receipt, ..replayed })
    }

    async fn replay_inner(&self, seq: u64, entry: &mut Entry) -> Result<Replayed, Error> {
        entry.rule = Some(format!("replay of record {seq}"));
        let record = self
            .audit
            .record(seq)?
            .ok_or_else(|| refuse(format!("audit/replay-unknown: there is no record {seq} in the log")))?;
        let e = record.entry;
        // An execution record describes its result as fully as the release that repeats it (and
        // is the durable one should a power cut take the release's record).
        if !matches!(e.call.as_str(), "query.release" | "query.execute" | "release.publish") || e.decision != "accepted"
        {
            return Err(refuse(format!(
                "audit/replay-not-a-release: record {seq} is {} ({}), not an executed or released query; replay a query.execute or query.release record",
                e.call, e.decision
            )));
        }
        let (Some(sql), Some(project), Some(rules), Some(recorded)) = (&e.sql, &e.project, &e.rule, &e.result_hash)
        else {
            return Err(refuse(format!(
                "audit/replay-incomplete: record {seq} lacks its SQL, project, rules or result hash"
            )));
        };
        if e.snapshot.is_empty() {
            return Err(refuse(format!(
                "audit/replay-no-snapshot: record {seq} names no data snapshot, so the data cannot be shown to be the same"
            )));
        }
        let rules: Rules = serde_json::from_str(rules).map_err(|_| {
            refuse(format!(
                "audit/replay-incomplete: the rules of record {seq} cannot be read"
            ))
        })?;
        entry.project = Some(project.clone());
        entry.sql = Some(sql.clone());
        entry.snapshot = e.snapshot.clone();
        let (_, _, evaluated) = self
            .recompute(
                project,
                sql,
                rules,
                &e.snapshot,
                &format!("record {seq}"),
                "audit/replay",
            )
            .await?;
        let confirmed = &evaluated.result_hash == recorded;
        entry.result_hash = Some(evaluated.result_hash.clone());
        entry.plan_hash = Some(evaluated.plan_hash.clone());
        entry.rule = Some(format!(
            "replay of record {seq}: {}",
            if confirmed {
                "confirmed, same result hash"
            } else {
                "MISMATCH: the result hash differs"
            }
        ));
        Ok(Replayed {
            seq,
            recorded_hash: recorded.clone(),
            replayed_hash: evaluated.result_hash,
            confirmed,
            plan_matches: e.plan_hash.as_ref() == Some(&evaluated.plan_hash),
            receipt: Receipt {
                seq: 0,
                hash: String::new(),
            },
        })
    }
}
