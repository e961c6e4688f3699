//! Output checking: the path for what the rules cannot clear. A researcher asks for the
//! release of a result whose cells were withheld, naming it by its receipt; output checkers
//! (role `output-checker`, never members of the project — the rules say so) review it with
//! every cell's true value beside what the author saw; after two different checkers approve,
//! the author fetches the release.
//!
//! A release is the recorded query computed again on its pinned data ([`Core::recompute`])
//! under the recorded rules with one change: groups and cells are withheld below
//! [`RELEASE_FLOOR`] people instead of the threshold (`Rules::release_floor`). Everything else
//! — perturbation, rounding, flattening, low-effect conditions — is as it was, so a released
//! cell the author already had is unchanged. The release's audit record (`release.publish`)
//! carries those rules, so `audit replay` reproduces it byte for byte; its cells are charged to
//! the project's release budget.
//!
//! Who may do what is for the rules (`review` for checkers, `query` for authors, who must still
//! be live members of the project); the states are kept by [`crate::registry::releases`]. Every
//! call is recorded before its reply. A board member's queue also lists the changes to approved
//! projects that wait for their signature ([`crate::registry::changes`]).

mod people;
mod view;

use std::time::Instant;

use datafusion::arrow::record_batch::RecordBatch;
use serde::Serialize;

use crate::audit::{Durability, Entry};
use crate::disclosure::Rules;
use crate::error::Error;
use crate::gateway::{CallContext, Core, Released};
use crate::registry::changes::{self, PendingChange};
use crate::registry::releases::{self, NewRelease, RELEASED, Release};
use crate::registry::rules::Action;
use crate::registry::{BOARD_ROLES, Principal, Refusal, RegistryError};
pub use view::{CellView, ReviewView, RowView};

/// What waits for one reviewer: release requests, and changes to sign in a board role.
#[derive(Debug, Default)]
pub struct Queue {
    pub releases: Vec<Release>,
    pub changes: Vec<(String, PendingChange, &'static str)>,
}

/// Taken while a request is published, so that one is published (and charged) once.
static PUBLISHING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The role that reviews outputs.
pub const OUTPUT_CHECKER: &str = "output-checker";

/// In a reviewed release, a group or cell is withheld only if nobody is behind it.
pub const RELEASE_FLOOR: u64 = 1;

fn not_yours(receipt: u64) -> Error {
    // The same for a record that does not exist, is not a result or is someone else's: nobody
    // learns what another user's receipt holds.
    RegistryError::from(Refusal::NotFound(format!(
        "no result of yours has receipt {receipt}; name a result by the x-sde-audit-seq of its DoGet"
    )))
    .into()
}

/// A release as computed for its author: the request, the result and the result's hash.
type Published = (
    Release,
    datafusion::arrow::datatypes::SchemaRef,
    Vec<RecordBatch>,
    String,
);

fn now(core: &Core) -> String {
    core.clock.now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

impl Core {
    /// What a release request for `receipt` would record: the result must be `principal`'s, and
    /// something must have been withheld from it.
    fn result_of(&self, principal: &Principal, receipt: u64, justification: &str) -> Result<NewRelease, Error> {
        let record = self.audit.record(receipt)?.ok_or_else(|| not_yours(receipt))?;
        let e = record.entry;
        let is_result = matches!(e.call.as_str(), "query.release" | "query.execute") && e.decision == "accepted";
        if !is_result || e.user.as_deref() != Some(principal.user.as_str()) {
            return Err(not_yours(receipt));
        }
        let (Some(project), Some(sql), Some(rules), Some(hash)) = (e.project, e.sql, e.rule, e.result_hash) else {
            return Err(not_yours(receipt));
        };
        if e.groups_withheld.unwrap_or(0) + e.cells_withheld.unwrap_or(0) == 0 {
            return Err(RegistryError::from(Refusal::InvalidChange(format!(
                "nothing was withheld from result {receipt}: it was released in full, so there is nothing to review"
            )))
            .into());
        }
        Ok(NewRelease {
            project,
            author: principal.user.clone(),
            receipt,
            sql,
            rules,
            snapshot: e.snapshot,
            result_hash: hash,
            justification: justification.to_owned(),
        })
    }

    /// A researcher asks for the release of their result `receipt`.
    pub async fn request_release(
        &self,
        call: &CallContext,
        receipt: u64,
        justification: &str,
    ) -> Result<Release, Error> {
        #[derive(Serialize)]
        struct Asked<'a> {
            receipt: u64,
            justification: &'a str,
        }
        let detail = Asked { receipt, justification };
        let started = Instant::now();
        let mut entry = Entry {
            call: "release.request".into(),
            detail: serde_json::to_string(&detail).ok(),
            ..Default::default()
        };
        let new = self
            .caller(call, &mut entry)
            .and_then(|principal| self.result_of(&principal, receipt, justification));
        let new = match new {
            Ok(new) => new,
            Err(e) => return Ok(self.record(entry, started, Err::<Release, _>(e)).await?.0),
        };
        let at = now(self);
        self.change(
            call,
            "release.request",
            &detail,
            Action::Query,
            Some(&new.project.clone()),
            |conn, _, _| releases::create(conn, &new, &at),
        )
        .await
    }

    /// A call about one request, recorded as `name`: Safe People, then `f` with the caller.
    async fn about<T>(
        &self,
        call: &CallContext,
        name: &str,
        id: u64,
        f: impl AsyncFnOnce(Principal, &mut Entry) -> Result<T, Error>,
    ) -> Result<T, Error> {
        let started = Instant::now();
        let mut entry = Entry {
            call: name.into(),
            detail: Some(format!("{{\"id\":{id}}}")),
            ..Default::default()
        };
        let outcome = match self.caller(call, &mut entry) {
            Ok(principal) => f(principal, &mut entry).await,
            Err(e) => Err(e),
        };
        Ok(self.record(entry, started, outcome).await?.0)
    }

    /// The caller's own requests (`queue` false), or what waits for their review (`queue`
    /// true): the requests an output checker may review now, and the changes a board member
    /// may sign in a role they hold and have not signed in.
    pub async fn releases(&self, call: &CallContext, queue: bool) -> Result<Queue, Error> {
        let name = if queue { "review.list" } else { "release.list" };
        self.about(call, name, 0, async |principal, _| {
            if !queue {
                let releases = self.registry.with_conn(|c| releases::by_author(c, &principal.user))?;
                return Ok(Queue {
                    releases,
                    changes: vec![],
                });
            }
            let roles: Vec<&'static str> = BOARD_ROLES.into_iter().filter(|r| principal.has_role(r)).collect();
            if !principal.has_role(OUTPUT_CHECKER) && roles.is_empty() {
                return Err(RegistryError::from(Refusal::MissingRole(OUTPUT_CHECKER)).into());
            }
            let today = self.clock.today();
            let may = |action, project: &str| self.registry.authorise_on(&principal, action, project, today).is_ok();
            let mut queue = Queue::default();
            if principal.has_role(OUTPUT_CHECKER) {
                let waiting = self.registry.with_conn(|c| releases::queue(c, &principal.user))?;
                queue.releases = waiting
                    .into_iter()
                    .filter(|r| may(Action::Review, &r.request.project))
                    .collect();
            }
            for (project, change) in self.registry.with_conn(|c| changes::all_pending(c))? {
                for role in &roles {
                    let signed = change.signatures.iter().any(|s| s.role == *role);
                    if !signed && may(Action::SignChange(role), &project) {
                        queue.changes.push((project.clone(), change.clone(), role));
                    }
                }
            }
            Ok(queue)
        })
        .await
    }

    /// Request `id`, for its author, or for an output checker who may review it.
    pub async fn release(&self, call: &CallContext, id: u64) -> Result<Release, Error> {
        self.about(call, "release.status", id, async |principal, entry| {
            let release = self.registry.with_conn(|c| releases::get(c, id));
            match release {
                Ok(r) if r.request.author == principal.user => {
                    entry.project = Some(r.request.project.clone());
                    Ok(r)
                }
                Ok(r) if principal.has_role(OUTPUT_CHECKER) => {
                    self.registry
                        .authorise_on(&principal, Action::Review, &r.request.project, self.clock.today())?;
                    entry.project = Some(r.request.project.clone());
                    Ok(r)
                }
                _ => Err(RegistryError::from(Refusal::NotFound(format!("no release request {id} of yours"))).into()),
            }
        })
        .await
    }

    /// The project of the caller's own request `id`, before a change to it is authorised (so a
    /// request of someone else's is not found, whoever asks, and its project is not named).
    async fn own_request(&self, call: &CallContext, name: &str, id: u64) -> Result<String, Error> {
        let started = Instant::now();
        let mut entry = Entry {
            call: name.into(),
            detail: Some(format!("{{\"id\":{id}}}")),
            ..Default::default()
        };
        let outcome = self.caller(call, &mut entry).and_then(|principal| {
            Ok(self
                .registry
                .with_conn(|c| releases::of_author(c, id, &principal.user))?
                .request
                .project)
        });
        match outcome {
            Ok(project) => Ok(project),
            Err(e) => Ok(self.record(entry, started, Err::<String, _>(e)).await?.0),
        }
    }

    /// The author withdraws request `id`.
    pub async fn withdraw_release(&self, call: &CallContext, id: u64) -> Result<Release, Error> {
        let project = self.own_request(call, "release.withdraw", id).await?;
        let at = now(self);
        self.change(
            call,
            "release.withdraw",
            &serde_json::json!({ "id": id }),
            Action::Query,
            Some(&project),
            |conn, principal, _| releases::withdraw(conn, id, &principal.user, &at),
        )
        .await
    }

    /// The author resubmits returned request `id`.
    pub async fn resubmit_release(&self, call: &CallContext, id: u64, justification: &str) -> Result<Release, Error> {
        let project = self.own_request(call, "release.resubmit", id).await?;
        let at = now(self);
        self.change(
            call,
            "release.resubmit",
            &serde_json::json!({ "id": id, "justification": justification }),
            Action::Query,
            Some(&project),
            |conn, principal, _| releases::resubmit(conn, id, &principal.user, justification, &at),
        )
        .await
    }

    /// An output checker's decision on request `id`.
    pub async fn decide_review(
        &self,
        call: &CallContext,
        id: u64,
        decision: &str,
        comment: &str,
    ) -> Result<Release, Error> {
        let project = self.project_of_request(id)?;
        let at = now(self);
        self.change(
            call,
            "review.decide",
            &serde_json::json!({ "id": id, "decision": decision, "comment": comment }),
            Action::Review,
            Some(&project),
            |conn, principal, _| releases::review(conn, id, &principal.user, decision, comment, &at),
        )
        .await
    }

    fn project_of_request(&self, id: u64) -> Result<String, Error> {
        Ok(self.registry.with_conn(|c| releases::project_of(c, id))?)
    }

    /// The rules of a request's release: the recorded ones with the release floor.
    fn release_rules(release: &Release) -> Result<(Rules, Rules), Error> {
        let recorded: Rules = serde_json::from_str(&release.request.rules)
            .map_err(|_| Error::Internal(format!("the rules of release request {} cannot be read", release.id)))?;
        Ok((
            recorded,
            Rules {
                release_floor: RELEASE_FLOOR,
                ..recorded
            },
        ))
    }

    /// Request `id` as an output checker reviews it: every cell's true value, what the release
    /// would carry and what the author saw, with the rule outcome.
    pub async fn show_review(&self, call: &CallContext, id: u64) -> Result<(Release, ReviewView), Error> {
        self.about(call, "review.show", id, async |principal, entry| {
            let release = self.registry.with_conn(|c| releases::get(c, id))?;
            let r = &release.request;
            entry.project = Some(r.project.clone());
            self.registry
                .authorise_on(&principal, Action::Review, &r.project, self.clock.today())?;
            entry.sql = Some(r.sql.clone());
            entry.snapshot = r.snapshot.clone();
            let (recorded, floor) = Self::release_rules(&release)?;
            let what = format!("release request {id}");
            let rule = "safe-outputs/release";
            let (_, _, author) = self
                .recompute(&r.project, &r.sql, recorded, &r.snapshot, &what, rule)
                .await?;
            let (session, permit, proposed) = self
                .recompute(&r.project, &r.sql, floor, &r.snapshot, &what, rule)
                .await?;
            // The true values: the same SQL on the same guarded tables (opt-outs and cohort
            // removed beneath the scans), without disclosure control. Shown to checkers only.
            let truth: Vec<RecordBatch> = session
                .sql(&r.sql)
                .await
                .map_err(|e| Error::Internal(format!("true values of release request {id}: {e}")))?
                .collect()
                .await
                .map_err(|e| Error::Internal(format!("true values of release request {id}: {e}")))?;
            let people = people::per_group(&session, &r.sql).await?;
            let view = view::compare(
                permit.checked_columns(),
                recorded.threshold,
                &author.batches,
                &proposed.batches,
                &truth,
                people,
            )?;
            entry.rule = Some(format!(
                "review of release request {id}: {} rows shown, {} cells and {} groups withheld from the author",
                view.rows.len(),
                author.cells_withheld,
                author.groups_withheld
            ));
            Ok((release, view))
        })
        .await
    }

    /// The author fetches reviewed request `id`. The first fetch releases it: computed again
    /// with the release floor, charged to the release budget, recorded (`release.publish`,
    /// synced) before the rows leave, then marked released. Later fetches compute it again and
    /// hand over the same result (its hash checked against the release's).
    pub async fn fetch_release(&self, call: &CallContext, id: u64) -> Result<(Release, Released), Error> {
        let started = Instant::now();
        let mut entry = Entry {
            call: "release.fetch".into(),
            detail: Some(format!("{{\"id\":{id}}}")),
            ..Default::default()
        };
        let principal = match self.caller(call, &mut entry) {
            Ok(p) => p,
            Err(e) => return Ok(self.record(entry, started, Err::<(Release, Released), _>(e)).await?.0),
        };
        // Held until the release is marked, so a request is published once.
        let _publishing = PUBLISHING.lock().await;
        let outcome = self.publish(&principal, id, &mut entry).await;
        let first = matches!(&outcome, Ok((r, ..)) if r.state != RELEASED);
        if first {
            entry.call = "release.publish".into();
        }
        let durability = if first { Durability::Now } else { Durability::Deferred };
        let ((release, schema, batches, hash), receipt) = self.record_as(entry, started, outcome, durability).await?;
        let release = match first {
            true => {
                let tx = self.registry.begin().await?;
                let marked = releases::mark_released(tx.conn(), id, receipt.seq, &hash, &now(self))?;
                tx.commit()?;
                marked
            }
            false => release,
        };
        Ok((
            release,
            Released {
                schema,
                batches,
                receipt,
            },
        ))
    }

    async fn publish(&self, principal: &Principal, id: u64, entry: &mut Entry) -> Result<Published, Error> {
        let release = self
            .registry
            .with_conn(|c| releases::releasable(c, id, &principal.user))?;
        let r = &release.request;
        entry.project = Some(r.project.clone());
        // The author must still be a live member of a live project.
        let access = self
            .registry
            .project_access(principal, &r.project, self.clock.today())?;
        let (_, floor) = Self::release_rules(&release)?;
        let (_, permit, evaluated) = self
            .recompute(
                &r.project,
                &r.sql,
                floor,
                &r.snapshot,
                &format!("release request {id}"),
                "safe-outputs/release",
            )
            .await?;
        entry.sql = Some(r.sql.clone());
        entry.snapshot = r.snapshot.clone();
        entry.rule = Some(serde_json::to_string(&floor).expect("rules serialise"));
        entry.result_hash = Some(evaluated.result_hash.clone());
        entry.plan_hash = Some(evaluated.plan_hash.clone());
        entry.rows = Some(evaluated.rows);
        entry.groups_withheld = Some(evaluated.groups_withheld);
        entry.cells_withheld = Some(evaluated.cells_withheld);
        let hash = evaluated.result_hash.clone();
        let evaluated = match &release.released {
            None => self.charge(principal, &access, &permit, evaluated, entry)?,
            Some((_, hash)) if *hash == evaluated.result_hash => evaluated,
            Some(_) => {
                return Err(Error::Replay(format!(
                    "safe-outputs/release-changed: release request {id} no longer computes to the result that was released"
                )));
            }
        };
        Ok((release, evaluated.schema, evaluated.batches, hash))
    }
}
