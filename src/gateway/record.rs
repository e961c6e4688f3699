//! The audit step of every call's walk: its outcome recorded (durably unless it is a result's
//! hand-over), and administrative changes committed only once their record is durable.

use super::*;

impl Core {
    /// Records the outcome of a call, durably; a call whose record cannot be made durable fails.
    pub(crate) async fn record<T>(
        &self,
        entry: Entry,
        started: Instant,
        outcome: Result<T, Error>,
    ) -> Result<(T, Receipt), Error> {
        self.record_as(entry, started, outcome, Durability::Now).await
    }

    /// Records the outcome of a call; an accepted one as `durability` says, anything else
    /// durably. A call whose record cannot be written fails.
    pub(crate) async fn record_as<T>(
        &self,
        mut entry: Entry,
        started: Instant,
        outcome: Result<T, Error>,
        durability: Durability,
    ) -> Result<(T, Receipt), Error> {
        entry.duration_ms = Some(started.elapsed().as_millis() as u64);
        entry.policy_hash = Some(self.registry.rules_hash().to_owned());
        let request = Span::current();
        request.record("call", entry.call.as_str());
        match &outcome {
            Ok(_) => entry.decision = "accepted".into(),
            Err(e) => {
                entry.decision = if e.is_refusal() { "refused" } else { "failed" }.into();
                entry.rule = Some(e.rule());
                if e.is_refusal() {
                    tracing::info!(call = %entry.call, rule = %e.rule(), "refused");
                } else {
                    tracing::error!(call = %entry.call, error = %e, "call failed");
                }
            }
        }
        request.record("outcome", entry.decision.as_str());
        if let Some(rule) = &entry.rule {
            request.record("rule", rule.as_str());
        }
        self.metrics.request(
            &entry.call,
            &entry.decision,
            outcome.as_ref().err().map(|e| e.rule()).as_deref(),
        );
        let durability = if outcome.is_ok() { durability } else { Durability::Now };
        let receipt = self
            .step_async("audit", self.audit.append_as(entry, durability))
            .await?;
        outcome.map(|t| (t, receipt))
    }

    /// An administrative call (AdminService): Safe People, then the rules for `action` judged
    /// inside the change's transaction, then the change, its audit record (naming who made it and
    /// what they asked for) made durable, and only then the commit. A change whose record cannot
    /// be written is rolled back.
    pub async fn admin<T>(
        &self,
        call: &CallContext,
        name: &str,
        detail: &impl serde::Serialize,
        action: Action,
        project: Option<&str>,
        change: impl FnOnce(&rusqlite::Connection, &Principal, chrono::NaiveDate) -> Result<T, RegistryError>,
    ) -> Result<T, Error> {
        self.change(call, &format!("admin.{name}"), detail, action, project, change)
            .await
    }

    /// A change to the registry recorded as call `call_name`, made as [`Core::admin`] makes one
    /// (output checking's requests and reviews are changes too).
    pub(crate) async fn change<T>(
        &self,
        call: &CallContext,
        call_name: &str,
        detail: &impl serde::Serialize,
        action: Action,
        project: Option<&str>,
        change: impl FnOnce(&rusqlite::Connection, &Principal, chrono::NaiveDate) -> Result<T, RegistryError>,
    ) -> Result<T, Error> {
        let started = Instant::now();
        let mut who = Who::of(call);
        let mut entry = who.entry(call_name);
        entry.detail = serde_json::to_string(detail).ok();
        let principal = match self.principal(call, &mut who) {
            Ok(p) => p,
            Err(e) => {
                who.fill(&mut entry);
                return Ok(self.record(entry, started, Err::<T, _>(e)).await?.0);
            }
        };
        who.fill(&mut entry);
        entry.project = project.map(str::to_owned);
        let today = self.clock.today();
        let tx = self.registry.begin().await?;
        let outcome = tx
            .authorise(&principal, action, project, today)
            .and_then(|()| change(tx.conn(), &principal, today));
        match outcome {
            Ok(value) => {
                self.record(entry, started, Ok(())).await?;
                tx.commit()?;
                Ok(value)
            }
            Err(e) => {
                drop(tx);
                Ok(self.record(entry, started, Err::<T, _>(e.into())).await?.0)
            }
        }
    }
}
