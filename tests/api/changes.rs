//! Board review of changes, through the real server: a grant or a member added to an active
//! project waits until its three board roles have signed it, and only then changes what the
//! project can see; one refusal drops it; narrowing changes apply at once.

use sde_gateway::api::proto as pb;
use tonic::Code;

use crate::helpers::*;

const GP: &str = "SELECT COUNT(DISTINCT person_id) AS people FROM gp_events";

fn sign(change: u64, role: &str, reject: bool) -> pb::ChangeDecision {
    pb::ChangeDecision {
        project: PROJECT.into(),
        change,
        role: role.into(),
        reject,
        comment: if reject {
            "not in the approved protocol".into()
        } else {
            String::new()
        },
    }
}

/// The three board roles and the demo users who hold them.
pub const BOARD: [(&str, &str); 3] = [
    ("guardian", "board:caldicott_guardian"),
    ("ccio", "board:ccio"),
    ("public-rep", "board:public_representative"),
];

/// Signs `change` to the demo project in all three board roles.
pub async fn sign_all(gw: &TestGateway, change: u64) -> pb::Project {
    let mut admin = gw.admin().await;
    let mut last = None;
    for (user, role) in BOARD {
        last = Some(
            admin
                .sign_change(authed(sign(change, role, false), &gw.token(user)))
                .await
                .unwrap()
                .into_inner(),
        );
    }
    last.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn widening_an_active_project_waits_for_its_board_and_narrowing_does_not() {
    let gw = spawn_gateway().await;
    let mut admin = gw.admin().await;
    let token = gw.token("admin");
    assert!(
        gw.query_as("alice", PROJECT, GP).await.is_err(),
        "gp_events is not granted"
    );

    // A grant that could never apply is refused at once; a good one is held, not applied.
    let grant = |columns: &[&str]| pb::GrantRequest {
        project: PROJECT.into(),
        dataset: "gp_events".into(),
        columns: columns.iter().map(|c| c.to_string()).collect(),
    };
    let err = admin
        .grant_dataset(authed(grant(&["no_such_column"]), &token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let p = admin
        .grant_dataset(authed(grant(&["person_id", "snomed_code"]), &token))
        .await
        .unwrap()
        .into_inner();
    assert!(p.grants.iter().all(|g| g.dataset != "gp_events"), "{p:?}");
    assert_eq!(p.pending_changes.len(), 1, "{p:?}");
    let change = &p.pending_changes[0];
    assert_eq!(change.change, "grant gp_events: person_id, snomed_code");
    assert_eq!(change.requested_by, "admin");
    let id = change.id;
    assert!(gw.query_as("alice", PROJECT, GP).await.is_err(), "held, not applied");

    // It waits in each board member's review queue, in the role they hold.
    let review = sde_gateway::api::proto::review_service_client::ReviewServiceClient::new(gw.channel().await);
    let waiting = |user: &str| {
        let request = authed(pb::ListReleasesRequest { queue: true }, &gw.token(user));
        let mut review = review.clone();
        async move { review.list_releases(request).await.unwrap().into_inner().changes }
    };
    let queued = waiting("guardian").await;
    assert_eq!(queued.len(), 1, "{queued:?}");
    assert_eq!(
        (queued[0].change, queued[0].role.as_str(), queued[0].project.as_str()),
        (id, "board:caldicott_guardian", PROJECT)
    );
    let err = review
        .clone()
        .list_releases(authed(pb::ListReleasesRequest { queue: true }, &gw.token("alice")))
        .await
        .unwrap_err();
    assert!(err.message().starts_with("safe-people/role-output-checker"), "{err:?}");

    // Only in a board role the signer holds; not twice in one role.
    let err = admin
        .sign_change(authed(sign(id, "board:ccio", false), &gw.token("guardian")))
        .await
        .unwrap_err();
    assert!(err.message().starts_with("safe-projects/board-role"), "{err:?}");
    let err = admin
        .sign_change(authed(sign(id, "board:ccio", false), &gw.token("alice")))
        .await
        .unwrap_err();
    assert!(err.message().starts_with("safe-projects/board-role"), "{err:?}");
    for (i, (user, role)) in BOARD.into_iter().take(2).enumerate() {
        let p = admin
            .sign_change(authed(sign(id, role, false), &gw.token(user)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(p.pending_changes[0].signatures.len(), i + 1);
        assert!(
            gw.query_as("alice", PROJECT, GP).await.is_err(),
            "{i} signatures are not enough"
        );
    }
    let err = admin
        .sign_change(authed(sign(id, BOARD[1].1, false), &gw.token(BOARD[1].0)))
        .await
        .unwrap_err();
    assert!(err.message().contains("already signed"), "{err:?}");
    assert!(
        waiting("guardian").await.is_empty(),
        "signed: no longer in the guardian's queue"
    );
    assert_eq!(waiting("public-rep").await.len(), 1);

    // The third signature applies it.
    let (user, role) = BOARD[2];
    let p = admin
        .sign_change(authed(sign(id, role, false), &gw.token(user)))
        .await
        .unwrap()
        .into_inner();
    assert!(p.pending_changes.is_empty());
    assert!(p.grants.iter().any(|g| g.dataset == "gp_events"), "{p:?}");
    gw.query_as("alice", PROJECT, GP)
        .await
        .expect("granted after the board signed");
    let err = admin
        .sign_change(authed(sign(id, role, false), &gw.token(user)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // A member added waits too; one refusal drops the change.
    let member = pb::MemberRequest {
        project: PROJECT.into(),
        user: "dave".into(),
    };
    let p = admin.add_member(authed(member, &token)).await.unwrap().into_inner();
    assert!(!p.members.contains(&"dave".to_owned()));
    let id = p.pending_changes[0].id;
    assert_eq!(p.pending_changes[0].change, "add member dave");
    let err = gw
        .query_as("dave", PROJECT, "SELECT COUNT(*) AS n FROM patients")
        .await
        .unwrap_err();
    assert!(err.message().starts_with("safe-projects/not-a-member"), "{err:?}");
    let p = admin
        .sign_change(authed(
            sign(id, "board:public_representative", true),
            &gw.token("public-rep"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        p.pending_changes.is_empty() && !p.members.contains(&"dave".to_owned()),
        "{p:?}"
    );
    let err = admin
        .sign_change(authed(sign(id, "board:ccio", false), &gw.token("ccio")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "a refused change cannot be signed: {err:?}");

    // Narrowing takes effect at once.
    admin.revoke_dataset(authed(grant(&[]), &token)).await.unwrap();
    assert!(gw.query_as("alice", PROJECT, GP).await.is_err(), "revoked at once");
}
