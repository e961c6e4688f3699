//! The auditor's offline check: `sde-gateway audit verify --dir --public-key` on the log a real
//! gateway wrote.

use std::path::Path;
use std::process::Command;

use sde_gateway::api::proto::audit_service_client::AuditServiceClient;
use sde_gateway::api::proto::{
    ConsistencyProofRequest, InclusionProofRequest, ListRecordsRequest, ListRecordsResponse, ReplayRequest,
};
use sde_gateway::audit::{Checkpoint, PublicKey, checkpoint};
use tonic::{Code, Status};

use crate::helpers::*;

#[tokio::test]
async fn audit_verify_passes_an_intact_log_and_names_the_first_edited_record() {
    // A checkpoint after every record, so the live log is signed up to its last record.
    let gw = spawn_gateway_with(|c| c.audit.checkpoint_records = 1).await;
    gw.query_as("alice", PROJECT, "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex")
        .await
        .unwrap();
    gw.query_as("dave", PROJECT, "SELECT COUNT(*) FROM patients")
        .await
        .unwrap_err();
    let verify = || {
        Command::new(env!("CARGO_BIN_EXE_sde-gateway"))
            .args(["audit", "verify", "--dir"])
            .arg(&gw.config.audit.dir)
            .arg("--public-key")
            .arg(gw.path(sde_gateway::demo::AUDIT_PUBLIC_KEY))
            .output()
            .unwrap()
    };
    let ok = verify();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("intact: 4 records"));

    // Rewrite history: make dave's refusal look accepted.
    let log = gw.audit_log();
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::write(&log, text.replacen("\"refused\"", "\"accepted\"", 1)).unwrap();
    let bad = verify();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("record 3"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

use sde_gateway::api::audit_client::Client as AuditClient;
use sde_gateway::api::client::Bearer;

/// An AuditService client over TLS with `user`'s token (none for `None`).
async fn audit_client(gw: &TestGateway, user: Option<&str>) -> AuditClient {
    let auth = match user {
        Some(u) => Bearer::token(&gw.token(u)).unwrap(),
        None => Bearer::anonymous(),
    };
    AuditServiceClient::with_interceptor(gw.channel().await, auth)
}

/// A private copy of the demo data, which a test may change.
fn copy_data(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_data(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Runs a query as alice and returns its receipt (seq, hash) from the response headers.
async fn released(gw: &TestGateway, sql: &str) -> (u64, String) {
    let mut alice = gw.client("alice", PROJECT).await;
    let info = alice.execute(sql.to_owned(), None).await.unwrap();
    let stream = alice.do_get(info.endpoint[0].ticket.clone().unwrap()).await.unwrap();
    let header = |name: &str| stream.headers().get(name).unwrap().to_str().unwrap().to_owned();
    let receipt = (header("x-sde-audit-seq").parse().unwrap(), header("x-sde-audit-hash"));
    let _: Vec<_> = futures::TryStreamExt::try_collect(stream).await.unwrap();
    receipt
}

fn run_cli(args: Vec<std::ffi::OsString>) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sde-gateway"))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test]
async fn auditors_prove_and_replay_releases_refuse_changed_data_and_every_read_is_recorded() {
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_owned();
    let gw = spawn_gateway_with(|c| {
        c.audit.checkpoint_records = 1;
        copy_data(&c.data.dir, &data_dir);
        c.data.dir = data_dir.clone();
    })
    .await;
    let public = PublicKey::load(&gw.path(sde_gateway::demo::AUDIT_PUBLIC_KEY)).unwrap();
    let sql = "SELECT district, sex, COUNT(*) AS n, AVG(age) AS mean_age FROM patients GROUP BY district, sex";
    let (seq, hash) = released(&gw, sql).await;
    let mut auditor = audit_client(&gw, Some("auditor")).await;

    // Replay: same data, same rules, same result.
    let replay = auditor.replay(ReplayRequest { seq }).await.unwrap().into_inner();
    assert!(replay.confirmed, "{replay:?}");
    assert_eq!(replay.recorded_result_hash, replay.replayed_result_hash);
    assert!(replay.plan_matches, "{replay:?}");

    // Inclusion of the receipt's record in a signed checkpoint, checked with the public key only.
    let proof = auditor
        .get_inclusion_proof(InclusionProofRequest { seq, tree_size: 0 })
        .await
        .unwrap()
        .into_inner();
    let record = proof.record.unwrap();
    assert_eq!(record.hash, hash);
    assert_eq!(record.sql, sql);
    assert!(record.snapshot.contains_key("patients") && record.snapshot.contains_key("opt_outs"));
    let signed = proof.checkpoint.expect("checkpoint of that size");
    let signed = Checkpoint {
        size: signed.size,
        root: signed.root,
        time: signed.time,
        signature: signed.signature,
    };
    assert!(signed.signed_by(&public));
    assert!(checkpoint::verify_inclusion(
        signed.size,
        &signed.root,
        seq,
        &record.hash,
        &proof.proof
    ));
    let old = seq + 1;
    let first = auditor
        .get_inclusion_proof(InclusionProofRequest { seq, tree_size: old })
        .await
        .unwrap()
        .into_inner()
        .checkpoint
        .expect("a checkpoint after every record");
    let consistency = auditor
        .get_consistency_proof(ConsistencyProofRequest {
            old_size: old,
            new_size: signed.size,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(checkpoint::verify_consistency(
        old,
        &first.root,
        signed.size,
        &signed.root,
        &consistency.proof
    ));

    // Only auditors read the log.
    let code = |r: Result<tonic::Response<ListRecordsResponse>, Status>| r.unwrap_err().code();
    let all = ListRecordsRequest::default();
    let mut alice = audit_client(&gw, Some("alice")).await;
    assert_eq!(code(alice.list_records(all.clone()).await), Code::PermissionDenied);
    let mut anonymous = audit_client(&gw, None).await;
    assert_eq!(code(anonymous.list_records(all.clone()).await), Code::Unauthenticated);
    let bad_time = ListRecordsRequest {
        from_time: "yesterday".into(),
        ..Default::default()
    };
    assert_eq!(code(auditor.list_records(bad_time).await), Code::FailedPrecondition);

    // The query's execution record (durable before its FlightInfo went out) describes the same
    // result, so it replays too: what an auditor has if a power cut took the release's record.
    let execution = auditor
        .replay(ReplayRequest { seq: seq - 1 })
        .await
        .unwrap()
        .into_inner();
    assert!(execution.confirmed, "{execution:?}");
    assert_eq!(execution.recorded_result_hash, replay.recorded_result_hash);

    // A record that is not a query cannot be replayed.
    let err = auditor
        .replay(ReplayRequest { seq: replay.replay_seq })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("not an executed or released query"),
        "{}",
        err.message()
    );

    // The CLI replays it too, against the running server.
    let connection = |args: &[&str]| -> Vec<std::ffi::OsString> {
        let mut v: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
        v.extend(["--server".into(), format!("https://{}", gw.addr).into()]);
        v.extend(["--ca".into(), gw.path("tls/ca.pem").into()]);
        v.extend(["--token-file".into(), gw.path("tokens/auditor.jwt").into()]);
        v
    };
    let args = connection(&["audit", "replay", "--seq", &seq.to_string()]);
    let out = tokio::task::spawn_blocking(move || run_cli(args)).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("confirmed"));
    let args = connection(&["audit", "show", "--user", "alice", "--decision", "accepted"]);
    let out = tokio::task::spawn_blocking(move || run_cli(args)).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&hash));

    // The data changes (a new file in patients/): replay refuses and says why.
    let patients = data.path().join("patients");
    let file = std::fs::read_dir(&patients).unwrap().next().unwrap().unwrap().path();
    std::fs::copy(&file, patients.join("zz-late-arrival.parquet")).unwrap();
    let err = auditor.replay(ReplayRequest { seq }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("dataset patients has changed"),
        "{}",
        err.message()
    );

    // Every audit call above, allowed or not, is in the log.
    let records = auditor.list_records(all).await.unwrap().into_inner().records;
    let calls: Vec<(&str, &str, &str)> = records
        .iter()
        .filter(|r| r.call.starts_with("audit."))
        .map(|r| (r.call.as_str(), r.user.as_str(), r.decision.as_str()))
        .collect();
    for expected in [
        ("audit.replay", "auditor", "accepted"),
        ("audit.inclusion", "auditor", "accepted"),
        ("audit.consistency", "auditor", "accepted"),
        ("audit.list", "alice", "refused"),
        ("audit.list", "", "refused"),
        ("audit.replay", "auditor", "refused"),
        ("audit.list", "auditor", "accepted"),
    ] {
        assert!(calls.contains(&expected), "{expected:?} not in {calls:?}");
    }
}

#[tokio::test]
async fn when_the_audit_log_cannot_record_nothing_is_released() {
    let gw = spawn_gateway().await;
    let mut alice = gw.client("alice", PROJECT).await;
    let info = alice
        .execute("SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex".into(), None)
        .await
        .unwrap();
    // The log stops taking records (as after a failed fsync): the computed result stays unreleased.
    gw.core.audit.close().await.unwrap();
    let err = status(
        alice
            .do_get(info.endpoint[0].ticket.clone().unwrap())
            .await
            .err()
            .unwrap(),
    );
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("nothing was released"), "{}", err.message());
    let err = gw
        .query_as("alice", PROJECT, "SELECT COUNT(*) AS n FROM patients")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
}

#[tokio::test]
async fn a_query_abandoned_while_running_is_recorded_as_cancelled() {
    use sde_gateway::gateway::CallContext;
    use sde_gateway::identity::Subject;
    let gw = spawn_gateway().await;
    let call = CallContext {
        authenticated: Ok(Subject { user: "alice".into() }),
        project: Some(PROJECT.into()),
        client_tool: None,
    };
    let sql = "SELECT district, COUNT(*) AS n FROM patients GROUP BY district";
    // Poll the query once (it is then waiting on execution) and drop it, as tonic does when the
    // client goes away.
    let mut query = Box::pin(gw.core.plan_query(&call, sql));
    assert!(
        futures::poll!(query.as_mut()).is_pending(),
        "the query is still running"
    );
    drop(query);
    gw.core.audit.close().await.unwrap();
    let records = sde_gateway::audit::verify(&gw.audit_log()).unwrap();
    let last = &records.last().unwrap().entry;
    assert_eq!(
        (last.decision.as_str(), last.call.as_str()),
        ("cancelled", "query.execute")
    );
    assert_eq!(last.user.as_deref(), Some("alice"));
    assert_eq!(last.sql.as_deref(), Some(sql));
}

#[test]
fn audit_show_refuses_an_unknown_decision_naming_the_valid_ones() {
    let out = Command::new(env!("CARGO_BIN_EXE_sde-gateway"))
        .args(["audit", "show", "--decision", "acepted"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    for valid in sde_gateway::api::audit_client::DECISIONS {
        assert!(stderr.contains(valid), "{stderr}");
    }
}

#[tokio::test]
async fn a_baseline_computed_once_serves_other_conditions_and_replays_as_computed_afresh() {
    let gw = spawn_gateway().await;
    let mut auditor = audit_client(&gw, Some("auditor")).await;
    // The same groups under different conditions share the baseline (the groups without them).
    let first = "SELECT district, sex, COUNT(*) AS n FROM patients WHERE age >= 65 GROUP BY 1, 2";
    let second = "SELECT district, sex, COUNT(*) AS n FROM patients WHERE age < 30 GROUP BY 1, 2";
    assert!(gw.core.baselines.is_empty());
    let (seq, _) = released(&gw, first).await;
    assert_eq!(gw.core.baselines.len(), 1, "the baseline is kept");
    let (second_seq, _) = released(&gw, second).await;
    assert_eq!(gw.core.baselines.len(), 1, "and used again, not computed twice");
    // Replays compute every baseline afresh: the released results are what fresh ones give.
    for seq in [seq, second_seq] {
        let replay = auditor.replay(ReplayRequest { seq }).await.unwrap().into_inner();
        assert!(replay.confirmed, "{replay:?}");
        assert_eq!(replay.recorded_result_hash, replay.replayed_result_hash);
    }
    // Other groups make another baseline.
    released(
        &gw,
        "SELECT district, COUNT(*) AS n FROM patients WHERE age >= 65 GROUP BY 1",
    )
    .await;
    assert_eq!(gw.core.baselines.len(), 2);
}
