//! Telling people from rows: where rows count people, where identifiers are one person, the
//! plan that settles groups from rows, reserved names and repeated keys.

use super::*;

/// The aggregates of `plan`, once optimised, that `keep` keeps (as text).
fn aggregates(ctx: &SessionContext, plan: &LogicalPlan, keep: impl Fn(&str) -> bool) -> Vec<String> {
    let mut kept = vec![];
    ctx.state()
        .optimize(plan)
        .unwrap()
        .apply(|node| {
            if let LogicalPlan::Aggregate(a) = node {
                kept.extend(a.aggr_expr.iter().map(|e| e.to_string()).filter(|e| keep(e)));
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .unwrap();
    kept
}

/// The aggregates of `plan` that count its rows: COUNT of a constant.
fn counts(ctx: &SessionContext, plan: &LogicalPlan) -> Vec<String> {
    aggregates(ctx, plan, |e| e.starts_with("count(Int"))
}

#[tokio::test]
async fn a_query_counting_rows_where_rows_count_people_is_not_counted_twice() {
    // Each row a person (patients), or people told from rows (episodes): the query's own
    // COUNT(*) is the group's count of people too; the rewrite adds no second count of the rows.
    let ctx = session();
    for sql in [
        "SELECT district, COUNT(*) AS n FROM patients GROUP BY district",
        "SELECT district, COUNT(*) AS n, AVG(age) AS mean_age FROM patients GROUP BY district",
    ] {
        let permit = plan_and_check(&ctx, sql, RULES, &Default::default()).await.unwrap();
        let counts = counts(&ctx, permit.plan());
        assert_eq!(counts.len(), 1, "{sql}: {counts:?}");
    }
    let sql = "SELECT kind, COUNT(*) AS n FROM episodes GROUP BY kind";
    let permit = plan_and_check(&ctx, sql, RULES, &Default::default()).await.unwrap();
    let counts = counts(&ctx, permit.from_rows().expect("a plan from rows"));
    assert_eq!(counts.len(), 1, "{sql}: {counts:?}");
    // What they release is checked as before: B's 9 people withheld, with or without a mean.
    let out = run("SELECT district, COUNT(*) AS n, AVG(age) AS a FROM patients GROUP BY district ORDER BY 1").await;
    assert!(
        out.contains("| A ") && !out.contains("| B ") && out.contains("| C "),
        "{out}"
    );
}

#[tokio::test]
async fn identifiers_are_one_person_only_where_an_inner_join_makes_them_equal() {
    let ctx = session();
    let same = |sql: &'static str, a: (&'static str, &'static str), b: (&'static str, &'static str)| {
        let ctx = ctx.clone();
        async move {
            let plan = ctx.state().create_logical_plan(sql).await.unwrap();
            let LogicalPlan::Projection(p) = plan else {
                panic!("{sql}")
            };
            let input = &p.input;
            same_person(input, &Column::new(Some(a.0), a.1), &Column::new(Some(b.0), b.1))
        }
    };
    let (e, s) = (("e", PERSON_ID), ("s", PERSON_ID));
    // Joined on them, through a rename, a subquery and a filter.
    assert!(
        same(
            "SELECT * FROM episodes e JOIN stays s ON e.person_id = s.person_id",
            e,
            s
        )
        .await
    );
    assert!(same("SELECT * FROM episodes e JOIN stays s USING (person_id)", e, s).await);
    assert!(
        same(
            "SELECT * FROM episodes e JOIN stays s ON s.ward = 'A' AND s.person_id = e.person_id WHERE e.kind = 'X'",
            e,
            s
        )
        .await
    );
    assert!(
        same(
            "SELECT * FROM (SELECT person_id AS pid FROM episodes) e JOIN stays s ON e.pid = s.person_id",
            ("e", "pid"),
            s
        )
        .await
    );
    // Outer joins leave one side NULL; a WHERE equality is dropped by the baseline (the
    // variant without conditions); other keys do not make the people the same.
    assert!(
        !same(
            "SELECT * FROM episodes e LEFT JOIN stays s ON e.person_id = s.person_id",
            e,
            s
        )
        .await
    );
    assert!(
        !same(
            "SELECT * FROM episodes e FULL JOIN stays s ON e.person_id = s.person_id",
            e,
            s
        )
        .await
    );
    assert!(
        !same(
            "SELECT * FROM episodes e, stays s WHERE e.person_id = s.person_id",
            e,
            s
        )
        .await
    );
    assert!(!same("SELECT * FROM episodes e JOIN stays s ON e.kind = s.ward", e, s).await);
    assert!(
        !same(
            "SELECT * FROM episodes e JOIN stays s ON e.person_id = s.person_id OR e.kind = s.ward",
            e,
            s
        )
        .await
    );

    // Joined so, people are counted once: by the column the query counts, in the query's own
    // distinct count, where the two sides were counted each before (and the group's people
    // once more, up to the threshold).
    let sql = "SELECT e.kind, COUNT(DISTINCT s.person_id) AS people FROM episodes e JOIN stays s \
               ON e.person_id = s.person_id GROUP BY 1";
    let permit = plan_and_check(&ctx, sql, RULES, &Default::default()).await.unwrap();
    let distinct_counts = aggregates(&ctx, permit.plan(), |e| {
        e.contains("DISTINCT") || e.contains("sde_people_at_least")
    });
    assert_eq!(distinct_counts.len(), 1, "{distinct_counts:?}");
    assert!(distinct_counts[0].contains("s.person_id"), "{distinct_counts:?}");
}

/// The plan telling people from rows, executed, if the rewrite made one.
async fn execute_from_rows(sql: &str) -> Option<datafusion::error::Result<String>> {
    let ctx = session();
    let permit = plan_and_check(&ctx, sql, RULES, &Default::default()).await.unwrap();
    let plan = permit.from_rows()?.clone();
    let run = async {
        let batches = ctx.execute_logical_plan(plan).await?.collect().await?;
        Ok(pretty_format_batches(&batches)?.to_string())
    };
    Some(run.await)
}

#[tokio::test]
async fn rows_settle_a_group_only_where_they_prove_enough_people() {
    // 25 rows of Y with at most 3 per person prove only 9 people: the rows cannot settle it.
    // Counted one by one, Y has 9 people and is withheld.
    let sql = "SELECT kind, COUNT(*) AS n FROM episodes GROUP BY kind";
    assert_unsettled(sql).await;
    let exact = [
        "+------+----+",
        "| kind | n  |",
        "+------+----+",
        "| X    | 40 |",
        "+------+----+",
    ];
    assert_table(&run(sql).await, &exact);
    // All 65 rows prove at least 22 people: settled, released as counting them would.
    let sql = "SELECT COUNT(*) AS n FROM episodes";
    let total = ["+----+", "| n  |", "+----+", "| 65 |", "+----+"];
    assert_table(&execute_from_rows(sql).await.unwrap().unwrap(), &total);
    assert_table(&run(sql).await, &total);
    // Settled from rows, the table's people are never read (with counts perturbed they are, for
    // the cell keys).
    assert_reads_no_people(sql).await;
}

/// The plan telling people from rows scans tables but never reads `person_id`.
async fn assert_reads_no_people(sql: &str) {
    let ctx = session();
    let permit = plan_and_check(&ctx, sql, RULES, &Default::default()).await.unwrap();
    let optimised = ctx.state().optimize(permit.from_rows().unwrap()).unwrap();
    let mut scans = vec![];
    optimised
        .apply(|node| {
            if let LogicalPlan::TableScan(scan) = node {
                scans.push(
                    scan.projected_schema
                        .fields()
                        .iter()
                        .map(|f| f.name().clone())
                        .collect::<Vec<_>>(),
                );
            }
            Ok(TreeNodeRecursion::Continue)
        })
        .unwrap();
    assert!(
        !scans.is_empty() && scans.iter().all(|s| !s.iter().any(|c| c == PERSON_ID)),
        "{sql}: {scans:?}"
    );
}

/// The plan telling people from rows fails with [`crate::disclosure::Unsettled`].
async fn assert_unsettled(sql: &str) {
    let err = execute_from_rows(sql).await.expect("a plan from rows").unwrap_err();
    assert!(
        matches!(err.find_root(), DataFusionError::External(e) if e.downcast_ref::<crate::disclosure::Unsettled>().is_some()),
        "{sql}: {err}"
    );
}

#[tokio::test]
async fn counts_are_told_from_rows_sums_and_means_flattened_per_person() {
    // Every ward's rows show 10 people or more: counts are told from rows, exact.
    let sql = "SELECT ward, COUNT(*) AS n, COUNT(cost) AS c FROM stays GROUP BY ward ORDER BY ward";
    let out = execute_from_rows(sql).await.unwrap().unwrap();
    assert_eq!(column(&out, 1), [Some(30.0), Some(20.0), Some(25.0)], "{out}");
    assert_eq!(column(&out, 2), [Some(30.0), Some(20.0), Some(25.0)], "{out}");
    assert_reads_no_people(sql).await;
    // Sums and means need each person's total: no plan from rows; 1.5 hours a stay, at most
    // two a person, so the top group's mean is 3 and the noise's sd 1.5.
    let sql = "SELECT ward, COUNT(*) AS n, SUM(hours) AS h, AVG(hours) AS a FROM stays GROUP BY ward ORDER BY ward";
    assert!(execute_from_rows(sql).await.is_none());
    let out = run(sql).await;
    assert_eq!(column(&out, 1), [Some(30.0), Some(20.0), Some(25.0)], "{out}");
    for (h, n) in column(&out, 2).into_iter().zip([30.0, 20.0, 24.0]) {
        near(h, 1.5 * n, 1.5 * 9.5);
    }
    // B's two people with 200 each count as two at the next people's 0.5: B's sum is released
    // near 9, and tells nothing of their 400.
    let out = run("SELECT ward, SUM(cost) AS s FROM stays GROUP BY ward ORDER BY ward").await;
    let s = column(&out, 1);
    near(s[0], 90.0, 3.0 * 9.5);
    near(s[1], 9.0, 0.25 * 9.5);
    near(s[2], 72.0, 3.0 * 9.5);
    // C0 has no days: C's sum is released all the same (no NULL marks who is left out).
    let out = run("SELECT ward, SUM(days) AS d FROM stays GROUP BY ward ORDER BY ward").await;
    assert!(column(&out, 1).iter().all(Option::is_some), "{out}");
}

#[tokio::test]
async fn people_are_told_from_rows_only_where_rows_can_tell() {
    for sql in [
        // Filters and cells with conditions need people counted exactly (conditions of
        // low effect).
        "SELECT kind, COUNT(*) AS n FROM episodes WHERE kind <> 'Z' GROUP BY kind",
        "SELECT kind, COUNT(*) FILTER (WHERE kind = 'X') AS n FROM episodes GROUP BY kind",
        // A table whose most rows per person is not known; a join that can repeat a person.
        "SELECT cost > 500 AS c, COUNT(*) AS n FROM visits GROUP BY 1",
        "SELECT e.kind, COUNT(*) AS n FROM episodes e JOIN visits v ON e.person_id = v.person_id GROUP BY 1",
        // A cell counting people reads who they are anyway.
        "SELECT kind, COUNT(DISTINCT person_id) AS people FROM episodes GROUP BY kind",
        // A table with one row per person counts people as rows.
        "SELECT district, COUNT(*) AS n FROM patients GROUP BY district",
        "SELECT district, SUM(age) AS n FROM patients GROUP BY district",
    ] {
        assert!(execute_from_rows(sql).await.is_none(), "{sql}");
    }
}

#[tokio::test]
async fn a_person_with_many_rows_behind_a_join_is_still_one_person() {
    // a0's 20 visits costing 1000 are 20 rows but one person: the group is withheld.
    let sql = "SELECT p.district, COUNT(*) AS n FROM patients p JOIN visits v ON p.person_id = v.person_id \
               WHERE v.cost > 500 GROUP BY p.district";
    assert_table(&run(sql).await, &["++", "++"]);
}

#[tokio::test]
async fn names_the_rewrite_uses_are_reserved() {
    for sql in [
        "SELECT district, COUNT(*) AS __sde_people_0_0 FROM patients GROUP BY district",
        "SELECT COUNT(*) FROM (SELECT district FROM patients) AS __sde_side_0_u0",
        "WITH __SDE_x AS (SELECT district FROM patients) SELECT COUNT(*) FROM __SDE_x",
    ] {
        let e = refusal(sql).await;
        assert!(e.to_string().contains("reserved"), "{sql}: {e}");
    }
}

#[tokio::test]
async fn a_key_repeated_in_group_by_is_one_key_and_its_cells_are_still_checked() {
    // The aggregate's output holds a repeated key once; its cells are still rounded, withheld
    // and flattened exactly as with the key given once.
    for (once, repeated) in [
        (
            "SELECT district, COUNT(*) AS n FROM patients GROUP BY district ORDER BY 1",
            "SELECT district, COUNT(*) AS n FROM patients GROUP BY district, district, patients.district ORDER BY 1",
        ),
        (
            "SELECT age > 25 AS old, district, COUNT(*) AS n, SUM(age) AS s FROM patients \
             GROUP BY age > 25, district ORDER BY 1, 2",
            "SELECT age > 25 AS old, district, COUNT(*) AS n, SUM(age) AS s FROM patients \
             GROUP BY age > 25, district, age > 25, district, district ORDER BY 1, 2",
        ),
        (
            "SELECT district, SUM(v.cost) AS s, COUNT(*) AS n FROM patients p \
             JOIN visits v ON p.person_id = v.person_id GROUP BY district",
            "SELECT district, SUM(v.cost) AS s, COUNT(*) AS n FROM patients p \
             JOIN visits v ON p.person_id = v.person_id GROUP BY district, p.district, district",
        ),
    ] {
        assert_eq!(run(repeated).await, run(once).await, "{repeated}");
    }
    let once = execute_from_rows("SELECT kind, COUNT(*) AS n FROM episodes GROUP BY kind ORDER BY 1").await;
    let repeated = execute_from_rows("SELECT kind, COUNT(*) AS n FROM episodes GROUP BY kind, kind ORDER BY 1").await;
    let outcome = |r: Option<datafusion::error::Result<String>>| r.map(|r| r.map_err(|e| e.to_string()));
    let (once, repeated) = (outcome(once), outcome(repeated));
    assert!(once.is_some(), "a plan from rows");
    assert_eq!(repeated, once, "people told from rows");
}
