//! Prepared statements (what ADBC, JDBC and DBeaver send): the SQL kept per user and project
//! with its parameters, planned and checked at preparation and again, whole and with the
//! values bound, at each execution ([`crate::policy::statement`]'s `bind`).

use super::*;

impl Core {
    /// CreatePreparedStatement: authorise, plan and check (so a refused query is refused here),
    /// and remember the SQL; returns a handle and the result schema.
    pub async fn prepare(&self, call: &CallContext, sql: &str) -> Result<(String, SchemaRef, usize), Error> {
        let started = Instant::now();
        let mut who = Who::of(call);
        let outcome = self.prepare_inner(call, sql, &mut who).await;
        let mut entry = who.entry("query.prepare");
        entry.sql = Some(sql.chars().take(self.limits.max_sql_bytes).collect());
        Ok(self.record(entry, started, outcome).await?.0)
    }

    async fn prepare_inner(
        &self,
        call: &CallContext,
        sql: &str,
        who: &mut Who,
    ) -> Result<(String, SchemaRef, usize), Error> {
        let (principal, access) = self.access(call, who)?;
        let session = self.engine.session(&access)?;
        // A statement with parameters is checked here with each bound to NULL (so what the SQL
        // itself asks is refused now), and checked again, whole, with the values bound.
        let limits = StatementLimits::from(&self.limits);
        let parameters = policy::statement::parameters(sql, &limits)?;
        let nulls = vec![datafusion::common::ScalarValue::Null; parameters];
        let checked = match parameters {
            0 => sql.to_owned(),
            _ => policy::statement::bind(sql, &nulls, &limits)?,
        };
        let permit = self.check(&session, &access, &checked).await?;
        let schema: SchemaRef = Arc::new(permit.plan().schema().as_arrow().clone());
        let handle = uuid::Uuid::new_v4().to_string();
        let ttl = Duration::from_secs(self.limits.statement_ttl_seconds.max(3600));
        let mut prepared = self.prepared.lock().expect("prepared lock");
        prepared.retain(|_, p| p.created.elapsed() < ttl);
        prepared.insert(
            handle.clone(),
            Prepared {
                user: principal.user,
                project: access.project,
                sql: sql.to_owned(),
                parameters,
                bound: None,
                created: Instant::now(),
            },
        );
        Ok((handle, schema, parameters))
    }

    /// DoPut of a prepared statement's parameters: keeps `values` for the caller's statement
    /// `handle`, to be bound at its next execution (and checked then, bound).
    pub async fn bind_prepared(
        &self,
        call: &CallContext,
        handle: &str,
        values: Vec<datafusion::common::ScalarValue>,
    ) -> Result<(), Error> {
        let started = Instant::now();
        let mut who = Who::of(call);
        let count = values.len();
        let outcome = self.access(call, &mut who).and_then(|(principal, access)| {
            let mut prepared = self.prepared.lock().expect("prepared lock");
            let p = prepared
                .get_mut(handle)
                .filter(|p| p.user == principal.user && p.project == access.project)
                .ok_or(Error::UnknownStatement)?;
            if count != p.parameters {
                return Err(policy::PolicyError::Sql(format!(
                    "the statement takes {} parameters; {count} were bound",
                    p.parameters
                ))
                .into());
            }
            p.bound = Some(values);
            Ok(())
        });
        let mut entry = who.entry("query.bind");
        entry.detail = Some(format!("{{\"parameters\":{count}}}"));
        self.record(entry, started, outcome).await?;
        Ok(())
    }

    /// Executes a prepared statement (as [`Core::plan_query`]) for the user who prepared it.
    pub async fn execute_prepared(&self, call: &CallContext, handle: &str) -> Result<Planned, Error> {
        let owner = call.authenticated.as_ref().ok().map(|s| s.user.clone());
        let sql = {
            let prepared = self.prepared.lock().expect("prepared lock");
            prepared
                .get(handle)
                .filter(|p| Some(&p.user) == owner.as_ref() && Some(&p.project) == call.project.as_ref())
                .map(|p| match (p.parameters, &p.bound) {
                    (0, _) => Ok(p.sql.clone()),
                    (_, Some(values)) => policy::statement::bind(&p.sql, values, &StatementLimits::from(&self.limits)),
                    (n, None) => Err(policy::PolicyError::Sql(format!(
                        "the statement takes {n} parameters: bind them before executing it"
                    ))),
                })
        };
        match sql {
            Some(Ok(sql)) => self.plan_query(call, &sql).await,
            Some(Err(e)) => {
                let started = Instant::now();
                let mut who = Who::of(call);
                let outcome = self.access(call, &mut who).and(Err::<Planned, _>(e.into()));
                Ok(self.record(who.entry("query.execute"), started, outcome).await?.0)
            }
            // Unknown, or not this caller's: authenticate and audit the call all the same.
            None => {
                let started = Instant::now();
                let mut who = Who::of(call);
                let outcome = self
                    .access(call, &mut who)
                    .and(Err::<Planned, _>(Error::UnknownStatement));
                Ok(self.record(who.entry("query.execute"), started, outcome).await?.0)
            }
        }
    }

    /// Forgets a prepared statement of this caller.
    pub fn close_prepared(&self, call: &CallContext, handle: &str) {
        let owner = call.authenticated.as_ref().ok().map(|s| s.user.clone());
        let mut prepared = self.prepared.lock().expect("prepared lock");
        if prepared.get(handle).is_some_and(|p| Some(&p.user) == owner.as_ref()) {
            prepared.remove(handle);
        }
    }
}
