//! Release budgets through the real gateway: a project releases cells up to its budget, each
//! result saying what is left; a result that does not fit is refused with the rule and spends
//! the rest, and a request waits for the board; a board member's grant lets them through again; what was released survives a
//! restart, counted from the audit log.

use sde_gateway::Gateway;
use sde_gateway::api::proto as pb;
use tonic::Code;

use crate::helpers::*;

/// Two cells (F, M).
const BY_SEX: &str = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex";
/// One cell.
const TOTAL: &str = "SELECT COUNT(*) AS n FROM patients";

fn remaining(schema: &datafusion::arrow::datatypes::Schema) -> (String, String) {
    let m = schema.metadata();
    (m["sde.budget_cells"].clone(), m["sde.budget_remaining"].clone())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_project_releases_up_to_its_budget_then_waits_for_the_board() {
    let mut gw = spawn_gateway_with(|c| c.disclosure.release_budget_cells = 5).await;
    let mut client = gw.client("alice", PROJECT).await;

    let (schema, _) = query_described(&mut client, BY_SEX).await.unwrap();
    assert_eq!(remaining(&schema), ("5".into(), "3".into()));
    let (schema, _) = query_described(&mut client, BY_SEX).await.unwrap();
    assert_eq!(remaining(&schema), ("5".into(), "1".into()));

    // Two more cells do not fit: refused with the rule, and the cell left is spent, so whether
    // a result fits is told once, never for free.
    let err = query(&mut client, BY_SEX).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().starts_with(
            "safe-outputs/release-budget: project ews-asc-linkage has spent its release budget of 5 cells (this result did not fit in the 1 left"
        ),
        "{err:?}"
    );
    // Spent, every query is refused alike, one cell or many.
    let err = query(&mut client, TOTAL).await.unwrap_err();
    assert!(err.message().contains("did not fit in the 0 left"), "{err:?}");

    // The administrators see the request; a researcher cannot grant, nor can a board member
    // in a role they do not hold.
    let mut admin = gw.admin().await;
    let get = || pb::ProjectRef { id: PROJECT.into() };
    let p = admin
        .get_project(authed(get(), &gw.token("admin")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (p.release_budget_cells, p.cells_released, p.budget_requested),
        (5, 5, true)
    );
    let grant = |role: &str| pb::BudgetGrant {
        project: PROJECT.into(),
        role: role.into(),
        cells: 10,
        comment: "a second day of exploration".into(),
    };
    let err = admin
        .grant_release_budget(authed(grant("board:caldicott_guardian"), &gw.token("alice")))
        .await
        .unwrap_err();
    assert!(err.message().contains("safe-projects/board-role"), "{err:?}");
    let err = admin
        .grant_release_budget(authed(grant("board:ccio"), &gw.token("guardian")))
        .await
        .unwrap_err();
    assert!(err.message().contains("safe-projects/board-role"), "{err:?}");

    // The Caldicott Guardian grants ten more cells: the request is answered, queries flow.
    let p = admin
        .grant_release_budget(authed(grant("board:caldicott_guardian"), &gw.token("guardian")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (p.release_budget_cells, p.cells_released, p.budget_requested),
        (15, 5, false)
    );
    let (schema, _) = query_described(&mut client, BY_SEX).await.unwrap();
    assert_eq!(remaining(&schema), ("15".into(), "8".into()));

    // Refusals are audited with the rule; each accepted execution states its cells.
    let log = std::fs::read_to_string(gw.audit_log()).unwrap();
    assert_eq!(log.matches("\"rule\":\"safe-outputs/release-budget\"").count(), 2);
    assert_eq!(
        log.matches("\"cells_released\":2").count(),
        6,
        "three executions, each repeated at release"
    );

    // After a restart the tally comes back from the audit log.
    gw.shut_down().await.unwrap();
    let again = Gateway::build(&gw.config).await.expect("gateway builds again");
    assert_eq!(again.core().budgets.used(PROJECT), 7);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_board_grants_budget_only_to_live_projects_it_is_not_part_of() {
    let gw = spawn_gateway_with(|c| c.disclosure.release_budget_cells = 5).await;
    let mut admin = gw.admin().await;
    let grant = |project: &str| pb::BudgetGrant {
        project: project.into(),
        role: "board:caldicott_guardian".into(),
        cells: 10,
        comment: String::new(),
    };
    // A project the board has not yet approved gets no budget.
    let err = admin
        .grant_release_budget(authed(grant("gp-trends"), &gw.token("guardian")))
        .await
        .unwrap_err();
    assert!(
        err.message()
            .starts_with("safe-projects/budget-state: project gp-trends is submitted"),
        "{err:?}"
    );
    // A zero grant is no grant.
    let mut zero = grant(PROJECT);
    zero.cells = 0;
    let err = admin
        .grant_release_budget(authed(zero, &gw.token("guardian")))
        .await
        .unwrap_err();
    assert!(err.message().contains("cells must be a positive number"), "{err:?}");
}
