//! Output checking through the real server (ReviewService, the CLI and Flight SQL): a result
//! with withheld cells is requested for release by its author, reviewed by two output checkers
//! who see the true values, returned once and resubmitted, released and fetched; the author,
//! a project member and a single approval cannot release it; a rejected request stays
//! rejected; the release is charged to the budget and `audit replay` reproduces it.

use std::process::Command;

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::Int64Type;
use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::util::display::array_value_to_string;
use sde_gateway::api::proto as pb;
use sde_gateway::api::proto::audit_service_client::AuditServiceClient;
use sde_gateway::api::proto::review_service_client::ReviewServiceClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::helpers::*;

/// Districts of the oldest people: some groups have fewer than 10 people and are withheld.
const OLDEST: &str = "SELECT district, COUNT(*) AS n FROM patients WHERE age >= 90 GROUP BY district ORDER BY district";

async fn service(gw: &TestGateway) -> ReviewServiceClient<Channel> {
    ReviewServiceClient::new(gw.channel().await)
}

/// Runs `sql` as alice: the result and its receipt.
async fn result_of(gw: &TestGateway, sql: &str) -> (Vec<RecordBatch>, u64) {
    let mut alice = gw.client("alice", PROJECT).await;
    let info = alice.execute(sql.to_owned(), None).await.unwrap();
    let stream = alice.do_get(info.endpoint[0].ticket.clone().unwrap()).await.unwrap();
    let seq = stream
        .headers()
        .get("x-sde-audit-seq")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    (futures::TryStreamExt::try_collect(stream).await.unwrap(), seq)
}

/// district → n, NULL as None.
fn counts(batches: &[RecordBatch]) -> Vec<(String, Option<i64>)> {
    batches
        .iter()
        .flat_map(|b| {
            let (d, n) = (b.column(0), b.column(1).as_primitive::<Int64Type>());
            (0..b.num_rows())
                .map(|i| {
                    (
                        array_value_to_string(d, i).unwrap(),
                        (!n.is_null(i)).then(|| n.value(i)),
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

async fn decide(
    svc: &mut ReviewServiceClient<Channel>,
    gw: &TestGateway,
    who: &str,
    id: u64,
    decision: &str,
    comment: &str,
) -> Result<pb::ReleaseRequest, tonic::Status> {
    let m = pb::ReviewDecision {
        id,
        decision: decision.into(),
        comment: comment.into(),
    };
    svc.decide_review(authed(m, &gw.token(who)))
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_withheld_result_is_reviewed_by_two_checkers_released_fetched_and_replayed() {
    let gw = spawn_gateway().await;
    let mut svc = service(&gw).await;
    let (author_saw, receipt) = result_of(&gw, OLDEST).await;
    let author_saw = counts(&author_saw);

    // A justification is needed; only the author may ask; a result released in full has
    // nothing to review.
    let ask = |receipt, why: &str| pb::NewReleaseRequest {
        receipt,
        justification: why.into(),
    };
    let err = svc
        .request_release(authed(ask(receipt, " "), &gw.token("alice")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = svc
        .request_release(authed(ask(receipt, "paper"), &gw.token("dave")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let (_, full) = result_of(&gw, "SELECT COUNT(*) AS n FROM patients").await;
    let err = svc
        .request_release(authed(ask(full, "paper"), &gw.token("alice")))
        .await
        .unwrap_err();
    assert!(err.message().contains("nothing was withheld"), "{err:?}");

    let why = "Table 2 of the EWS evaluation: district counts of people aged 90+";
    let request = svc
        .request_release(authed(ask(receipt, why), &gw.token("alice")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((request.state.as_str(), request.round), ("submitted", 1));
    let id = request.id;
    // Someone else's request is not found, and its project is not named.
    let err = svc
        .withdraw_release(authed(pb::ReleaseRef { id }, &gw.token("dave")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(!err.message().contains(PROJECT), "{err:?}");

    // Neither the author nor a member of the project may review, even holding the role.
    let err = svc
        .show_review(authed(pb::ReleaseRef { id }, &gw.token("alice")))
        .await
        .unwrap_err();
    assert!(err.message().starts_with("safe-people/role-output-checker"), "{err:?}");
    let mut admin = gw.admin().await;
    let users = admin
        .list_users(authed(pb::ListUsersRequest::default(), &gw.token("admin")))
        .await
        .unwrap()
        .into_inner()
        .users;
    for id in ["alice", "dave"] {
        let mut user = users.iter().find(|u| u.id == id).unwrap().clone();
        user.roles.push("output-checker".into());
        admin.update_user(authed(user, &gw.token("admin"))).await.unwrap();
    }
    let member = pb::MemberRequest {
        project: PROJECT.into(),
        user: "dave".into(),
    };
    let held = admin
        .add_member(authed(member, &gw.token("admin")))
        .await
        .unwrap()
        .into_inner();
    crate::changes::sign_all(&gw, held.pending_changes[0].id).await;
    for who in ["alice", "dave"] {
        let err = svc
            .show_review(authed(pb::ReleaseRef { id }, &gw.token(who)))
            .await
            .unwrap_err();
        assert!(
            err.message().starts_with("safe-projects/conflict-of-interest"),
            "{err:?}"
        );
        let err = decide(&mut svc, &gw, who, id, "approve", "").await.unwrap_err();
        assert!(
            err.message().starts_with("safe-projects/conflict-of-interest"),
            "{err:?}"
        );
    }

    // A checker sees it in the queue, with every cell's true value and outcome.
    let queue = svc
        .list_releases(authed(pb::ListReleasesRequest { queue: true }, &gw.token("checker")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(queue.requests.iter().map(|r| r.id).collect::<Vec<_>>(), vec![id]);
    let view = svc
        .show_review(authed(pb::ReleaseRef { id }, &gw.token("checker")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(view.key_columns, vec!["district".to_owned()]);
    let mut withheld = 0;
    for row in &view.rows {
        let cell = &row.cells[0];
        let district = &row.keys[0];
        // One row a person in patients: the true count is the group's people.
        assert_eq!(row.people, cell.true_value, "{row:?}");
        let truth: i64 = cell.true_value.parse().unwrap();
        let release: i64 = cell.release_value.parse().unwrap();
        match author_saw.iter().find(|(d, _)| d == district) {
            Some((_, Some(n))) => {
                assert_eq!(cell.outcome, "released");
                assert_eq!((cell.author_value.clone(), release), (n.to_string(), *n));
                assert!(truth >= 10 && (truth - release).abs() <= 5, "{row:?}");
            }
            _ => {
                withheld += 1;
                assert!(cell.outcome.starts_with("withheld"), "{row:?}");
                assert_eq!(cell.author_value, "NULL");
                assert!((1..10).contains(&truth), "{row:?}");
            }
        }
    }
    assert!(withheld > 0, "the test needs a withheld cell: {view:?}");
    assert_eq!(view.groups_withheld + view.cells_withheld, withheld);

    // One approval is not enough; the same checker cannot approve twice; the author cannot
    // fetch before it is reviewed.
    let r = decide(&mut svc, &gw, "checker", id, "approve", "").await.unwrap();
    assert_eq!(r.state, "partially_reviewed");
    let err = decide(&mut svc, &gw, "checker", id, "approve", "").await.unwrap_err();
    assert!(err.message().contains("already reviewed"), "{err:?}");
    let err = svc
        .fetch_release(authed(pb::ReleaseRef { id }, &gw.token("alice")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // Returned (a comment is needed), resubmitted: a new round, in which the first approval
    // no longer counts.
    let err = decide(&mut svc, &gw, "checker2", id, "return", "").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let r = decide(
        &mut svc,
        &gw,
        "checker2",
        id,
        "return",
        "Say which table of the paper this is",
    )
    .await
    .unwrap();
    assert_eq!(r.state, "returned");
    let m = pb::Resubmission {
        id,
        justification: format!("{why}; Table 2 of the paper"),
    };
    let r = svc
        .resubmit_release(authed(m, &gw.token("alice")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.state.as_str(), r.round), ("submitted", 2));
    assert_eq!(
        decide(&mut svc, &gw, "checker", id, "approve", "").await.unwrap().state,
        "partially_reviewed"
    );
    assert_eq!(
        decide(&mut svc, &gw, "checker2", id, "approve", "ok")
            .await
            .unwrap()
            .state,
        "reviewed"
    );

    // Only the author fetches; the release carries the withheld cells and leaves the others
    // as they were.
    let err = svc
        .fetch_release(authed(pb::ReleaseRef { id }, &gw.token("dave")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let released = svc
        .fetch_release(authed(pb::ReleaseRef { id }, &gw.token("alice")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(released.request.as_ref().unwrap().state, "released");
    let batches: Vec<RecordBatch> = StreamReader::try_new(std::io::Cursor::new(&released.arrow_ipc), None)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(batches[0].schema().metadata().contains_key("sde.budget_remaining"));
    let release = counts(&batches);
    for row in &view.rows {
        let got = release.iter().find(|(d, _)| *d == row.keys[0]).unwrap().1;
        assert_eq!(
            got.map(|n| n.to_string()).unwrap_or("NULL".into()),
            row.cells[0].release_value
        );
    }
    assert!(
        release.iter().filter(|(_, n)| n.is_some()).count() > author_saw.iter().filter(|(_, n)| n.is_some()).count()
    );

    // Fetched again: the same result, without a second release.
    let again = svc
        .fetch_release(authed(pb::ReleaseRef { id }, &gw.token("alice")))
        .await
        .unwrap()
        .into_inner();
    let again_batches: Vec<RecordBatch> = StreamReader::try_new(std::io::Cursor::new(&again.arrow_ipc), None)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(counts(&again_batches), release);
    assert_eq!(again.request.unwrap().released_receipt, released.receipt_seq);

    // The auditor replays the release byte for byte.
    let mut audit = AuditServiceClient::new(gw.channel().await);
    let replay = audit
        .replay(authed(
            pb::ReplayRequest {
                seq: released.receipt_seq,
            },
            &gw.token("auditor"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(replay.confirmed, "{replay:?}");
    let calls: Vec<String> = std::fs::read_to_string(gw.audit_log())
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["call"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    for call in [
        "release.request",
        "review.show",
        "review.decide",
        "release.resubmit",
        "release.publish",
        "release.fetch",
    ] {
        assert!(calls.iter().any(|c| c == call), "no {call} record");
    }
    assert_eq!(calls.iter().filter(|c| *c == "release.publish").count(), 1);
    let key = sde_gateway::audit::PublicKey::load(&gw.path(sde_gateway::demo::AUDIT_PUBLIC_KEY)).unwrap();
    sde_gateway::audit::verify_dir(&gw.config.audit.dir, &key).expect("the log verifies");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rejected_request_is_final_and_the_cli_drives_the_queue() {
    let gw = spawn_gateway().await;
    let mut svc = service(&gw).await;
    let (_, receipt) = result_of(&gw, OLDEST).await;
    let ask = pb::NewReleaseRequest {
        receipt,
        justification: "exploration".into(),
    };
    let id = svc
        .request_release(authed(ask, &gw.token("alice")))
        .await
        .unwrap()
        .into_inner()
        .id;

    let cli = |user: &str, args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_sde-gateway"))
            .args(args)
            .arg("--addr")
            .arg(format!("https://localhost:{}", gw.addr.port()))
            .arg("--ca")
            .arg(gw.path("tls/ca.pem"))
            .arg("--token")
            .arg(gw.path(&format!("tokens/{user}.jwt")))
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = cli("checker", &["review", "list"]);
    assert!(
        ok && out.contains("ews-asc-linkage") && out.contains("submitted"),
        "{out}"
    );
    let (ok, out) = cli("checker", &["review", "show", &id.to_string()]);
    assert!(
        ok && out.contains("withheld: group of fewer than 10 people") || out.contains("withheld: fewer"),
        "{out}"
    );
    let (ok, out) = cli(
        "checker",
        &[
            "review",
            "--json",
            "reject",
            &id.to_string(),
            "--comment",
            "exploratory output is not released",
        ],
    );
    assert!(ok, "{out}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["state"], "rejected");

    let (ok, out) = cli("admin", &["admin", "--json", "project", PROJECT]);
    assert!(ok, "{out}");
    let project: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(project["id"], PROJECT);
    let (ok, out) = cli("alice", &["release", "status", &id.to_string()]);
    assert!(
        ok && out.contains("release request") && out.contains("rejected") && out.contains("exploratory output"),
        "{out}"
    );
    let (ok, out) = cli("alice", &["release", "fetch", &id.to_string()]);
    assert!(!ok && out.contains("is rejected"), "{out}");
    let err = decide(&mut svc, &gw, "checker2", id, "approve", "").await.unwrap_err();
    assert!(err.message().contains("is rejected"), "{err:?}");
    let err = svc
        .withdraw_release(authed(pb::ReleaseRef { id }, &gw.token("alice")))
        .await
        .unwrap_err();
    assert!(err.message().contains("is rejected"), "{err:?}");
}
