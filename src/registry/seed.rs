//! The demo world's registry, as `shared/DESIGN.md` names it. Dates are relative to the day the
//! demo is created, so the demo behaves the same whenever it is run.

use chrono::{Months, NaiveDate};
use rusqlite::params;

use super::{BOARD_ROLES, Registry, RegistryError};

/// Demo datasets and their columns, in table order.
pub const DEMO_DATASETS: [(&str, &[&str]); 4] = [
    (
        "patients",
        &[
            "person_id",
            "sex",
            "age",
            "age_band",
            "ethnicity",
            "district",
            "imd_decile",
        ],
    ),
    ("gp_events", &["person_id", "event_date", "snomed_code"]),
    (
        "asc_services",
        &[
            "person_id",
            "service_type",
            "primary_support_reason",
            "start_date",
            "end_date",
            "weekly_cost",
        ],
    ),
    (
        "ews_referrals",
        &["person_id", "referral_date", "referral_source", "service", "outcome"],
    ),
];

/// Demo users: id, organisation, roles.
pub const DEMO_USERS: [(&str, &str, &[&str]); 11] = [
    ("alice", "ecc", &["researcher"]),
    ("bob", "provide", &["researcher"]),
    ("carol", "lapsed", &["researcher"]),
    ("dave", "ecc", &["researcher"]),
    ("admin", "ecc", &["admin"]),
    ("auditor", "ecc", &["auditor"]),
    ("guardian", "ecc", &["board:caldicott_guardian"]),
    ("ccio", "provide", &["board:ccio"]),
    ("public-rep", "ecc", &["board:public_representative"]),
    ("checker", "ecc", &["output-checker"]),
    ("checker2", "provide", &["output-checker"]),
];

/// id, title, state, start, end, datasets, board roles that approved.
type DemoProject<'a> = (
    &'a str,
    &'a str,
    &'a str,
    NaiveDate,
    NaiveDate,
    &'a [&'a str],
    &'a [&'a str],
);

fn d(date: NaiveDate) -> String {
    date.format("%Y-%m-%d").to_string()
}

/// Seeds an empty registry with the demo world as of `today`.
pub fn demo(registry: &Registry, today: NaiveDate) -> Result<(), RegistryError> {
    let year_ahead = d(today + Months::new(12));
    let recent = d(today - Months::new(3));
    registry.with_conn(|conn| {
        let tx = conn.transaction()?;
        for (id, name, ico, dspt_expiry) in [
            ("ecc", "Essex County Council", "Z5664331", year_ahead.clone()),
            ("provide", "Provide CIC", "Z2786945", year_ahead.clone()),
            ("lapsed", "Lapsed Analytics Ltd", "ZA123456", d(today - Months::new(2))),
        ] {
            tx.execute(
                "INSERT INTO organisations VALUES (?1, ?2, ?3, 'standards_met', ?4, 'accredited')",
                params![id, name, ico, dspt_expiry],
            )?;
        }
        for (id, org, roles) in DEMO_USERS {
            // Bob's accreditation lapsed last month; everyone else's runs for a year.
            let expiry = if id == "bob" { d(today - Months::new(1)) } else { year_ahead.clone() };
            tx.execute(
                "INSERT INTO users VALUES (?1, ?2, ?1, ?3, ?4, 0)",
                params![id, org, expiry, recent],
            )?;
            for role in roles {
                tx.execute("INSERT INTO user_roles VALUES (?1, ?2)", params![id, role])?;
            }
        }
        let projects: [DemoProject; 3] = [
            (
                "ews-asc-linkage",
                "From Essex Wellbeing Service to Adult Social Care",
                "active",
                today - Months::new(6),
                today + Months::new(24),
                &["patients", "asc_services", "ews_referrals"],
                &BOARD_ROLES,
            ),
            (
                "gp-trends",
                "Trends in long-term conditions in general practice",
                "submitted",
                today - Months::new(1),
                today + Months::new(12),
                &["patients", "gp_events"],
                &BOARD_ROLES[..2],
            ),
            (
                "old-study",
                "A completed study of service use",
                "ended",
                today - Months::new(36),
                today - Months::new(12),
                &["patients"],
                &BOARD_ROLES,
            ),
        ];
        for (id, title, state, start, end, datasets, approvals) in projects {
            tx.execute(
                "INSERT INTO projects (id, title, purpose, lawful_basis, state, start_date, end_date) VALUES (?1, ?2, 'Service planning and evaluation', 'UK GDPR 6(1)(e), 9(2)(h)', ?3, ?4, ?5)",
                params![id, title, state, d(start), d(end)],
            )?;
            for member in ["alice", "bob", "carol"] {
                tx.execute("INSERT INTO project_members VALUES (?1, ?2)", params![id, member])?;
            }
            for org in ["ecc", "provide", "lapsed"] {
                tx.execute("INSERT INTO project_parties VALUES (?1, ?2)", params![id, org])?;
            }
            for role in approvals {
                let board_member = DEMO_USERS.iter().find(|u| u.2.contains(role)).expect("board user").0;
                tx.execute(
                    "INSERT INTO approvals (project_id, role, user_id, decision, decided_at) VALUES (?1, ?2, ?3, 'approved', ?4)",
                    params![id, role, board_member, d(start)],
                )?;
            }
            for dataset in datasets {
                let columns = DEMO_DATASETS.iter().find(|(n, _)| n == dataset).expect("demo dataset").1;
                for (position, column) in columns.iter().enumerate() {
                    tx.execute(
                        "INSERT INTO grants (project_id, dataset, column_name, position) VALUES (?1, ?2, ?3, ?4)",
                        params![id, dataset, column, position as i64],
                    )?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    })
}
