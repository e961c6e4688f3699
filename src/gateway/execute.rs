//! The execute step of a call's walk: a checked plan run in the project's session (its own
//! memory pool and partitions), from a kept physical plan where one is free, the plan telling
//! people from rows first where there is one, then shaped into what is released and kept for
//! the next run of the same statement. Authorisation, admission and audit stay with the walk
//! ([`super`]); this module never writes an audit record.

use super::*;

impl Core {
    /// Plan, check, execute (in the query's own memory pool) and apply disclosure control. A
    /// statement the project sent before under the same grants, rules and data is not planned
    /// and checked again: its kept plan runs ([`crate::plans`]).
    pub(super) async fn run(
        &self,
        principal: Principal,
        access: ProjectAccess,
        sql: &str,
        entry: &mut Entry,
    ) -> Result<Planned, Error> {
        let runtime = self
            .limiter
            .runtime()
            .map_err(|e| Error::Internal(format!("query runtime: {e}")))?;
        let rules = self.rules.tightened(&access.disclosure);
        let scope = baseline_scope(&self.engine, &access);
        let session = self.session(&access, scope.as_deref())?;
        let key = scope.as_deref().and_then(|s| Plans::key(s, &access, &rules, sql));
        let kept = key.as_deref().and_then(|k| self.plans.get(k));
        let statement = match kept {
            // The steps still show in the request's span, each a lookup now.
            Some(ready) => {
                self.step("plan", || ());
                self.step("check", || Statement::Kept(ready))
            }
            None => {
                let plan = self
                    .step_async(
                        "plan",
                        policy::plan_sql(&session, sql, &StatementLimits::from(&self.limits)),
                    )
                    .await?;
                Statement::Checked(self.step("check", || {
                    policy::check_with(plan, rules, &self.dataset_rules, policy::perturbation_key(&session))
                })?)
            }
        };
        let execute = async {
            let ready = match statement {
                Statement::Kept(ready) => ready,
                Statement::Checked(permit) => {
                    let ready = Arc::new(self.optimise(&session, permit)?);
                    if let Some(key) = &key {
                        self.plans.keep(key, &ready).map_err(execution_error)?;
                    }
                    ready
                }
            };
            // People told from rows first, where they can be; if the rows leave a group
            // unsettled, again counting them, with disclosure functions of its own (nothing the
            // first try withheld is counted).
            if ready.first_try().is_some() {
                let tried = self
                    .run_plan(
                        &session,
                        Arc::clone(&runtime),
                        &ready,
                        Variant::FromRows,
                        scope.as_deref(),
                    )
                    .await;
                match tried {
                    Err(e) if unsettled(&e) => ready.unsettled.store(true, std::sync::atomic::Ordering::Relaxed),
                    tried => return Ok((ready, tried?)),
                }
            }
            let ran = self
                .run_plan(&session, runtime, &ready, Variant::Counted, scope.as_deref())
                .await?;
            Ok::<_, Error>((ready, ran))
        };
        let (ready, (physical, batches)) = self.step_async("execute", execute).await?;
        let planned = self.step("disclose", || {
            let evaluated = self.shape(&physical.permit, batches, ready.plan_hash.clone())?;
            self.keep(principal, access, &physical.permit, evaluated, entry)
        })?;
        // Only now, its tally read, may another run take the plan.
        self.plans.give_back(&ready, physical);
        Ok(planned)
    }

    /// The session a project's query is planned in, kept for its access (grants, cohort,
    /// pinned versions), data snapshot (`scope`, which names every dataset version it reads)
    /// and the partitions the query runs on now. Its runtime holds only the shared caches:
    /// each query executes under a runtime of its own ([`Core::run_plan`]).
    pub(super) fn session(&self, access: &ProjectAccess, scope: Option<&str>) -> Result<SessionContext, Error> {
        let partitions = self.limiter.partitions();
        let key = scope.map(|scope| recent::key(&[scope, &format!("{access:?}"), &partitions.to_string()]));
        if let Some(session) = key.as_deref().and_then(|k| self.sessions.get(k)) {
            return Ok(session);
        }
        let runtime = self
            .limiter
            .session_runtime()
            .map_err(|e| Error::Internal(format!("session runtime: {e}")))?;
        let session = self.engine.session_with_runtime(access, runtime, partitions)?;
        if let Some(key) = key {
            self.sessions.put(&key, session.clone());
        }
        Ok(session)
    }

    /// Optimises a permitted plan, once, and hashes the result for the audit record.
    pub(super) fn optimise(&self, session: &SessionContext, permit: Permit) -> Result<Ready, Error> {
        let state = session.state();
        let optimised = state.optimize(permit.plan()).map_err(execution_error)?;
        let from_rows = match permit.from_rows() {
            Some(plan) => Some(state.optimize(plan).map_err(execution_error)?),
            None => None,
        };
        // The plan whose figures are released: `from_rows` releases the same or nothing.
        let plan_hash = hex::encode(Sha256::digest(optimised.display_indent().to_string()));
        Ok(Ready {
            permit,
            optimised,
            from_rows,
            unsettled: Arc::default(),
            plan_hash,
            physical: self.plans.pool(),
        })
    }

    /// Runs `ready`'s `variant` (interruptible, so a deadline or a departed client stops it):
    /// a physical plan kept from an earlier run if one is free, else one planned now with
    /// disclosure functions of its own. With a `baselines` scope, baselines already computed
    /// in that scope are reused ([`crate::baselines`]); replays compute everything afresh.
    /// Returns the plan (with the permit that reports what it withheld) to be given back once
    /// the result is shaped.
    pub(super) async fn run_plan(
        &self,
        session: &SessionContext,
        runtime: Arc<RuntimeEnv>,
        ready: &Ready,
        variant: Variant,
        baselines: Option<&str>,
    ) -> Result<(Physical, Vec<RecordBatch>), Error> {
        // Read in place: a kept plan needs no copy of the session's state.
        let task = Arc::new(TaskContext::from(&*session.state_ref().read()).with_runtime(runtime));
        let partitions = task.session_config().target_partitions();
        let physical = match self.plans.take(ready, variant, partitions).map_err(execution_error)? {
            Some(kept) => kept,
            None => {
                let state = session.state();
                let (permit, optimised) = ready.rebound_plan(variant).map_err(execution_error)?;
                let optimised = match baselines {
                    Some(scope) => self
                        .baselines
                        .substitute(&state, &task, optimised, scope)
                        .await
                        .map_err(execution_error)?,
                    None => Transformed::no(optimised),
                };
                // Already optimised: planned physically as it is.
                let plan = state
                    .query_planner()
                    .create_physical_plan(&optimised.data, &state)
                    .await
                    .map_err(execution_error)?;
                let plan = crate::limits::interruptible(plan).map_err(execution_error)?;
                Physical::new(plan, permit, variant, partitions, !optimised.transformed).map_err(execution_error)?
            }
        };
        let batches = datafusion::physical_plan::collect(Arc::clone(&physical.plan), task)
            .await
            .map_err(execution_error)?;
        Ok((physical, batches))
    }

    /// Executes a permitted plan and makes it a result: the size limits, a schema describing the
    /// disclosure control applied, the result hash. Used by replays, which plan afresh.
    pub(crate) async fn evaluate(&self, session: &SessionContext, permit: &Permit) -> Result<Evaluated, Error> {
        let ready = self.optimise(session, permit.clone())?;
        let (physical, batches) = self
            .run_plan(session, session.runtime_env(), &ready, Variant::Counted, None)
            .await?;
        self.shape(&physical.permit, batches, ready.plan_hash)
    }

    /// Caps the result's size, describes what disclosure control withheld and hashes the result.
    pub(super) fn shape(
        &self,
        permit: &Permit,
        batches: Vec<RecordBatch>,
        plan_hash: String,
    ) -> Result<Evaluated, Error> {
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        if rows > self.limits.max_result_rows {
            return Err(Error::TooManyRows(self.limits.max_result_rows));
        }
        let bytes: usize = batches.iter().map(RecordBatch::get_array_memory_size).sum();
        if bytes > self.limits.max_result_bytes {
            return Err(LimitError::ResultTooLarge(self.limits.max_result_bytes).into());
        }
        // The result describes itself: rules applied, columns checked, what was withheld.
        let disclosure = permit.disclosure();
        let output = batches
            .first()
            .map(|b| b.schema())
            .unwrap_or_else(|| Arc::new(permit.plan().schema().as_arrow().clone()));
        let schema: SchemaRef = Arc::new(
            output
                .as_ref()
                .clone()
                .with_metadata(disclosure.report(permit.checked_columns())),
        );
        let mut batches = batches
            .into_iter()
            .map(|b| b.with_schema(Arc::clone(&schema)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Internal(e.to_string()))?;
        if batches.is_empty() {
            // Everything withheld still comes back as a (described) result, not as nothing.
            batches.push(RecordBatch::new_empty(Arc::clone(&schema)));
        }
        let withheld = disclosure.withheld();
        Ok(Evaluated {
            result_hash: result_hash(&schema, &batches)?,
            plan_hash,
            schema,
            batches,
            rows: rows as u64,
            groups_withheld: withheld.groups(),
            cells_withheld: withheld.cells(),
        })
    }

    /// Records what the execution produced in its audit entry and keeps the result for its DoGet.
    pub(super) fn keep(
        &self,
        principal: Principal,
        access: ProjectAccess,
        permit: &Permit,
        evaluated: Evaluated,
        entry: &mut Entry,
    ) -> Result<Planned, Error> {
        self.metrics
            .withheld(evaluated.cells_withheld, evaluated.groups_withheld);
        entry.rows = Some(evaluated.rows);
        entry.groups_withheld = Some(evaluated.groups_withheld);
        entry.cells_withheld = Some(evaluated.cells_withheld);
        entry.rule = Some(serde_json::to_string(&permit.disclosure().rules()).expect("rules serialise"));
        entry.result_hash = Some(evaluated.result_hash.clone());
        entry.plan_hash = Some(evaluated.plan_hash.clone());
        entry.snapshot = self.snapshot_of(&access, permit.plan());
        let evaluated = self.charge(&principal, &access, permit, evaluated, entry)?;

        let handle = uuid::Uuid::new_v4().to_string();
        let ttl = Duration::from_secs(self.limits.statement_ttl_seconds);
        let mut pending = self.pending.lock().expect("pending lock");
        pending.retain(|_, p| p.created.elapsed() < ttl);
        let schema = Arc::clone(&evaluated.schema);
        pending.insert(
            handle.clone(),
            Pending {
                user: principal.user,
                project: access.project,
                result: Computed {
                    schema: evaluated.schema,
                    batches: evaluated.batches,
                },
                executed: entry.clone(),
                created: Instant::now(),
            },
        );
        Ok(Planned {
            handle,
            schema,
            rows: evaluated.rows,
        })
    }

    /// Charges the project's release budget ([`crate::budget`]) the cells `evaluated` releases
    /// (the non-NULL values of its checked columns) and says in its metadata what is left; or,
    /// where they do not fit, spends what is left, records a request for the board and refuses.
    /// The metadata is added after the result's hash, which stays a function of the data alone
    /// (replays compute it again).
    pub(crate) fn charge(
        &self,
        principal: &Principal,
        access: &ProjectAccess,
        permit: &Permit,
        evaluated: Evaluated,
        entry: &mut Entry,
    ) -> Result<Evaluated, Error> {
        let checked: Vec<usize> = permit
            .checked_columns()
            .iter()
            .filter_map(|c| evaluated.schema.index_of(c).ok())
            .collect();
        let cells: u64 = evaluated
            .batches
            .iter()
            .flat_map(|b| {
                checked
                    .iter()
                    .map(|&i| (b.num_rows() - b.column(i).null_count()) as u64)
            })
            .sum();
        entry.cells_released = Some(cells);
        if !self.budgets.enabled() {
            return Ok(evaluated);
        }
        let granted = self.registry.budget_granted(&access.project)?;
        let standing = match self.budgets.charge(&access.project, granted, cells) {
            Ok(Some(standing)) => standing,
            Ok(None) => return Ok(evaluated),
            Err(exhausted) => {
                // Nothing is released, but what was left is spent, and the record says so.
                entry.cells_released = Some(exhausted.spent);
                let now = self.clock.now().to_rfc3339();
                self.registry.request_budget(
                    &access.project,
                    &principal.user,
                    exhausted.budget,
                    exhausted.budget,
                    &now,
                )?;
                return Err(exhausted.into());
            }
        };
        let mut metadata = evaluated.schema.metadata().clone();
        metadata.extend(standing.metadata());
        let schema: SchemaRef = Arc::new(evaluated.schema.as_ref().clone().with_metadata(metadata));
        let batches = evaluated
            .batches
            .into_iter()
            .map(|b| b.with_schema(Arc::clone(&schema)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Internal(e.to_string()))?;
        Ok(Evaluated {
            schema,
            batches,
            ..evaluated
        })
    }

    /// The content hash of every dataset behind a result: those the plan reads, the opt-out
    /// register, and the population table when a cohort filter reads it.
    pub(crate) fn snapshot_of(
        &self,
        access: &ProjectAccess,
        plan: &datafusion::logical_expr::LogicalPlan,
    ) -> std::collections::BTreeMap<String, String> {
        let all = self.engine.fingerprints(access).unwrap_or_default();
        let mut read = policy::datasets_read(plan);
        read.push(crate::engine::OPT_OUTS.to_owned());
        if access.cohort.is_some() {
            read.push(crate::engine::POPULATION.to_owned());
        }
        read.into_iter()
            .filter_map(|d| all.get(&d).map(|h| (d, h.clone())))
            .collect()
    }
}

/// What a project's baselines ([`crate::baselines`]) depend on besides the query: the
/// project, the version and content hash of every dataset it reads, and its cohort.
/// `None` (nothing reused) if they cannot be named.
fn baseline_scope(engine: &Engine, access: &ProjectAccess) -> Option<String> {
    let data = engine.fingerprints(access).ok()?;
    Some(format!("{}\n{data:?}\n{:?}", access.project, access.cohort))
}

/// An execution error as the caller sees it: disclosure control can refuse while the query
/// runs (rows that cannot tell a group's people); anything else is the engine's.
fn execution_error(e: datafusion::error::DataFusionError) -> Error {
    use datafusion::arrow::error::ArrowError;
    use datafusion::error::DataFusionError as DF;
    match e.find_root() {
        DF::ArrowError(inner, _) if matches!(**inner, ArrowError::ArithmeticOverflow(_)) => {
            Error::Limit(LimitError::Overflow)
        }
        _ => Error::Engine(EngineError::Execution(e)),
    }
}

/// Whether an execution failed only because rows could not tell a group's people
/// ([`crate::disclosure::Unsettled`]).
fn unsettled(e: &Error) -> bool {
    matches!(e, Error::Engine(EngineError::Execution(e))
        if matches!(e.find_root(), datafusion::error::DataFusionError::External(inner)
            if inner.downcast_ref::<crate::disclosure::Unsettled>().is_some()))
}
