//! AdminService over the real gateway: the whole lifecycle of an organisation, a user and a
//! project, driven by the demo administrator and board, then used and stopped.

use datafusion::arrow::array::Array;
use datafusion::arrow::util::display::array_value_to_string;
use sde_gateway::api::proto as pb;
use tonic::Code;

use crate::helpers::{authed, query, spawn_gateway};

fn day(offset_days: i64) -> String {
    (chrono::Utc::now().date_naive() + chrono::Duration::days(offset_days))
        .format("%Y-%m-%d")
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn lifecycle_from_new_organisation_to_query_to_suspension() {
    let gw = spawn_gateway().await;
    let mut admin = gw.admin().await;
    let admin_token = gw.token("admin");
    macro_rules! a {
        ($m:expr) => {
            authed($m, &admin_token)
        };
    }

    // An organisation and a researcher join.
    let org = admin
        .create_organisation(a!(pb::Organisation {
            id: "uoe".into(),
            name: "University of Essex".into(),
            ico_registration: "Z6530491".into(),
            dspt_status: "standards_met".into(),
            dspt_expiry: day(300),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(org.accreditation, "accredited");
    admin
        .create_user(a!(pb::User {
            id: "erin".into(),
            organisation: "uoe".into(),
            display_name: "Erin".into(),
            roles: vec!["researcher".into()],
            accreditation_expiry: day(300),
            training_date: day(-30),
            suspended: false,
        }))
        .await
        .unwrap();

    // She proposes a project on older people only; the administrator sets it up.
    let project = pb::Project {
        id: "falls".into(),
        title: "Falls among older residents".into(),
        purpose: "Plan falls prevention services".into(),
        justification: "Falls are the commonest reason for a care package".into(),
        lawful_basis: "UK GDPR 6(1)(e), 9(2)(h)".into(),
        start_date: day(-1),
        end_date: day(365),
        cohort: "age >= 65".into(),
        parties: vec!["uoe".into()],
        requested: vec![pb::Grant {
            dataset: "patients".into(),
            columns: vec!["person_id".into(), "age_band".into(), "sex".into()],
        }],
        ..Default::default()
    };
    let created = admin.create_project(a!(project)).await.unwrap().into_inner();
    assert_eq!(created.state, "draft");
    admin
        .add_member(a!(pb::MemberRequest {
            project: "falls".into(),
            user: "erin".into(),
        }))
        .await
        .unwrap();
    admin
        .grant_dataset(a!(pb::GrantRequest {
            project: "falls".into(),
            dataset: "patients".into(),
            columns: vec!["person_id".into(), "age_band".into(), "sex".into()],
        }))
        .await
        .unwrap();
    let submitted = admin
        .submit_project(a!(pb::ProjectRef { id: "falls".into() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(submitted.state, "submitted");

    // Not approved yet: the query is refused, naming what is missing.
    let erin = gw.mint("erin", chrono::Utc::now().timestamp(), 3600);
    let mut client = gw.client_with(Some(erin.clone()), Some("falls")).await;
    let sql = "SELECT age_band, COUNT(*) AS people FROM patients GROUP BY age_band";
    let err = query(&mut client, sql).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("safe-projects/not-approved"), "{err:?}");

    // The administrator cannot approve; the board can, each in their own role.
    let decide = |role: &str| pb::DecisionRequest {
        project: "falls".into(),
        role: role.into(),
        comment: "proportionate".into(),
    };
    let err = admin
        .approve_project(a!(decide("board:caldicott_guardian")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    for (user, role) in [
        ("guardian", "board:caldicott_guardian"),
        ("ccio", "board:ccio"),
        ("public-rep", "board:public_representative"),
    ] {
        admin
            .approve_project(authed(decide(role), &gw.token(user)))
            .await
            .unwrap();
    }
    let approved = admin
        .get_project(a!(pb::ProjectRef { id: "falls".into() }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(approved.state, "approved");
    assert_eq!(approved.approvals.len(), 3);

    // Erin queries: only the cohort (65 and over) is counted.
    let batches = query(&mut client, sql).await.expect("approved project answers");
    let bands: Vec<String> = batches
        .iter()
        .flat_map(|b| {
            let col = b.column(0).clone();
            (0..col.len()).map(move |i| array_value_to_string(&col, i).unwrap())
        })
        .collect();
    assert!(!bands.is_empty());
    for band in &bands {
        let lower: u32 = band
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(lower >= 65, "band {band} is outside the cohort");
    }
    // A column not granted does not exist for her.
    let err = query(
        &mut client,
        "SELECT ethnicity, COUNT(*) FROM patients GROUP BY ethnicity",
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // The organisation is suspended: her next query is refused.
    admin
        .suspend_organisation(a!(pb::SuspendOrganisationRequest {
            id: "uoe".into(),
            withdraw: false,
            reason: "DSPT audit finding".into(),
        }))
        .await
        .unwrap();
    let err = query(&mut client, sql).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("safe-people/organisation-not-accredited"),
        "{err:?}"
    );

    // Every change is in the audit log with who made it, and every record names the rules in force.
    let log = std::fs::read_to_string(gw.audit_log()).unwrap();
    let rules = sde_gateway::registry::rules::RuleSet::shipped();
    let in_force = format!("\"policy_hash\":\"{}\"", rules.hash());
    assert!(
        log.lines().all(|l| l.contains(&in_force)),
        "a record without the rules' hash"
    );
    for call in [
        "admin.create_organisation",
        "admin.create_user",
        "admin.create_project",
        "admin.grant_dataset",
        "admin.approve_project",
        "admin.suspend_organisation",
    ] {
        assert!(log.contains(call), "{call} not audited");
    }
    let approvals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"admin.approve_project\"") && l.contains("\"accepted\""))
        .collect();
    assert_eq!(approvals.len(), 3);
    assert!(approvals.iter().any(|l| l.contains("\"user\":\"guardian\"")));
}

#[tokio::test(flavor = "multi_thread")]
async fn board_members_cannot_approve_their_own_project_and_any_rejection_stops_it() {
    let gw = spawn_gateway().await;
    let mut admin = gw.admin().await;
    let admin_token = gw.token("admin");
    macro_rules! a {
        ($m:expr) => {
            authed($m, &admin_token)
        };
    }
    admin
        .create_project(a!(pb::Project {
            id: "conflict".into(),
            title: "t".into(),
            purpose: "p".into(),
            lawful_basis: "l".into(),
            start_date: day(0),
            end_date: day(10),
            parties: vec!["ecc".into()],
            ..Default::default()
        }))
        .await
        .unwrap();
    admin
        .add_member(a!(pb::MemberRequest {
            project: "conflict".into(),
            user: "guardian".into(),
        }))
        .await
        .unwrap();
    admin
        .submit_project(a!(pb::ProjectRef { id: "conflict".into() }))
        .await
        .unwrap();
    let decide = |role: &str| pb::DecisionRequest {
        project: "conflict".into(),
        role: role.into(),
        comment: String::new(),
    };
    let err = admin
        .approve_project(authed(decide("board:caldicott_guardian"), &gw.token("guardian")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("safe-projects/conflict-of-interest"), "{err:?}");
    // Not a board role at all: a clear error, and the attempt is audited.
    let err = admin
        .approve_project(authed(decide("board:everyone"), &gw.token("guardian")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let log = std::fs::read_to_string(gw.audit_log()).unwrap();
    assert!(log.contains("board:everyone"), "the refused decision is audited");
    // A board member deciding in a role they do not hold.
    let err = admin
        .approve_project(authed(decide("board:ccio"), &gw.token("public-rep")))
        .await
        .unwrap_err();
    assert!(err.message().contains("safe-projects/board-role"), "{err:?}");

    let rejected = admin
        .reject_project(authed(decide("board:ccio"), &gw.token("ccio")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rejected.state, "rejected");
    let err = admin
        .approve_project(authed(decide("board:public_representative"), &gw.token("public-rep")))
        .await
        .unwrap_err();
    assert!(err.message().contains("safe-projects/not-submitted"), "{err:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_admin_input_gets_a_clear_error_and_changes_nothing() {
    let gw = spawn_gateway().await;
    let mut admin = gw.admin().await;
    let t = gw.token("admin");
    let bad = [
        pb::Organisation {
            id: "Bad Id!".into(),
            ..Default::default()
        },
        pb::Organisation {
            id: "x".into(),
            name: "X".into(),
            ico_registration: "Z1".into(),
            dspt_status: "maybe".into(),
            dspt_expiry: day(1),
            ..Default::default()
        },
        pb::Organisation {
            id: "ecc".into(),
            name: "Duplicate".into(),
            ico_registration: "Z1".into(),
            dspt_status: "standards_met".into(),
            dspt_expiry: day(1),
            ..Default::default()
        },
    ];
    for org in bad {
        let err = admin.create_organisation(authed(org, &t)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().starts_with("registry/invalid"), "{err:?}");
    }
    let err = admin
        .create_project(authed(
            pb::Project {
                id: "bad-cohort".into(),
                title: "t".into(),
                purpose: "p".into(),
                lawful_basis: "l".into(),
                start_date: day(0),
                end_date: day(1),
                cohort: "no_such_column > 1".into(),
                ..Default::default()
            },
            &t,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = admin
        .grant_dataset(authed(
            pb::GrantRequest {
                project: "ews-asc-linkage".into(),
                dataset: "opt_outs".into(),
                columns: vec!["person_id".into()],
            },
            &t,
        ))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "the opt-out register is never grantable: {err:?}"
    );
    let err = admin
        .get_project(authed(pb::ProjectRef { id: "nope".into() }, &t))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let orgs = admin
        .list_organisations(authed(pb::ListOrganisationsRequest {}, &t))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(orgs.organisations.len(), 3, "nothing was created");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_command_line_drives_the_same_service() {
    let gw = spawn_gateway().await;
    let cli = |token: &str, args: &[&str]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_sde-gateway"));
        command
            .arg("admin")
            .args(["--addr", &gw.addr.to_string()])
            .arg("--ca")
            .arg(gw.path("tls/ca.pem"))
            .arg("--token")
            .arg(gw.path(&format!("tokens/{token}.jwt")))
            .args(args);
        command
    };
    let run = |mut command: std::process::Command| async move {
        tokio::task::spawn_blocking(move || command.output().unwrap())
            .await
            .unwrap()
    };
    let out = run(cli("admin", &["orgs"])).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Essex County Council") && text.contains("lapsed"),
        "{text}"
    );

    let out = run(cli("admin", &["project", "ews-asc-linkage"])).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("board:public_representative approved"), "{text}");

    // Alice is no administrator: the command fails, naming the rule.
    let out = run(cli("alice", &["suspend-org", "ecc"])).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("safe-people/role-admin"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Lists the services through reflection version `$v` (`v1` or `v1alpha`).
macro_rules! reflected_services {
    ($v:ident, $channel:expr) => {{
        use tonic_reflection::pb::$v::ServerReflectionRequest;
        use tonic_reflection::pb::$v::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::$v::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::$v::server_reflection_response::MessageResponse;
        let mut client = ServerReflectionClient::new($channel);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let response = responses.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
            panic!("{response:?}");
        };
        list.service.into_iter().map(|s| s.name).collect::<Vec<String>>()
    }};
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_lists_the_services_as_grpcurl_sees_them() {
    let gw = spawn_gateway().await;
    // v1, and v1alpha as older grpcurl and Postman ask for it.
    for names in [
        reflected_services!(v1, gw.channel().await),
        reflected_services!(v1alpha, gw.channel().await),
    ] {
        assert!(names.contains(&"sde.v1.AdminService".to_owned()), "{names:?}");
        assert!(names.contains(&"sde.v1.AuditService".to_owned()), "{names:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_and_audit_take_the_same_connection_flags_anywhere() {
    let gw = spawn_gateway().await;
    let addr = gw.addr.to_string();
    let ca = gw.path("tls/ca.pem");
    let run = |args: Vec<std::ffi::OsString>| async move {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_sde-gateway"))
                .args(args)
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    };
    let os = |parts: &[&dyn AsRef<std::ffi::OsStr>]| parts.iter().map(|p| p.as_ref().to_owned()).collect::<Vec<_>>();
    let admin_token = gw.path("tokens/admin.jwt");
    let auditor_token = gw.path("tokens/auditor.jwt");
    // admin with audit's names, after the subcommand; audit with admin's names, and an address
    // without its scheme.
    for args in [
        os(&[
            &"admin",
            &"orgs",
            &"--server",
            &addr,
            &"--ca",
            &ca,
            &"--token-file",
            &admin_token,
        ]),
        os(&[
            &"admin",
            &"--addr",
            &addr,
            &"orgs",
            &"--ca",
            &ca,
            &"--token",
            &admin_token,
        ]),
        os(&[
            &"audit",
            &"show",
            &"--addr",
            &addr,
            &"--ca",
            &ca,
            &"--token",
            &auditor_token,
            &"--limit",
            &"1",
        ]),
    ] {
        let out = run(args.clone()).await;
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_updates_only_the_fields_given_and_lists_valid_values() {
    let gw = spawn_gateway().await;
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sde-gateway"))
            .args(["admin", "--json", "--addr"])
            .arg(gw.addr.to_string())
            .arg("--ca")
            .arg(gw.path("tls/ca.pem"))
            .arg("--token")
            .arg(gw.path("tokens/admin.jwt"))
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
        (out.status.code(), text)
    };
    let (code, out) = cli(&["update-user", "dave", "--trained-on", "2026-11-30"]);
    assert_eq!(code, Some(0), "{out}");
    let user: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(user[0]["training_date"], "2026-11-30");
    assert_eq!(
        user[0]["roles"],
        serde_json::json!(["researcher"]),
        "roles untouched: {out}"
    );
    assert_eq!(user[0]["organisation"], "ecc");

    let (code, out) = cli(&["update-user", "dave", "--roles", "superuser"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("possible values: researcher, admin, auditor, output-checker"),
        "{out}"
    );
    let (code, out) = cli(&["update-org", "lapsed", "--dspt-expiry", "2027-03-31"]);
    assert_eq!(code, Some(0), "{out}");
    let org: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (org[0]["dspt_expiry"].as_str(), org[0]["name"].as_str()),
        (Some("2027-03-31"), Some("Lapsed Analytics Ltd"))
    );
    let (code, out) = cli(&["update-user", "nobody", "--name", "x"]);
    assert_eq!(code, Some(1));
    assert!(out.starts_with("error: registry/not-found: no user nobody"), "{out}");
}
