use super::*;

fn demo_registry() -> (Registry, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::open(&dir.path().join("r.db"), RuleSet::shipped(), 12).unwrap();
    seed::demo(&reg, NaiveDate::from_ymd_opt(2026, 11, 24).unwrap()).unwrap();
    (reg, dir)
}

fn today() -> NaiveDate {
    NaiveDate::from_ymd_opt(2026, 11, 24).unwrap()
}

fn refusal(e: RegistryError) -> Refusal {
    match e {
        RegistryError::Refused(r) => r,
        other => panic!("expected a refusal, got {other}"),
    }
}

#[test]
fn a_remembered_decision_is_forgotten_as_soon_as_the_registry_changes() {
    let (reg, dir) = demo_registry();
    let project = "ews-asc-linkage";
    let granted = reg.data_access("alice", project, today()).unwrap();
    assert_eq!(reg.data_access("alice", project, today()).unwrap().1, granted.1);
    // A change through the registry's own connection…
    reg.set_grant_version(project, "patients", Some("v1")).unwrap();
    let pinned = reg.data_access("alice", project, today()).unwrap();
    assert_eq!(pinned.1.versions.get("patients").map(String::as_str), Some("v1"));
    // …and one committed by another connection (an administrator, another process).
    let other = rusqlite::Connection::open(dir.path().join("r.db")).unwrap();
    other
        .execute("UPDATE users SET suspended = 1 WHERE id = 'alice'", [])
        .unwrap();
    let (principal, refused) = *reg.data_access("alice", project, today()).unwrap_err();
    assert!(principal.is_none(), "Safe People refused her");
    assert!(refused.to_string().contains("suspended"), "{refused}");
}

#[test]
fn a_grant_can_name_a_dataset_version() {
    let (reg, _d) = demo_registry();
    let alice = reg.principal("alice", today()).unwrap();
    let project = "ews-asc-linkage";
    assert!(
        reg.project_access(&alice, project, today())
            .unwrap()
            .versions
            .is_empty()
    );
    reg.set_grant_version(project, "patients", Some("v1")).unwrap();
    let access = reg.project_access(&alice, project, today()).unwrap();
    assert_eq!(
        access.versions,
        BTreeMap::from([("patients".to_owned(), "v1".to_owned())])
    );
    reg.set_grant_version(project, "patients", None).unwrap();
    assert!(
        reg.project_access(&alice, project, today())
            .unwrap()
            .versions
            .is_empty()
    );
    assert!(matches!(
        reg.set_grant_version(project, "gp_events", Some("v1")),
        Err(RegistryError::NoSuchGrant(..))
    ));
    // Columns of one dataset granted at two versions: refused rather than guessed.
    reg.with_conn(|conn| {
        conn.execute(
            "UPDATE grants SET version = 'v2' WHERE project_id = ?1 AND column_name = 'sex'",
            params![project],
        )?;
        conn.execute(
            "UPDATE grants SET version = 'v1' WHERE project_id = ?1 AND column_name = 'age'",
            params![project],
        )?;
        Ok(())
    })
    .unwrap();
    assert!(matches!(
        reg.project_access(&alice, project, today()),
        Err(RegistryError::MixedVersions(..))
    ));
}

#[test]
fn alice_may_query_her_project() {
    let (reg, _d) = demo_registry();
    let alice = reg.principal("alice", today()).unwrap();
    assert_eq!(alice.organisation, "ecc");
    let access = reg.project_access(&alice, "ews-asc-linkage", today()).unwrap();
    assert_eq!(
        access.grants.keys().collect::<Vec<_>>(),
        ["asc_services", "ews_referrals", "patients"]
    );
}

#[test]
fn each_demo_refusal_names_its_rule() {
    let (reg, _d) = demo_registry();
    assert!(matches!(
        refusal(reg.principal("bob", today()).unwrap_err()),
        Refusal::AccreditationExpired(_)
    ));
    assert!(matches!(
        refusal(reg.principal("carol", today()).unwrap_err()),
        Refusal::OrganisationDspt(..)
    ));
    assert!(matches!(
        refusal(reg.principal("mallory", today()).unwrap_err()),
        Refusal::UnknownUser(_)
    ));
    let dave = reg.principal("dave", today()).unwrap();
    assert!(matches!(
        refusal(reg.project_access(&dave, "ews-asc-linkage", today()).unwrap_err()),
        Refusal::NotAMember(_)
    ));
    let alice = reg.principal("alice", today()).unwrap();
    match refusal(reg.project_access(&alice, "gp-trends", today()).unwrap_err()) {
        Refusal::NotApproved(_, missing) => assert_eq!(missing, "board:public_representative"),
        other => panic!("{other}"),
    }
    assert!(matches!(
        refusal(reg.project_access(&alice, "old-study", today()).unwrap_err()),
        Refusal::ProjectState(..) | Refusal::Ended(..)
    ));
    let admin = reg.principal("admin", today()).unwrap();
    assert!(matches!(
        refusal(reg.project_access(&admin, "ews-asc-linkage", today()).unwrap_err()),
        Refusal::MissingRole("researcher")
    ));
}

#[test]
fn accreditation_and_training_expire_with_time() {
    let (reg, _d) = demo_registry();
    let later = today() + chrono::Months::new(24);
    assert!(matches!(
        refusal(reg.principal("alice", later).unwrap_err()),
        Refusal::AccreditationExpired(_) | Refusal::TrainingLapsed(..)
    ));
}

/// A registry with one researcher, `rita` of `org`, in project `p` granted `patients`, all
/// valid today; each test then breaks one fact and expects that rule's refusal.
fn world() -> (Registry, tempfile::TempDir) {
    let (reg, dir) = demo_registry();
    let d = |months: i32| {
        let date = if months >= 0 {
            today() + chrono::Months::new(months as u32)
        } else {
            today() - chrono::Months::new((-months) as u32)
        };
        date.format("%Y-%m-%d").to_string()
    };
    reg.with_conn(|conn| {
        let tx = conn.transaction()?;
        admin::create_organisation(
            &tx,
            &admin::Organisation {
                id: "org".into(),
                name: "Org".into(),
                ico_registration: "Z1".into(),
                dspt_status: "standards_met".into(),
                dspt_expiry: d(6),
                accreditation: "accredited".into(),
            },
        )?;
        admin::create_user(
            &tx,
            &admin::User {
                id: "rita".into(),
                organisation: "org".into(),
                roles: vec!["researcher".into()],
                accreditation_expiry: d(6),
                training_date: d(-2),
                ..Default::default()
            },
        )?;
        admin::create_project(
            &tx,
            &admin::Project {
                id: "p".into(),
                title: "t".into(),
                purpose: "p".into(),
                lawful_basis: "l".into(),
                start_date: d(-1),
                end_date: d(6),
                parties: vec!["org".into()],
                ..Default::default()
            },
        )?;
        admin::add_member(&tx, "p", "rita")?;
        let columns = BTreeMap::from([("patients".to_owned(), vec!["person_id".to_owned(), "sex".to_owned()])]);
        admin::grant(&tx, "p", "patients", &["person_id".into(), "sex".into()], &columns)?;
        admin::transition(&tx, "p", &["draft"], "submitted")?;
        for (role, user) in [
            ("board:caldicott_guardian", "guardian"),
            ("board:ccio", "ccio"),
            ("board:public_representative", "public-rep"),
        ] {
            admin::decide(&tx, "p", role, user, true, "", today())?;
        }
        tx.commit()?;
        Ok(())
    })
    .unwrap();
    (reg, dir)
}

fn sql(reg: &Registry, statement: &str) {
    reg.with_conn(|c| Ok(c.execute_batch(statement)?)).unwrap();
}

/// The rule named when `rita` queries `p` today.
fn rita_refused(reg: &Registry) -> String {
    let outcome = reg
        .principal("rita", today())
        .and_then(|rita| reg.project_access(&rita, "p", today()));
    match outcome {
        Ok(_) => "permitted".into(),
        Err(RegistryError::Refused(r)) => r.to_string().split(':').next().unwrap().to_owned(),
        Err(other) => panic!("{other}"),
    }
}

#[test]
fn the_valid_world_is_permitted() {
    let (reg, _d) = world();
    assert_eq!(rita_refused(&reg), "permitted");
    let rita = reg.principal("rita", today()).unwrap();
    let access = reg.project_access(&rita, "p", today()).unwrap();
    assert_eq!(access.grants["patients"], ["person_id", "sex"]);
}

#[test]
fn each_refusal_reason_is_its_own_rule() {
    let cases: [(&str, &str); 14] = [
        (
            "UPDATE users SET suspended = 1 WHERE id = 'rita'",
            "safe-people/user-suspended",
        ),
        (
            "UPDATE users SET accreditation_expiry = '2026-11-23' WHERE id = 'rita'",
            "safe-people/accreditation-expired",
        ),
        (
            "UPDATE users SET training_date = '2025-11-23' WHERE id = 'rita'",
            "safe-people/training-lapsed",
        ),
        (
            "UPDATE organisations SET accreditation = 'suspended' WHERE id = 'org'",
            "safe-people/organisation-not-accredited",
        ),
        (
            "UPDATE organisations SET accreditation = 'withdrawn' WHERE id = 'org'",
            "safe-people/organisation-not-accredited",
        ),
        (
            "UPDATE organisations SET dspt_expiry = '2026-11-23' WHERE id = 'org'",
            "safe-people/organisation-dspt",
        ),
        (
            "UPDATE organisations SET dspt_status = 'not_met' WHERE id = 'org'",
            "safe-people/organisation-dspt",
        ),
        (
            "DELETE FROM project_members WHERE user_id = 'rita'",
            "safe-projects/not-a-member",
        ),
        (
            "DELETE FROM project_parties WHERE organisation_id = 'org'",
            "safe-projects/organisation-not-party",
        ),
        (
            "UPDATE projects SET start_date = '2026-11-25' WHERE id = 'p'",
            "safe-projects/not-started",
        ),
        (
            "UPDATE projects SET end_date = '2026-11-23' WHERE id = 'p'",
            "safe-projects/ended",
        ),
        (
            "UPDATE projects SET state = 'suspended' WHERE id = 'p'",
            "safe-projects/state",
        ),
        (
            "UPDATE approvals SET decision = 'rejected' WHERE project_id = 'p' AND role = 'board:ccio'",
            "safe-projects/rejected",
        ),
        (
            "DELETE FROM user_roles WHERE user_id = 'rita'",
            "safe-people/role-researcher",
        ),
    ];
    for (change, rule) in cases {
        let (reg, _d) = world();
        sql(&reg, change);
        assert_eq!(rita_refused(&reg), rule, "after {change}");
    }
}

#[test]
fn a_project_is_approved_only_with_all_three_board_roles() {
    for role in BOARD_ROLES {
        let (reg, _d) = world();
        sql(
            &reg,
            &format!("DELETE FROM approvals WHERE project_id = 'p' AND role = '{role}'"),
        );
        let rita = reg.principal("rita", today()).unwrap();
        match refusal(reg.project_access(&rita, "p", today()).unwrap_err()) {
            Refusal::NotApproved(_, missing) => assert_eq!(missing, role),
            other => panic!("{role}: {other}"),
        }
    }
}

#[test]
fn a_dataset_or_column_not_granted_is_not_in_the_access() {
    let (reg, _d) = world();
    let rita = reg.principal("rita", today()).unwrap();
    let access = reg.project_access(&rita, "p", today()).unwrap();
    assert!(!access.grants.contains_key("gp_events"));
    assert!(!access.grants["patients"].contains(&"age".to_owned()));
}

#[test]
fn a_release_request_moves_only_as_airlock_allows() {
    use super::releases::{self, NewRelease};
    let (reg, _dir) = demo_registry();
    reg.with_conn(|c| {
        let new = NewRelease {
            project: "ews-asc-linkage".into(),
            author: "alice".into(),
            receipt: 7,
            sql: "SELECT 1".into(),
            rules: "{}".into(),
            snapshot: Default::default(),
            result_hash: "h".into(),
            justification: "Table 2".into(),
        };
        let id = releases::create(c, &new, "t0")?.id;
        let state = |c: &Connection| releases::get(c, id).map(|r| r.state);
        let refused = |r: Result<releases::Release, RegistryError>| match r {
            Err(e) => refusal(e).to_string(),
            Ok(r) => panic!("expected a refusal, the request is {}", r.state),
        };
        // The author never reviews; a checker decides once a round; returns need a comment.
        assert!(refused(releases::review(c, id, "alice", "approve", "", "t1")).contains("an author never reviews"));
        assert!(refused(releases::review(c, id, "checker", "maybe", "", "t1")).contains("decision must be one of"));
        releases::review(c, id, "checker", "approve", "", "t1")?;
        assert_eq!(state(c)?, releases::PARTIALLY_REVIEWED);
        assert!(refused(releases::review(c, id, "checker", "approve", "", "t2")).contains("already reviewed"));
        assert!(refused(releases::review(c, id, "checker2", "return", " ", "t2")).contains("needs a comment"));
        releases::review(c, id, "checker2", "return", "which table?", "t2")?;
        assert_eq!(state(c)?, releases::RETURNED);
        assert!(refused(releases::review(c, id, "checker2", "approve", "", "t3")).contains("is returned"));
        assert!(refused(releases::releasable(c, id, "alice")).contains("is returned"));
        // Only the author resubmits; a new round, where the first approval no longer counts.
        assert!(matches!(
            refusal(releases::resubmit(c, id, "bob", "", "t3").unwrap_err()),
            Refusal::NotFound(_)
        ));
        let r = releases::resubmit(c, id, "alice", "", "t3")?;
        assert_eq!(
            (r.state.as_str(), r.round, r.request.justification.as_str()),
            (releases::SUBMITTED, 2, "Table 2")
        );
        releases::review(c, id, "checker", "approve", "", "t4")?;
        assert_eq!(state(c)?, releases::PARTIALLY_REVIEWED, "one approval in this round");
        releases::review(c, id, "checker2", "approve", "", "t5")?;
        assert_eq!(state(c)?, releases::REVIEWED);
        assert!(refused(releases::review(c, id, "dave", "approve", "", "t6")).contains("is reviewed"));
        releases::releasable(c, id, "alice")?;
        assert!(matches!(
            refusal(releases::releasable(c, id, "bob").unwrap_err()),
            Refusal::NotFound(_)
        ));
        releases::mark_released(c, id, 42, "hash", "t6")?;
        assert!(refused(releases::mark_released(c, id, 43, "hash", "t7")).contains("no longer reviewed"));
        assert!(refused(releases::withdraw(c, id, "alice", "t7")).contains("is released"));
        // A rejection is final.
        let other = releases::create(c, &new, "t8")?.id;
        releases::review(c, other, "checker", "reject", "not for release", "t8")?;
        assert!(refused(releases::review(c, other, "checker2", "approve", "", "t9")).contains("is rejected"));
        assert!(refused(releases::withdraw(c, other, "alice", "t9")).contains("is rejected"));
        assert!(refused(releases::resubmit(c, other, "alice", "", "t9")).contains("is rejected"));
        Ok(())
    })
    .unwrap();
}
