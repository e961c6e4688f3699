//! Researchers over Flight SQL: the worked example, joins, refusals with the right codes, tickets
//! that are authorised again, catalogue limited to grants, and the audit trail of it all.

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::{Float64Type, Int64Type};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::util::display::array_value_to_string;
use tonic::Code;

use crate::helpers::*;

/// Rows as sorted vectors of display strings ("" for NULL).
fn rows(batches: &[RecordBatch]) -> Vec<Vec<String>> {
    let mut out = vec![];
    for b in batches {
        for r in 0..b.num_rows() {
            out.push(
                b.columns()
                    .iter()
                    .map(|c| {
                        if c.is_null(r) {
                            String::new()
                        } else {
                            array_value_to_string(c, r).unwrap()
                        }
                    })
                    .collect(),
            );
        }
    }
    out.sort();
    out
}

/// Independent expectation: groups with at least 10 people and their true count. `sql` must
/// return the group keys, then `people` (distinct), then `n` (the count to release).
async fn expected(sql: &str) -> Vec<Vec<String>> {
    let batches = raw(&world_data(), sql).await;
    let mut out = vec![];
    for b in &batches {
        let k = b.num_columns() - 2;
        let people = b.column(k).as_primitive::<Int64Type>();
        let n = b.column(k + 1).as_primitive::<Int64Type>();
        for r in 0..b.num_rows() {
            if people.value(r) >= 10 {
                let mut row: Vec<String> = (0..k).map(|c| array_value_to_string(b.column(c), r).unwrap()).collect();
                row.push(n.value(r).to_string());
                out.push(row);
            }
        }
    }
    out.sort();
    out
}

/// `got` releases exactly the groups of `want` (from [`expected`]), each count perturbed by at
/// most the p-table's D (3) and then rounded to 5: a multiple of 5 within 5 of the truth.
fn assert_released(got: &[RecordBatch], want: &[Vec<String>], context: &str) {
    let got = rows(got);
    let keys = |rows: &[Vec<String>]| rows.iter().map(|r| r[..r.len() - 1].to_vec()).collect::<Vec<_>>();
    assert_eq!(keys(&got), keys(want), "{context}: the groups released");
    for (g, w) in got.iter().zip(want) {
        let (g, w): (i64, i64) = (g.last().unwrap().parse().unwrap(), w.last().unwrap().parse().unwrap());
        assert!(g % 5 == 0 && (g - w).abs() <= 5, "{context}: {g} released for {w}");
    }
}

#[tokio::test]
async fn worked_example_gives_safe_correct_counts() {
    let gw = spawn_gateway().await;
    let sql = "SELECT age_band, sex, COUNT(*) AS n FROM patients GROUP BY age_band, sex";
    let got = gw.query_as("alice", PROJECT, sql).await.expect("worked example");
    let want = expected(
        "SELECT age_band, sex, COUNT(DISTINCT person_id) AS people, COUNT(*) AS n FROM patients
         WHERE person_id NOT IN (SELECT person_id FROM opt_outs) GROUP BY age_band, sex",
    )
    .await;
    assert_released(&got, &want, sql);
    // Disclosure control was needed (some groups are small) and is described in the schema.
    let all_groups = raw(
        &world_data(),
        "SELECT COUNT(*) FROM (SELECT DISTINCT age_band, sex FROM patients)",
    )
    .await;
    let all_groups = all_groups[0].column(0).as_primitive::<Int64Type>().value(0) as usize;
    assert!(
        want.len() < all_groups,
        "the demo data should have small groups to withhold"
    );
    let metadata = got[0].schema().metadata().clone();
    assert_eq!(metadata["sde.groups_withheld"], (all_groups - want.len()).to_string());
    assert_eq!(metadata["sde.checked_columns"], "n");
    assert!(metadata["sde.rules"].contains("\"threshold\":10"));
    // Opted-out people are not counted: the released total is below the raw total.
    let released: i64 = got
        .iter()
        .map(|b| b.column(2).as_primitive::<Int64Type>().iter().flatten().sum::<i64>())
        .sum();
    assert!(released < PEOPLE as i64 * 99 / 100, "released {released} of {PEOPLE}");
}

#[tokio::test]
async fn ews_referrals_join_asc_services_on_person() {
    let gw = spawn_gateway().await;
    let got = gw
        .query_as(
            "alice",
            PROJECT,
            "SELECT r.outcome, COUNT(DISTINCT r.person_id) AS people
             FROM ews_referrals r JOIN asc_services a ON r.person_id = a.person_id
             GROUP BY r.outcome",
        )
        .await
        .expect("join query");
    let want = expected(
        "SELECT r.outcome, COUNT(DISTINCT r.person_id) AS people, COUNT(DISTINCT r.person_id) AS n
         FROM ews_referrals r JOIN asc_services a ON r.person_id = a.person_id
         WHERE r.person_id NOT IN (SELECT person_id FROM opt_outs)
         GROUP BY r.outcome",
    )
    .await;
    assert!(!want.is_empty(), "the demo data links EWS referrals to ASC services");
    assert_released(&got, &want, "join");
}

#[tokio::test]
async fn row_level_and_identifier_queries_are_refused_with_the_rule() {
    let gw = spawn_gateway().await;
    for (sql, rule) in [
        ("SELECT age, district FROM patients", "safe-outputs/aggregate-only"),
        (
            "SELECT person_id, COUNT(*) FROM asc_services GROUP BY person_id",
            "safe-outputs/identifiers",
        ),
        ("SELECT MAX(age) FROM patients", "safe-outputs/allowed-aggregates"),
        ("DROP TABLE patients", "safe-outputs/single-query"),
    ] {
        let err = gw.query_as("alice", PROJECT, sql).await.expect_err(sql);
        assert_eq!(err.code(), Code::InvalidArgument, "{sql}: {err:?}");
        assert!(err.message().contains(rule), "{sql}: {}", err.message());
    }
}

#[tokio::test]
async fn tables_not_granted_look_like_tables_that_do_not_exist() {
    let gw = spawn_gateway().await;
    let not_granted = gw
        .query_as("alice", PROJECT, "SELECT COUNT(*) FROM gp_events")
        .await
        .unwrap_err();
    let absent = gw
        .query_as("alice", PROJECT, "SELECT COUNT(*) FROM gp_eventz")
        .await
        .unwrap_err();
    let opt_outs = gw
        .query_as("alice", PROJECT, "SELECT COUNT(*) FROM opt_outs")
        .await
        .unwrap_err();
    assert_eq!(not_granted.code(), Code::InvalidArgument);
    assert_eq!(
        not_granted.message().replace("gp_events", "X"),
        absent.message().replace("gp_eventz", "X")
    );
    assert_eq!(
        opt_outs.message().replace("opt_outs", "X"),
        absent.message().replace("gp_eventz", "X")
    );
}

#[tokio::test]
async fn missing_or_bad_tokens_are_unauthenticated() {
    let gw = spawn_gateway().await;
    let sql = "SELECT COUNT(*) FROM patients";
    let other_world = spawn_gateway().await; // same users, different signing key
    for token in [None, Some("garbage".to_owned()), Some(other_world.token("alice"))] {
        let mut client = gw.client_with(token.clone(), Some(PROJECT)).await;
        let err = query(&mut client, sql).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}: {err:?}");
    }
}

#[tokio::test]
async fn users_without_the_right_are_permission_denied() {
    let gw = spawn_gateway().await;
    let sql = "SELECT COUNT(*) FROM patients";
    for (user, project, rule) in [
        ("dave", PROJECT, "safe-projects/not-a-member"),
        ("bob", PROJECT, "safe-people/accreditation-expired"),
        ("carol", PROJECT, "safe-people/organisation-dspt"),
        ("admin", PROJECT, "safe-people/role"),
        ("auditor", PROJECT, "safe-people/role"),
        ("alice", "gp-trends", "safe-projects/not-approved"),
        ("alice", "old-study", "safe-projects/state"),
        ("alice", "no-such-project", "safe-projects/not-a-member"),
    ] {
        let err = gw.query_as(user, project, sql).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{user}/{project}: {err:?}");
        assert!(err.message().starts_with(rule), "{user}/{project}: {}", err.message());
    }
    let mut no_project = gw.client_with(Some(gw.token("alice")), None).await;
    assert_eq!(
        query(&mut no_project, sql).await.unwrap_err().code(),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn a_ticket_alone_is_not_trusted() {
    let gw = spawn_gateway().await;
    let mut alice = gw.client("alice", PROJECT).await;
    let info = alice
        .execute("SELECT COUNT(*) AS n FROM patients".into(), None)
        .await
        .unwrap();
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    // Without a token, or as another (even authorised-looking) user, the ticket is refused.
    let mut anonymous = gw.client_with(None, Some(PROJECT)).await;
    assert_eq!(
        status(anonymous.do_get(ticket.clone()).await.err().unwrap()).code(),
        Code::Unauthenticated
    );
    let mut dave = gw.client("dave", PROJECT).await;
    assert_eq!(
        status(dave.do_get(ticket.clone()).await.err().unwrap()).code(),
        Code::PermissionDenied
    );
    // Alice can still use it once; then it is spent.
    let stream = alice.do_get(ticket.clone()).await.unwrap();
    let receipt = stream.headers().get("x-sde-audit-seq").cloned();
    assert!(receipt.is_some(), "a released result carries its audit receipt");
    assert_eq!(status(alice.do_get(ticket).await.err().unwrap()).code(), Code::NotFound);
}

#[tokio::test]
async fn catalogue_shows_only_granted_tables() {
    use arrow_flight::sql::CommandGetTables;
    let gw = spawn_gateway().await;
    let mut alice = gw.client("alice", PROJECT).await;
    let info = alice
        .get_tables(CommandGetTables {
            include_schema: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let stream = alice.do_get(info.endpoint[0].ticket.clone().unwrap()).await.unwrap();
    let batches: Vec<RecordBatch> = futures::TryStreamExt::try_collect(stream).await.unwrap();
    let names: Vec<String> = rows(&batches).into_iter().map(|r| r[2].clone()).collect();
    assert_eq!(names, ["asc_services", "ews_referrals", "patients"]);
    let mut dave = gw.client("dave", PROJECT).await;
    assert_eq!(
        status(dave.get_tables(CommandGetTables::default()).await.unwrap_err()).code(),
        Code::PermissionDenied
    );
}

#[tokio::test]
async fn the_metadata_calls_jdbc_and_dbeaver_make_are_answered() {
    use arrow_flight::FlightInfo;
    use arrow_flight::sql::{
        CommandGetCrossReference, CommandGetExportedKeys, CommandGetImportedKeys, CommandGetPrimaryKeys,
        CommandGetXdbcTypeInfo,
    };
    let gw = spawn_gateway().await;
    let mut alice = gw.client("alice", PROJECT).await;
    async fn fetch(
        client: &mut arrow_flight::sql::client::FlightSqlServiceClient<tonic::transport::Channel>,
        info: FlightInfo,
    ) -> Vec<RecordBatch> {
        let stream = client.do_get(info.endpoint[0].ticket.clone().unwrap()).await.unwrap();
        futures::TryStreamExt::try_collect(stream).await.unwrap()
    }
    // The SQL types results use, by name and JDBC code.
    let info = alice
        .get_xdbc_type_info(CommandGetXdbcTypeInfo::default())
        .await
        .unwrap();
    let types = rows(&fetch(&mut alice, info).await);
    let names: Vec<&str> = types.iter().map(|r| r[0].as_str()).collect();
    for name in ["BIGINT", "DOUBLE", "VARCHAR", "DATE"] {
        assert!(names.contains(&name), "{names:?}");
    }
    // Keys: none, in the schemas Flight SQL defines.
    let table = "patients".to_owned();
    let infos = [
        alice
            .get_primary_keys(CommandGetPrimaryKeys {
                table: table.clone(),
                ..Default::default()
            })
            .await
            .unwrap(),
        alice
            .get_exported_keys(CommandGetExportedKeys {
                table: table.clone(),
                ..Default::default()
            })
            .await
            .unwrap(),
        alice
            .get_imported_keys(CommandGetImportedKeys {
                table: table.clone(),
                ..Default::default()
            })
            .await
            .unwrap(),
        alice
            .get_cross_reference(CommandGetCrossReference {
                pk_table: table.clone(),
                fk_table: "asc_services".into(),
                ..Default::default()
            })
            .await
            .unwrap(),
    ];
    for (info, first) in
        infos
            .into_iter()
            .zip(["catalog_name", "pk_catalog_name", "pk_catalog_name", "pk_catalog_name"])
    {
        let schema = info.clone().try_decode_schema().unwrap();
        assert_eq!(schema.field(0).name(), first);
        let batches = fetch(&mut alice, info).await;
        assert_eq!(batches.iter().map(RecordBatch::num_rows).sum::<usize>(), 0);
    }
    // Every one of them is on record.
    let records = sde_gateway::audit::verify(&gw.audit_log()).expect("chain verifies");
    let calls: Vec<&str> = records.iter().map(|r| r.entry.call.as_str()).collect();
    assert!(calls.contains(&"metadata.xdbc_type_info"), "{calls:?}");
    assert_eq!(calls.iter().filter(|c| **c == "metadata.keys").count(), 8, "{calls:?}");
}

#[tokio::test]
async fn every_call_is_audited_in_a_verified_chain_before_release() {
    let gw = spawn_gateway().await;
    gw.query_as("alice", PROJECT, "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex")
        .await
        .unwrap();
    gw.query_as("alice", PROJECT, "SELECT age FROM patients")
        .await
        .unwrap_err();
    gw.query_as("bob", PROJECT, "SELECT COUNT(*) FROM patients")
        .await
        .unwrap_err();
    let records = sde_gateway::audit::verify(&gw.audit_log()).expect("chain verifies");
    let summary: Vec<(String, String, Option<String>)> = records
        .iter()
        .map(|r| (r.entry.call.clone(), r.entry.decision.clone(), r.entry.user.clone()))
        .collect();
    let alice = Some("alice".to_owned());
    assert_eq!(
        summary,
        [
            // On record before it runs, then its outcome.
            ("query.received".into(), "received".into(), alice.clone()),
            ("query.execute".into(), "accepted".into(), alice.clone()),
            ("query.release".into(), "accepted".into(), alice.clone()),
            ("query.received".into(), "received".into(), alice.clone()),
            ("query.execute".into(), "refused".into(), alice),
            // Refused before anything runs (bob's accreditation has expired): no received record.
            ("query.execute".into(), "refused".into(), Some("bob".into())),
        ]
    );
    let release = &records[2].entry;
    assert!(release.result_hash.is_some());
    assert_eq!(
        release.sql.as_deref(),
        Some("SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex")
    );
    assert_eq!(records[4].entry.rule.as_deref(), Some("safe-outputs/aggregate-only"));
    assert_eq!(
        records[5].entry.rule.as_deref(),
        Some("safe-people/accreditation-expired")
    );
}

#[tokio::test]
async fn malformed_and_huge_queries_get_clear_errors_and_the_server_stays_up() {
    let gw = spawn_gateway().await;
    for sql in [
        "SELEC nonsense",
        "",
        "SELECT COUNT(* FROM patients",
        &format!("SELECT {} ", "1+".repeat(40_000)),
    ] {
        let err = gw.query_as("alice", PROJECT, sql).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{:.40}: {err:?}", sql);
    }
    gw.query_as("alice", PROJECT, "SELECT COUNT(*) AS n FROM patients")
        .await
        .expect("still serving");
}

#[tokio::test]
async fn prepared_statements_as_jdbc_uses_them() {
    let gw = spawn_gateway().await;
    let mut alice = gw.client("alice", PROJECT).await;
    let mut prepared = alice
        .prepare("SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex".into(), None)
        .await
        .unwrap();
    let names: Vec<String> = prepared
        .dataset_schema()
        .unwrap()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(names, ["sex", "n"]);
    let info = prepared.execute().await.unwrap();
    let stream = alice.do_get(info.endpoint[0].ticket.clone().unwrap()).await.unwrap();
    let batches: Vec<RecordBatch> = futures::TryStreamExt::try_collect(stream).await.unwrap();
    assert_eq!(rows(&batches).len(), 2);
    // Refused queries are refused at prepare time, with the rule.
    let err = alice
        .prepare("SELECT age FROM patients".into(), None)
        .await
        .unwrap_err();
    assert!(status(err).message().contains("safe-outputs/aggregate-only"));
    prepared.close().await.unwrap();
}

#[tokio::test]
async fn datasets_and_projects_can_only_tighten_the_rules() {
    use sde_gateway::disclosure::Overrides;
    let gw = spawn_gateway_with(|c| {
        c.disclosure.datasets.insert(
            "asc_services".into(),
            Overrides {
                threshold: Some(400),
                ..Default::default()
            },
        );
    })
    .await;
    let mut alice = gw.client("alice", PROJECT).await;
    let rules = |s: &datafusion::arrow::datatypes::Schema| s.metadata()["sde.rules"].clone();
    // A query on patients alone runs under the gateway's rules...
    let (schema, _) = query_described(&mut alice, "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex")
        .await
        .unwrap();
    assert!(rules(&schema).contains("\"threshold\":10"));
    // ...one reading asc_services under its stricter threshold: every service type with
    // fewer than 400 people is withheld.
    let (schema, asc) = query_described(
        &mut alice,
        "SELECT service_type, COUNT(DISTINCT person_id) AS n FROM asc_services GROUP BY 1",
    )
    .await
    .unwrap();
    assert!(rules(&schema).contains("\"threshold\":400"));
    for b in &asc {
        for n in b.column(1).as_primitive::<Int64Type>().iter().flatten() {
            assert!(n >= 400, "{n}");
        }
    }
    // A project's own settings tighten further, and cannot loosen below the gateway's.
    let shipped = sde_gateway::registry::rules::RuleSet::shipped();
    let registry = sde_gateway::registry::Registry::open(&gw.config.registry.path, shipped, 12).unwrap();
    registry
        .set_project_disclosure(
            PROJECT,
            &Overrides {
                threshold: Some(3),
                rounding: Some(100),
                ..Default::default()
            },
        )
        .unwrap();
    let (schema, got) = query_described(&mut alice, "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex")
        .await
        .unwrap();
    assert!(
        rules(&schema).contains("\"threshold\":10,\"rounding\":100"),
        "{}",
        rules(&schema)
    );
    for n in got[0].column(1).as_primitive::<Int64Type>().iter().flatten() {
        assert_eq!(n % 100, 0);
    }
}

#[tokio::test]
async fn grpc_health_reports_serving_without_a_token() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let gw = spawn_gateway().await;
    let mut health = HealthClient::new(gw.channel().await);
    for service in ["", "arrow.flight.protocol.FlightService"] {
        let reply = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.status(), ServingStatus::Serving, "{service:?}");
    }
}

/// A released group: its keys, and its mean and total (None if withheld).
type Released = (Vec<String>, Option<(f64, f64)>);

#[tokio::test]
async fn sums_over_several_rows_per_person_are_released_near_the_truth_whether_rows_settle_them_or_not() {
    let gw = spawn_gateway().await;
    let mut client = gw.client("alice", PROJECT).await;
    // Every care episode has a cost, so every person of a group contributes to its cells.
    let uncosted = raw(
        &world_data(),
        "SELECT COUNT(*) FROM asc_services WHERE weekly_cost IS NULL OR weekly_cost = 0",
    )
    .await;
    assert_eq!(uncosted[0].column(0).as_primitive::<Int64Type>().value(0), 0);
    // The whole table (its rows prove enough people: told from rows), and groups some of
    // which rows cannot settle (few rows).
    let mut errors: Vec<f64> = vec![];
    for keys in [
        "",
        "service_type",
        "primary_support_reason",
        "service_type, primary_support_reason",
    ] {
        let (select, group) = match keys {
            "" => (String::new(), String::new()),
            k => (format!("{k}, "), format!(" GROUP BY {k}")),
        };
        let sql =
            format!("SELECT {select}AVG(weekly_cost) AS mean_cost, SUM(weekly_cost) AS total FROM asc_services{group}");
        // Independently: each person's total per group, on the raw files without opted-out people.
        let k = keys.split(',').filter(|k| !k.trim().is_empty()).count();
        let per_person = raw(
            &world_data(),
            &format!(
                "SELECT {select}person_id, SUM(weekly_cost), COUNT(*) FROM asc_services
                 WHERE person_id NOT IN (SELECT person_id FROM opt_outs) GROUP BY {select}person_id"
            ),
        )
        .await;
        let mut groups: std::collections::BTreeMap<Vec<String>, (Vec<f64>, i64)> = Default::default();
        for b in &per_person {
            for r in 0..b.num_rows() {
                let key = (0..k).map(|c| array_value_to_string(b.column(c), r).unwrap()).collect();
                let group = groups.entry(key).or_default();
                group.0.push(b.column(k + 1).as_primitive::<Float64Type>().value(r));
                group.1 += b.column(k + 2).as_primitive::<Int64Type>().value(r);
            }
        }
        // A group with 10 people is released, its sum and mean always (no one person can
        // withhold them): the truth, its flattening (the two largest people's totals counted as
        // the mean of the next three) and that mean, the noise's scale; and the group's people.
        let want: Vec<(Vec<String>, Truth)> = groups
            .iter()
            .filter(|(_, (people, _))| people.len() >= 10)
            .map(|(key, (people, rows))| {
                let mut totals = people.clone();
                totals.sort_by(|x, y| y.abs().total_cmp(&x.abs()));
                let top = totals[2..5].iter().map(|t| t.abs()).sum::<f64>() / 3.0;
                let flattened = totals[2..].iter().sum::<f64>() + (totals[0].signum() + totals[1].signum()) * top;
                let sum: f64 = people.iter().sum();
                (
                    key.clone(),
                    Truth {
                        sum,
                        flattened,
                        top,
                        rows: *rows as f64,
                        people: people.len(),
                    },
                )
            })
            .collect();
        // Twice: the second run from the kept plan, which releases the same.
        let mut runs = vec![];
        for run in 0..2 {
            let (schema, got) = query_described(&mut client, &sql).await.unwrap();
            let mut released: Vec<Released> = vec![];
            for b in &got {
                let (mean, total) = (
                    b.column(k).as_primitive::<Float64Type>(),
                    b.column(k + 1).as_primitive::<Float64Type>(),
                );
                for r in 0..b.num_rows() {
                    let key = (0..k).map(|c| array_value_to_string(b.column(c), r).unwrap()).collect();
                    released.push((key, mean.is_valid(r).then(|| (mean.value(r), total.value(r)))));
                }
            }
            released.sort_by(|a, b| a.0.cmp(&b.0));
            assert_eq!(released.len(), want.len(), "{sql} (run {run})");
            for ((key, got), (want_key, truth)) in released.iter().zip(&want) {
                assert_eq!(key, want_key, "{sql} (run {run})");
                let (m, t) = got.unwrap_or_else(|| panic!("{sql}: {key:?} withheld"));
                // Within the noise of the flattening (a draw is within 9.5 sd; sd half the mean).
                let spread = 9.5 * 0.5 * truth.top + 1e-6;
                assert!(
                    (t - truth.flattened).abs() <= spread,
                    "{sql}: {key:?} total {t}, {truth:?}"
                );
                assert!(
                    (m - truth.flattened / truth.rows).abs() <= spread / truth.rows,
                    "{sql}: {key:?} mean {m}, {truth:?}"
                );
                if truth.people >= 50 && run == 0 {
                    errors.push(((t - truth.sum) / truth.sum).abs());
                }
            }
            let withheld = (groups.len() - want.len()).to_string();
            assert_eq!(schema.metadata()["sde.groups_withheld"], withheld, "{sql} (run {run})");
            runs.push(released);
        }
        assert_eq!(runs[0], runs[1], "{sql}: the same cells, the same values");
    }
    // How far from the truth flattening and noise leave cells of 50 people or more (reported:
    // flattening takes off what the two largest people have beyond the next three).
    errors.sort_by(f64::total_cmp);
    let within = errors.iter().filter(|e| **e <= 0.02).count();
    eprintln!(
        "{} cells of 50 people or more: median relative error {:.4}, largest {:.4}, {within} within 2 %",
        errors.len(),
        errors[errors.len() / 2],
        errors[errors.len() - 1]
    );
}

/// A released group's figures from the raw data.
#[derive(Debug)]
struct Truth {
    sum: f64,
    flattened: f64,
    top: f64,
    rows: f64,
    people: usize,
}

#[tokio::test]
async fn a_repeated_statement_reuses_its_plan_until_its_grants_change() {
    let gw = spawn_gateway().await;
    let mut client = gw.client("alice", PROJECT).await;
    // Small districts × ethnicities: some groups withheld each time.
    let sql = "SELECT district, ethnicity, COUNT(*) AS n FROM patients GROUP BY 1, 2";
    let (first_schema, first) = query_described(&mut client, sql).await.unwrap();
    let kept = gw.core.plans.len();
    assert!(kept >= 1, "the plan is kept");
    let withheld = |s: &datafusion::arrow::datatypes::Schema| s.metadata()["sde.groups_withheld"].clone();
    assert_ne!(withheld(&first_schema), "0");
    // Run again, one after another and several at once: from the kept plan and, once one is
    // free, a kept physical plan (its scans, aggregates and disclosure tally reset).
    let reused = gw.core.plans.reused();
    for _ in 0..3 {
        let (again_schema, again) = query_described(&mut client, sql).await.unwrap();
        assert_eq!(gw.core.plans.len(), kept, "run again from the kept plan");
        assert_eq!(rows(&first), rows(&again));
        // Each run reports what it withheld itself: not added to an earlier run's tally.
        assert_eq!(withheld(&first_schema), withheld(&again_schema));
    }
    assert!(gw.core.plans.reused() >= reused + 2, "physical plans run again");
    let mut at_once = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let mut client = gw.client("alice", PROJECT).await;
        at_once.spawn(async move { query_described(&mut client, sql).await.unwrap() });
    }
    while let Some(run) = at_once.join_next().await {
        let (again_schema, again) = run.unwrap();
        assert_eq!(rows(&first), rows(&again));
        assert_eq!(withheld(&first_schema), withheld(&again_schema));
    }

    // A plan that depends on the time of the query is never kept.
    let timed = "SELECT date_part('year', now()) AS y, COUNT(*) AS n FROM patients GROUP BY 1";
    query(&mut client, timed).await.unwrap();
    assert_eq!(gw.core.plans.len(), kept);

    // Revoking a column makes the statement planned and checked again, and refused.
    let admin_token = gw.token("admin");
    gw.admin()
        .await
        .revoke_dataset(authed(
            sde_gateway::api::proto::GrantRequest {
                project: PROJECT.into(),
                dataset: "patients".into(),
                columns: vec!["ethnicity".into()],
            },
            &admin_token,
        ))
        .await
        .unwrap();
    let refused = query(&mut client, sql).await.unwrap_err();
    assert!(refused.message().contains("ethnicity"), "{refused:?}");
}

#[tokio::test]
async fn counts_over_several_rows_per_person_are_exact_whether_rows_settle_them_or_not() {
    let gw = spawn_gateway().await;
    let mut client = gw.client("alice", PROJECT).await;
    // Groups each with many more rows than any person has (here at most 3 referrals: their
    // people are told from rows); groups some of which rows cannot settle (their people are
    // counted: 4 ongoing referrals; one person has 18 care episodes).
    for (keys, table) in [
        ("referral_source", "ews_referrals"),
        ("outcome", "ews_referrals"),
        ("referral_source, service, outcome", "ews_referrals"),
        ("service_type, primary_support_reason", "asc_services"),
    ] {
        let sql = format!("SELECT {keys}, COUNT(*) AS n FROM {table} GROUP BY {keys}");
        let want = expected(&format!(
            "SELECT {keys}, COUNT(DISTINCT person_id) AS people, COUNT(*) AS n FROM {table}
             WHERE person_id NOT IN (SELECT person_id FROM opt_outs) GROUP BY {keys}"
        ))
        .await;
        let all_groups = raw(
            &world_data(),
            &format!(
                "SELECT COUNT(*) FROM (SELECT DISTINCT {keys} FROM {table}
                 WHERE person_id NOT IN (SELECT person_id FROM opt_outs))"
            ),
        )
        .await;
        let all_groups = all_groups[0].column(0).as_primitive::<Int64Type>().value(0) as usize;
        // Twice: the second run from the kept plan, releasing the same values.
        let mut first = None;
        for run in 0..2 {
            let (schema, got) = query_described(&mut client, &sql).await.unwrap();
            assert_released(&got, &want, &format!("{sql} (run {run})"));
            assert_eq!(
                first.get_or_insert_with(|| rows(&got)),
                &rows(&got),
                "{sql} (run {run})"
            );
            // What the first try withheld before rows proved too few is not counted.
            assert_eq!(
                schema.metadata()["sde.groups_withheld"],
                (all_groups - want.len()).to_string(),
                "{sql} (run {run})"
            );
        }
    }
}

#[tokio::test]
async fn a_pathway_question_is_answered_cell_by_cell() {
    // People referred to Early Wellbeing Support who later started an adult social care
    // service, by referral source: the join's condition is a filter, and is judged per group.
    let gw = spawn_gateway().await;
    let mut client = gw.client("alice", PROJECT).await;
    let sql = "SELECT e.referral_source, COUNT(DISTINCT e.person_id) AS people FROM ews_referrals e \
               JOIN asc_services a ON a.person_id = e.person_id AND a.start_date > e.referral_date GROUP BY 1";
    let (_, got) = query_described(&mut client, sql).await.expect("answered");
    // Per source, the true people with the join's condition and without it.
    let truth = |condition: &'static str| async move {
        let sql = format!(
            "SELECT e.referral_source, COUNT(DISTINCT e.person_id) FROM ews_referrals e
             JOIN asc_services a ON a.person_id = e.person_id {condition}
             WHERE e.person_id NOT IN (SELECT person_id FROM opt_outs) GROUP BY 1"
        );
        let mut out = std::collections::BTreeMap::new();
        for b in &raw(&world_data(), &sql).await {
            for r in 0..b.num_rows() {
                out.insert(
                    array_value_to_string(b.column(0), r).unwrap(),
                    b.column(1).as_primitive::<Int64Type>().value(r),
                );
            }
        }
        out
    };
    let want = truth("AND a.start_date > e.referral_date").await;
    let unconditioned = truth("").await;
    let mut released = 0;
    for b in &got {
        for r in 0..b.num_rows() {
            let source = array_value_to_string(b.column(0), r).unwrap();
            let people = b.column(1).as_primitive::<Int64Type>();
            if people.is_valid(r) {
                released += 1;
                // Where the condition leaves out 1 to 9 people it is of low effect: the
                // source is answered without it.
                let (with, without) = (want.get(&source).copied().unwrap_or(0), unconditioned[&source]);
                let truth = match (1..10).contains(&(without - with)) {
                    true => without,
                    false => with,
                };
                let got = people.value(r);
                assert!(got % 5 == 0 && (got - truth).abs() <= 5, "{source}: {got} for {truth}");
            }
        }
    }
    eprintln!("pathway: {released} of {} sources released", want.len());
    assert!(released >= 1, "no cell released");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_string_view_off_strings_come_back_as_plain_utf8_and_replay_the_same() {
    use datafusion::arrow::datatypes::DataType;
    let gw = spawn_gateway_with(|c| c.data.string_view = false).await;
    let mut client = gw.client("alice", PROJECT).await;
    let sql = "SELECT district, COUNT(*) AS n FROM patients GROUP BY district ORDER BY district";
    let (schema, batches) = query_described(&mut client, sql).await.unwrap();
    assert_eq!(schema.field_with_name("district").unwrap().data_type(), &DataType::Utf8);
    assert!(schema.metadata().contains_key("sde.rules"), "metadata kept: {schema:?}");
    assert_eq!(batches[0].column(0).data_type(), &DataType::Utf8);
    // Prepared statements (what ADBC sends) announce plain strings too.
    let mut prepared = client.prepare(sql.to_owned(), None).await.unwrap();
    let dataset = prepared.dataset_schema().unwrap().clone();
    assert_eq!(
        dataset.field_with_name("district").unwrap().data_type(),
        &DataType::Utf8
    );
    let info = prepared.execute().await.unwrap();
    assert_eq!(
        info.try_decode_schema()
            .unwrap()
            .field_with_name("district")
            .unwrap()
            .data_type(),
        &DataType::Utf8
    );

    // The result hash is of the result as computed: the execution record replays.
    let executed = sde_gateway::audit::verify(&gw.audit_log())
        .unwrap()
        .into_iter()
        .rfind(|r| r.entry.call == "query.execute" && r.entry.decision == "accepted")
        .unwrap();
    let mut audit = sde_gateway::api::proto::audit_service_client::AuditServiceClient::new(gw.channel().await);
    let replay = audit
        .replay(authed(
            sde_gateway::api::proto::ReplayRequest { seq: executed.seq },
            &gw.token("auditor"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(replay.confirmed, "{replay:?}");
}

/// Prepares `sql`, binds one row of `params` (if any), executes and fetches.
async fn prepared_run(
    mut client: arrow_flight::sql::client::FlightSqlServiceClient<tonic::transport::Channel>,
    sql: String,
    params: Vec<(&'static str, std::sync::Arc<dyn Array>)>,
) -> Result<Vec<RecordBatch>, tonic::Status> {
    use datafusion::arrow::datatypes::{Field, Schema};
    let mut prepared = client.prepare(sql, None).await.map_err(status)?;
    if !params.is_empty() {
        let fields: Vec<Field> = params
            .iter()
            .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
            .collect();
        let columns = params.into_iter().map(|(_, a)| a).collect();
        let batch = RecordBatch::try_new(std::sync::Arc::new(Schema::new(fields)), columns).unwrap();
        prepared.set_parameters(batch).map_err(status)?;
    }
    let info = prepared.execute().await.map_err(status)?;
    let stream = client
        .do_get(info.endpoint[0].ticket.clone().unwrap())
        .await
        .map_err(status)?;
    futures::TryStreamExt::try_collect::<Vec<RecordBatch>>(stream)
        .await
        .map_err(status)
}

#[tokio::test(flavor = "multi_thread")]
async fn bound_parameters_are_literals_checked_with_the_query_and_recorded_bound() {
    use datafusion::arrow::array::{Int64Array, StringArray};
    use std::sync::Arc;
    let gw = spawn_gateway().await;
    let mut client = gw.client("alice", PROJECT).await;
    let base = client.clone();
    let run =
        |sql: &str, params: Vec<(&'static str, Arc<dyn Array>)>| prepared_run(base.clone(), sql.to_owned(), params);
    let pretty = |b: &[RecordBatch]| {
        datafusion::arrow::util::pretty::pretty_format_batches(b)
            .unwrap()
            .to_string()
    };

    // A bound value answers as the same literal would.
    let by_age = "SELECT district, COUNT(*) AS n FROM patients WHERE age >= ? GROUP BY district ORDER BY district";
    let bound = run(by_age, vec![("age", Arc::new(Int64Array::from(vec![90])))])
        .await
        .unwrap();
    let literal = query(&mut client, &by_age.replace('?', "90")).await.unwrap();
    assert_eq!(pretty(&bound), pretty(&literal));
    let numbered = "SELECT COUNT(*) AS n FROM patients WHERE age >= $1 AND age < $2";
    let params = vec![
        ("lo", Arc::new(Int64Array::from(vec![60])) as Arc<dyn Array>),
        ("hi", Arc::new(Int64Array::from(vec![70])) as Arc<dyn Array>),
    ];
    let bound = run(numbered, params).await.unwrap();
    let literal = query(
        &mut client,
        "SELECT COUNT(*) AS n FROM patients WHERE age >= 60 AND age < 70",
    )
    .await
    .unwrap();
    assert_eq!(pretty(&bound), pretty(&literal));

    // A parameter is a value, never SQL: quotes, comments and statements stay inside one
    // string literal, and a column's name is a string, not the column.
    let tricks = ["Colchester' OR 1=1 --", "x'; DROP TABLE patients; --", "person_id"];
    for trick in tricks {
        let by_district = "SELECT COUNT(*) AS n FROM patients WHERE district = ?";
        let got = run(by_district, vec![("d", Arc::new(StringArray::from(vec![trick])))])
            .await
            .unwrap();
        assert!(
            got[0].column(0).is_null(0) || pretty(&got).contains("| 0 "),
            "{trick}: {}",
            pretty(&got)
        );
    }
    let err = run(
        "SELECT ? AS who, COUNT(*) AS n FROM patients GROUP BY 1",
        vec![("c", Arc::new(StringArray::from(vec!["person_id"])))],
    )
    .await
    .unwrap();
    assert_eq!(
        array_value_to_string(err[0].column(0), 0).unwrap(),
        "person_id",
        "the string, not the column"
    );
    // What the SQL itself asks is refused at prepare, as without parameters.
    let err = run("SELECT person_id FROM patients WHERE age > ?", vec![])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // Unbound, or bound to too few values: a clear refusal.
    let err = run(by_age, vec![]).await.unwrap_err();
    assert!(err.message().contains("bind them before executing"), "{err:?}");
    let err = run(numbered, vec![("lo", Arc::new(Int64Array::from(vec![60])))])
        .await
        .unwrap_err();
    assert!(err.message().contains("takes 2 parameters; 1 were bound"), "{err:?}");

    // The audit log holds the bound SQL, which replays without the parameters.
    let records = sde_gateway::audit::verify(&gw.audit_log()).unwrap();
    let executed = records
        .iter()
        .filter(|r| r.entry.call == "query.execute" && r.entry.decision == "accepted")
        .find_map(|r| {
            r.entry
                .sql
                .as_deref()
                .filter(|s| s.contains("DROP TABLE"))
                .map(|s| (r.seq, s.to_owned()))
        })
        .expect("the bound statement is recorded");
    assert!(
        executed.1.contains("district = 'x''; DROP TABLE patients; --'"),
        "{}",
        executed.1
    );
    let mut audit = sde_gateway::api::proto::audit_service_client::AuditServiceClient::new(gw.channel().await);
    let replay = audit
        .replay(authed(
            sde_gateway::api::proto::ReplayRequest { seq: executed.0 },
            &gw.token("auditor"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(replay.confirmed, "{replay:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn poll_flight_info_runs_a_query_with_rising_progress_and_binds_the_poll_to_its_caller() {
    use arrow_flight::flight_service_client::FlightServiceClient;
    use arrow_flight::sql::{CommandStatementQuery, ProstMessageExt};
    use prost::Message;
    let gw = spawn_gateway().await;
    let request = |message, user: &str| {
        let mut r = authed(message, &gw.token(user));
        r.metadata_mut().insert("x-sde-project", PROJECT.parse().unwrap());
        r
    };
    let mut flight = FlightServiceClient::new(gw.channel().await);
    let sql = "SELECT a.service_type, COUNT(DISTINCT a.person_id) AS people FROM asc_services a JOIN patients p ON p.person_id = a.person_id GROUP BY a.service_type ORDER BY a.service_type";
    let command = CommandStatementQuery {
        query: sql.into(),
        transaction_id: None,
    };
    let descriptor = arrow_flight::FlightDescriptor::new_cmd(command.as_any().encode_to_vec());
    let mut poll = flight
        .poll_flight_info(request(descriptor, "alice"))
        .await
        .unwrap()
        .into_inner();
    let mut seen = vec![poll.progress.unwrap()];
    assert!(poll.info.is_none() && poll.flight_descriptor.is_some(), "{poll:?}");
    // Someone else cannot follow (or take) alice's query.
    let next = poll.flight_descriptor.clone().unwrap();
    let err = flight.poll_flight_info(request(next, "dave")).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    while let Some(next) = poll.flight_descriptor.clone() {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        poll = flight
            .poll_flight_info(request(next, "alice"))
            .await
            .unwrap()
            .into_inner();
        seen.push(poll.progress.unwrap());
    }
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "progress never goes back: {seen:?}"
    );
    assert_eq!(*seen.last().unwrap(), 1.0, "{seen:?}");
    let info = poll.info.unwrap();
    let ticket = info.endpoint[0].ticket.clone().unwrap();
    let mut client = gw.client("alice", PROJECT).await;
    let stream = client.do_get(ticket).await.unwrap();
    let polled: Vec<RecordBatch> = futures::TryStreamExt::try_collect(stream).await.unwrap();
    let direct = query(&mut client, sql).await.unwrap();
    let pretty = |b: &[RecordBatch]| {
        datafusion::arrow::util::pretty::pretty_format_batches(b)
            .unwrap()
            .to_string()
    };
    assert_eq!(pretty(&polled), pretty(&direct));

    // A refused query is refused at the poll that finds it done, with its rule.
    let refused = CommandStatementQuery {
        query: "SELECT person_id FROM patients".into(),
        transaction_id: None,
    };
    let descriptor = arrow_flight::FlightDescriptor::new_cmd(refused.as_any().encode_to_vec());
    let mut poll = flight
        .poll_flight_info(request(descriptor, "alice"))
        .await
        .unwrap()
        .into_inner();
    let err = loop {
        let next = poll.flight_descriptor.clone().unwrap();
        match flight.poll_flight_info(request(next, "alice")).await {
            Ok(p) => poll = p.into_inner(),
            Err(e) => break e,
        }
    };
    assert!(err.message().starts_with("safe-outputs/aggregate-only"), "{err:?}");
}
