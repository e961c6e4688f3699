//! Safe Settings against a hostile researcher: every query of the hostile corpus, sent through
//! the real server, is answered or refused with its `safe-…` rule while the same server keeps
//! answering another user; the audit log verifies afterwards and holds each call.

use sde_gateway::audit::{PublicKey, verify_dir};
use tonic::Code;

use crate::corpus::{Expect, hostile, ordinary};
use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hostile_query_is_answered_or_refused_and_the_server_stays_up() {
    let gw = spawn_gateway_with(|c| c.limits.user_queries_per_minute = 10_000).await;
    let corpus = hostile();
    for (name, sql, expect) in &corpus {
        let outcome = gw.query_as("alice", PROJECT, sql).await;
        match (expect, &outcome) {
            (Expect::Refused(rule), Err(status)) => {
                assert!(status.message().starts_with(rule), "{name}: {}", status.message());
                assert_ne!(status.code(), Code::Internal, "{name}");
            }
            (Expect::Answered, Ok(_)) => {}
            (Expect::Either, Ok(_)) => {}
            (Expect::Either, Err(status)) => {
                assert!(
                    matches!(
                        status.code(),
                        Code::InvalidArgument | Code::ResourceExhausted | Code::DeadlineExceeded
                    ),
                    "{name}: {:?} {}",
                    status.code(),
                    status.message()
                );
            }
            (expect, outcome) => panic!(
                "{name}: expected {expect:?}, got {:?}",
                outcome
                    .as_ref()
                    .map(|_| "an answer")
                    .map_err(|s| s.message().to_owned())
            ),
        }
        // Another user's ordinary query is still answered.
        gw.query_as("alice", PROJECT, ordinary()[0])
            .await
            .expect("the server is still up");
    }
    // Every call is on record, and the log verifies.
    let key = PublicKey::load(&gw.path(sde_gateway::demo::AUDIT_PUBLIC_KEY)).unwrap();
    let verified = verify_dir(&gw.config.audit.dir, &key).unwrap();
    for (name, sql, _) in &corpus {
        let prefix: String = sql.chars().take(200).collect();
        assert!(
            verified
                .records
                .iter()
                .any(|r| r.entry.call == "query.execute"
                    && r.entry.sql.as_deref().is_some_and(|s| s.starts_with(&prefix))),
            "{name} is not on record"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_at_the_limits_run() {
    let gw = spawn_gateway().await;
    let l = sde_gateway::config::LimitsConfig::default();
    // The deepest chain admitted (the WHERE clause and the comparison are levels too), as one
    // condition (an aggregate's rows pass at most 3).
    let terms: Vec<String> = (0..l.max_expression_depth / 2).map(|i| format!("age = {i}")).collect();
    let sql = format!("SELECT COUNT(*) FROM patients WHERE {}", terms.join(" OR "));
    gw.query_as("alice", PROJECT, &sql)
        .await
        .expect("a chain at the depth limit runs");
    let branches: Vec<String> = (0..l.max_case_branches)
        .map(|i| format!("WHEN age = {i} THEN {i}"))
        .collect();
    let sql = format!("SELECT SUM(CASE {} END) FROM patients", branches.join(" "));
    gw.query_as("alice", PROJECT, &sql)
        .await
        .expect("a CASE at the branch limit runs");
    let nested = format!("{}age{}", "(".repeat(40), ")".repeat(40));
    let sql = format!("SELECT COUNT(*) FROM patients WHERE {nested} > 40");
    gw.query_as("alice", PROJECT, &sql).await.expect("40 parentheses run");
    let codes: Vec<String> = (0..10_000).map(|i| format!("'{:09}'", 100_000_000 + i)).collect();
    let sql = format!(
        "SELECT COUNT(*) FROM patients WHERE district NOT IN ({})",
        codes.join(", ")
    );
    gw.query_as("alice", PROJECT, &sql)
        .await
        .expect("a 10 000-code list runs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_past_the_cap_is_null_not_built() {
    let gw = spawn_gateway().await;
    // 20 000 people × 1e8 copies would be gigabytes per batch: each value is NULL instead, so
    // the sum of lengths is over no values and is NULL (not a crash, not an error).
    let batches = gw
        .query_as(
            "alice",
            PROJECT,
            "SELECT SUM(length(repeat(district, 100000000))) AS n FROM patients",
        )
        .await
        .unwrap();
    let column = batches[0].column(0);
    assert!(column.is_null(0), "{column:?}");
    // Short results of the same functions are unchanged.
    let batches = gw
        .query_as(
            "alice",
            PROJECT,
            "SELECT SUM(length(repeat(district, 2))) AS n FROM patients",
        )
        .await
        .unwrap();
    assert!(!batches[0].column(0).is_null(0));
}
