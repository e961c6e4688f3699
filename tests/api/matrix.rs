//! The access matrix: every kind of identity × every kind of call → the expected gRPC code, each
//! cell asserted against the real gateway.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sde_gateway::api::proto as pb;
use sde_gateway::api::proto::audit_service_client::AuditServiceClient;
use sde_gateway::identity::TokenIssuer;
use tonic::{Code, Request, Status};

use crate::helpers::{TestGateway, query, spawn_gateway, status};

const USERS: [&str; 9] = [
    "alice",
    "bob",
    "carol",
    "dave",
    "admin",
    "auditor",
    "guardian",
    "ccio",
    "public-rep",
];

/// The identities a caller can present, by name, with the token they send.
fn identities(gw: &TestGateway) -> Vec<(String, Option<String>)> {
    let now = chrono::Utc::now().timestamp();
    let alice = gw.token("alice");
    let mut parts: Vec<&str> = alice.split('.').collect();
    // alg "none": the same claims, no signature.
    let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let alg_none = format!("{none_header}.{}.", parts[1]);
    // Tampered: alice's signature over claims that now say "dave".
    let claims = String::from_utf8(URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    let forged = URL_SAFE_NO_PAD.encode(claims.replace("\"alice\"", "\"dave\""));
    parts[1] = &forged;
    let tampered = parts.join(".");
    let other_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let wrong_key = TokenIssuer::new(
        other_key.serialize_pem().as_bytes(),
        "ES256",
        sde_gateway::demo::DEMO_ISSUER,
        sde_gateway::demo::DEMO_AUDIENCE,
    )
    .unwrap()
    .issue("alice", now, 3600);
    let mut ids = vec![
        ("no token".to_owned(), None),
        ("garbage".to_owned(), Some("garbage".to_owned())),
        ("alg none".to_owned(), Some(alg_none)),
        ("wrong key".to_owned(), Some(wrong_key)),
        ("expired".to_owned(), Some(gw.mint("alice", now - 7200, 3600))),
        ("tampered".to_owned(), Some(tampered)),
    ];
    ids.extend(USERS.iter().map(|u| (u.to_string(), Some(gw.token(u)))));
    ids
}

fn req<T>(message: T, token: &Option<String>) -> Request<T> {
    match token {
        Some(t) => crate::helpers::authed(message, t),
        None => Request::new(message),
    }
}

fn day(offset: i64) -> String {
    (chrono::Utc::now().date_naive() + chrono::Duration::days(offset))
        .format("%Y-%m-%d")
        .to_string()
}

const CALLS: [&str; 30] = [
    "flight.query",
    "flight.tables",
    "create_organisation",
    "update_organisation",
    "list_organisations",
    "create_user",
    "update_user",
    "list_users",
    "suspend_user",
    "create_project",
    "update_project",
    "add_member",
    "grant_dataset",
    "revoke_dataset",
    "get_project",
    "list_projects",
    "submit_project",
    "approve_project",
    "reject_project",
    "activate_project",
    "suspend_project",
    "end_project",
    "remove_member",
    "suspend_organisation",
    "reinstate_organisation",
    "audit.list",
    "audit.checkpoint",
    "audit.inclusion",
    "audit.consistency",
    "audit.replay",
];

/// The code a call must get. Calls run in order, each for every identity; only the one allowed
/// identity changes anything.
fn expected(identity: &str, call: &str) -> Code {
    if !USERS.contains(&identity) {
        return Code::Unauthenticated;
    }
    let allowed = match call {
        "flight.query" | "flight.tables" => "alice",
        c if c.starts_with("audit.") => "auditor",
        // Deciding as the Caldicott Guardian, then as the CCIO (who rejects).
        "approve_project" => "guardian",
        "reject_project" => "ccio",
        _ => "admin",
    };
    if identity != allowed {
        return Code::PermissionDenied;
    }
    match call {
        // The project was rejected by then: the administrator cannot move it on.
        "activate_project" | "suspend_project" | "end_project" => Code::InvalidArgument,
        // Record 0 is a refused call, not a released query: there is nothing to replay.
        "audit.replay" => Code::FailedPrecondition,
        _ => Code::Ok,
    }
}

async fn run(gw: &TestGateway, call: &str, token: &Option<String>) -> Result<(), Status> {
    let mut admin = gw.admin().await;
    let mut audit = AuditServiceClient::new(gw.channel().await);
    let org = pb::Organisation {
        id: "matrix-org".into(),
        name: "Matrix".into(),
        ico_registration: "Z9".into(),
        dspt_status: "standards_met".into(),
        dspt_expiry: day(100),
        ..Default::default()
    };
    let user = pb::User {
        id: "matrix-user".into(),
        organisation: "matrix-org".into(),
        roles: vec!["researcher".into()],
        accreditation_expiry: day(100),
        training_date: day(-1),
        ..Default::default()
    };
    let project = pb::Project {
        id: "matrix-p".into(),
        title: "t".into(),
        purpose: "p".into(),
        lawful_basis: "l".into(),
        start_date: day(0),
        end_date: day(100),
        parties: vec!["ecc".into()],
        ..Default::default()
    };
    let p = || pb::ProjectRef { id: "matrix-p".into() };
    let state = || pb::ProjectStateRequest {
        project: "matrix-p".into(),
        reason: String::new(),
    };
    let member = || pb::MemberRequest {
        project: "matrix-p".into(),
        user: "matrix-user".into(),
    };
    let grant = || pb::GrantRequest {
        project: "matrix-p".into(),
        dataset: "patients".into(),
        columns: vec!["person_id".into(), "sex".into()],
    };
    let decide = |role: &str| pb::DecisionRequest {
        project: "matrix-p".into(),
        role: role.into(),
        comment: String::new(),
    };
    match call {
        "flight.query" => {
            let mut client = gw.client_with(token.clone(), Some(crate::helpers::PROJECT)).await;
            query(&mut client, "SELECT COUNT(*) FROM patients").await.map(drop)
        }
        "flight.tables" => {
            let mut client = gw.client_with(token.clone(), Some(crate::helpers::PROJECT)).await;
            let command = arrow_flight::sql::CommandGetTables::default();
            client.get_tables(command).await.map(drop).map_err(status)
        }
        "create_organisation" => admin.create_organisation(req(org, token)).await.map(drop),
        "update_organisation" => admin.update_organisation(req(org, token)).await.map(drop),
        "list_organisations" => admin
            .list_organisations(req(pb::ListOrganisationsRequest {}, token))
            .await
            .map(drop),
        "create_user" => admin.create_user(req(user, token)).await.map(drop),
        "update_user" => admin.update_user(req(user, token)).await.map(drop),
        "list_users" => admin
            .list_users(req(pb::ListUsersRequest::default(), token))
            .await
            .map(drop),
        "suspend_user" => admin
            .suspend_user(req(
                pb::SuspendUserRequest {
                    id: "matrix-user".into(),
                    suspended: true,
                    reason: String::new(),
                },
                token,
            ))
            .await
            .map(drop),
        "create_project" => admin.create_project(req(project, token)).await.map(drop),
        "update_project" => admin.update_project(req(project, token)).await.map(drop),
        "add_member" => admin.add_member(req(member(), token)).await.map(drop),
        "grant_dataset" => admin.grant_dataset(req(grant(), token)).await.map(drop),
        "revoke_dataset" => admin.revoke_dataset(req(grant(), token)).await.map(drop),
        "get_project" => admin.get_project(req(p(), token)).await.map(drop),
        "list_projects" => admin
            .list_projects(req(pb::ListProjectsRequest {}, token))
            .await
            .map(drop),
        "submit_project" => admin.submit_project(req(p(), token)).await.map(drop),
        "approve_project" => admin
            .approve_project(req(decide("board:caldicott_guardian"), token))
            .await
            .map(drop),
        "reject_project" => admin.reject_project(req(decide("board:ccio"), token)).await.map(drop),
        "activate_project" => admin.activate_project(req(state(), token)).await.map(drop),
        "suspend_project" => admin.suspend_project(req(state(), token)).await.map(drop),
        "end_project" => admin.end_project(req(state(), token)).await.map(drop),
        "remove_member" => admin.remove_member(req(member(), token)).await.map(drop),
        "suspend_organisation" => admin
            .suspend_organisation(req(
                pb::SuspendOrganisationRequest {
                    id: "matrix-org".into(),
                    withdraw: false,
                    reason: String::new(),
                },
                token,
            ))
            .await
            .map(drop),
        "reinstate_organisation" => admin
            .reinstate_organisation(req(
                pb::ReinstateOrganisationRequest {
                    id: "matrix-org".into(),
                },
                token,
            ))
            .await
            .map(drop),
        "audit.list" => audit
            .list_records(req(
                pb::ListRecordsRequest {
                    limit: 5,
                    ..Default::default()
                },
                token,
            ))
            .await
            .map(drop),
        "audit.checkpoint" => audit
            .get_checkpoint(req(pb::GetCheckpointRequest {}, token))
            .await
            .map(drop),
        "audit.inclusion" => audit
            .get_inclusion_proof(req(pb::InclusionProofRequest { seq: 0, tree_size: 1 }, token))
            .await
            .map(drop),
        "audit.consistency" => audit
            .get_consistency_proof(req(
                pb::ConsistencyProofRequest {
                    old_size: 1,
                    new_size: 2,
                },
                token,
            ))
            .await
            .map(drop),
        "audit.replay" => audit.replay(req(pb::ReplayRequest { seq: 0 }, token)).await.map(drop),
        other => panic!("no call {other}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_identity_against_every_call() {
    let gw = spawn_gateway().await;
    let ids = identities(&gw);
    let mut wrong = Vec::new();
    let mut cells = 0;
    for call in CALLS {
        // The allowed identity goes last, so every refusal is judged before the state changes.
        let mut ordered: Vec<_> = ids.iter().collect();
        ordered
            .sort_by_key(|(name, _)| expected(name, call) != Code::PermissionDenied && USERS.contains(&name.as_str()));
        for (name, token) in ordered {
            let code = match run(&gw, call, token).await {
                Ok(()) => Code::Ok,
                Err(s) => s.code(),
            };
            cells += 1;
            if code != expected(name, call) {
                wrong.push(format!(
                    "{name} × {call}: got {code:?}, expected {:?}",
                    expected(name, call)
                ));
            }
        }
    }
    assert_eq!(cells, CALLS.len() * (USERS.len() + 6));
    assert!(wrong.is_empty(), "{} cells wrong:\n{}", wrong.len(), wrong.join("\n"));
}
