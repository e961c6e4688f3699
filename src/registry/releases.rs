//! The registry's side of output checking ([`crate::review`]): requests to release a result
//! whose cells the rules withheld, the output checkers' reviews of them, and the states a
//! request moves through, after OpenSAFELY's Airlock:
//!
//! ```text
//! submitted ─approve→ partially_reviewed ─approve (another checker)→ reviewed ─fetch→ released
//!     │ ╲                 │ ╲                                          │
//!     │  return           │  return → returned ─resubmit→ submitted    reject → rejected
//!     reject              reject                └─withdraw→ withdrawn
//! ```
//!
//! A request names the audit record of the result (its receipt) and holds what a release needs
//! to compute it again: the SQL, the rules applied, the data snapshot. It never holds a value.
//! Reviews belong to a round: resubmitting a returned request starts a new round, so approvals
//! given before it no longer count. Who may make each change is for the rules (asked before
//! these functions); these judge only the request's state and who its author and checkers are.

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::{Refusal, RegistryError};

pub const SUBMITTED: &str = "submitted";
pub const PARTIALLY_REVIEWED: &str = "partially_reviewed";
pub const REVIEWED: &str = "reviewed";
pub const RELEASED: &str = "released";
pub const RETURNED: &str = "returned";
pub const REJECTED: &str = "rejected";
pub const WITHDRAWN: &str = "withdrawn";

/// Different checkers whose approvals, in one round, make a request `reviewed`.
pub const APPROVALS_NEEDED: usize = 2;

/// A checker's decision.
pub const DECISIONS: [&str; 3] = ["approve", "return", "reject"];

/// What a new request records, taken from the audit record of the result.
#[derive(Debug, Clone, Serialize)]
pub struct NewRelease {
    pub project: String,
    pub author: String,
    pub receipt: u64,
    pub sql: String,
    /// The disclosure rules the result was computed under, as recorded (JSON).
    pub rules: String,
    pub snapshot: BTreeMap<String, String>,
    /// The hash of the result as the author received it.
    pub result_hash: String,
    pub justification: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Review {
    pub round: u32,
    pub checker: String,
    pub decision: String,
    pub comment: String,
    pub decided_at: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Release {
    pub id: u64,
    pub request: NewRelease,
    pub state: String,
    pub round: u32,
    pub created_at: String,
    pub updated_at: String,
    pub reviews: Vec<Review>,
    /// The audit record (and its hash) of the release, once released.
    pub released: Option<(u64, String)>,
}

fn refuse(message: String) -> RegistryError {
    Refusal::InvalidChange(message).into()
}

/// Records a new request, `submitted`.
pub fn create(conn: &Connection, new: &NewRelease, now: &str) -> Result<Release, RegistryError> {
    if new.justification.trim().is_empty() {
        return Err(refuse(
            "a release request needs a justification: what the output is for and why its withheld cells are safe to release".into(),
        ));
    }
    let snapshot = serde_json::to_string(&new.snapshot).expect("snapshot serialises");
    conn.execute(
        "INSERT INTO release_requests (project_id, author, receipt_seq, sql, rules, snapshot, result_hash,
             justification, state, round, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 1, ?10, ?10)",
        params![
            new.project,
            new.author,
            new.receipt as i64,
            new.sql,
            new.rules,
            snapshot,
            new.result_hash,
            new.justification,
            SUBMITTED,
            now
        ],
    )?;
    get(conn, conn.last_insert_rowid() as u64)
}

/// Request `id`, with its reviews.
pub fn get(conn: &Connection, id: u64) -> Result<Release, RegistryError> {
    let row = conn
        .query_row(
            "SELECT project_id, author, receipt_seq, sql, rules, snapshot, result_hash, justification, state,
                    round, created_at, updated_at, released_seq, released_hash
             FROM release_requests WHERE id = ?1",
            params![id as i64],
            |r| {
                Ok((
                    NewRelease {
                        project: r.get(0)?,
                        author: r.get(1)?,
                        receipt: r.get::<_, i64>(2)? as u64,
                        sql: r.get(3)?,
                        rules: r.get(4)?,
                        snapshot: BTreeMap::new(),
                        result_hash: r.get(6)?,
                        justification: r.get(7)?,
                    },
                    r.get::<_, String>(5)?,
                    (r.get::<_, String>(8)?, r.get::<_, u32>(9)?),
                    (r.get::<_, String>(10)?, r.get::<_, String>(11)?),
                    (r.get::<_, Option<i64>>(12)?, r.get::<_, Option<String>>(13)?),
                ))
            },
        )
        .optional()?;
    let Some((mut request, snapshot, (state, round), (created_at, updated_at), released)) = row else {
        return Err(Refusal::NotFound(format!("no release request {id}")).into());
    };
    request.snapshot = serde_json::from_str(&snapshot).unwrap_or_default();
    let mut stmt = conn.prepare_cached(
        "SELECT round, checker, decision, comment, decided_at FROM release_reviews WHERE request_id = ?1 ORDER BY rowid",
    )?;
    let reviews = stmt
        .query_map(params![id as i64], |r| {
            Ok(Review {
                round: r.get(0)?,
                checker: r.get(1)?,
                decision: r.get(2)?,
                comment: r.get(3)?,
                decided_at: r.get(4)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Release {
        id,
        request,
        state,
        round,
        created_at,
        updated_at,
        reviews,
        released: match released {
            (Some(seq), Some(hash)) => Some((seq as u64, hash)),
            _ => None,
        },
    })
}

/// The project of request `id` (to ask the rules about it before anything else is read).
pub fn project_of(conn: &Connection, id: u64) -> Result<String, RegistryError> {
    conn.query_row(
        "SELECT project_id FROM release_requests WHERE id = ?1",
        params![id as i64],
        |r| r.get(0),
    )
    .optional()?
    .ok_or_else(|| Refusal::NotFound(format!("no release request {id}")).into())
}

fn ids(conn: &Connection, sql: &str, user: &str) -> Result<Vec<Release>, RegistryError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let ids = stmt
        .query_map(params![user], |r| r.get::<_, i64>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    ids.into_iter().map(|id| get(conn, id as u64)).collect()
}

/// `author`'s requests, newest first.
pub fn by_author(conn: &Connection, author: &str) -> Result<Vec<Release>, RegistryError> {
    ids(
        conn,
        "SELECT id FROM release_requests WHERE author = ?1 ORDER BY id DESC",
        author,
    )
}

/// The requests `checker` may review now, oldest first: awaiting review, of projects they are
/// not a member of, and not yet reviewed by them in this round.
pub fn queue(conn: &Connection, checker: &str) -> Result<Vec<Release>, RegistryError> {
    ids(
        conn,
        "SELECT r.id FROM release_requests r
         WHERE r.state IN ('submitted', 'partially_reviewed')
           AND r.author <> ?1
           AND NOT EXISTS (SELECT 1 FROM project_members m WHERE m.project_id = r.project_id AND m.user_id = ?1)
           AND NOT EXISTS (SELECT 1 FROM release_reviews v
                           WHERE v.request_id = r.id AND v.round = r.round AND v.checker = ?1)
         ORDER BY r.id",
        checker,
    )
}

fn set_state(conn: &Connection, id: u64, state: &str, now: &str) -> Result<(), RegistryError> {
    conn.execute(
        "UPDATE release_requests SET state = ?2, updated_at = ?3 WHERE id = ?1",
        params![id as i64, state, now],
    )?;
    Ok(())
}

fn expect_state(release: &Release, allowed: &[&str], doing: &str) -> Result<(), RegistryError> {
    if allowed.contains(&release.state.as_str()) {
        return Ok(());
    }
    Err(refuse(format!(
        "release request {} is {}; it can be {doing} only when {}",
        release.id,
        release.state,
        allowed.join(" or ")
    )))
}

/// `checker`'s decision on request `id`: `approve` (a second checker's approval in the round
/// makes it `reviewed`), `return` (to its author, for changes) or `reject` (final).
pub fn review(
    conn: &Connection,
    id: u64,
    checker: &str,
    decision: &str,
    comment: &str,
    now: &str,
) -> Result<Release, RegistryError> {
    if !DECISIONS.contains(&decision) {
        return Err(refuse(format!("decision must be one of {}", DECISIONS.join(", "))));
    }
    let release = get(conn, id)?;
    if release.request.author == checker {
        return Err(refuse(format!(
            "release request {id} is yours; an author never reviews their own request"
        )));
    }
    let allowed: &[&str] = match decision {
        "reject" => &[SUBMITTED, PARTIALLY_REVIEWED, REVIEWED],
        _ => &[SUBMITTED, PARTIALLY_REVIEWED],
    };
    let done = match decision {
        "approve" => "approved",
        "return" => "returned",
        _ => "rejected",
    };
    expect_state(&release, allowed, done)?;
    let this_round = |r: &&Review| r.round == release.round;
    if release.reviews.iter().filter(this_round).any(|r| r.checker == checker) {
        return Err(refuse(format!(
            "you have already reviewed release request {id}; two different output checkers must each review it"
        )));
    }
    if decision != "approve" && comment.trim().is_empty() {
        return Err(refuse(format!(
            "a decision to {decision} needs a comment that tells the author why"
        )));
    }
    conn.execute(
        "INSERT INTO release_reviews (request_id, round, checker, decision, comment, decided_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![id as i64, release.round, checker, decision, comment, now],
    )?;
    let approvals = release
        .reviews
        .iter()
        .filter(this_round)
        .filter(|r| r.decision == "approve")
        .count()
        + 1;
    let state = match decision {
        "approve" if approvals >= APPROVALS_NEEDED => REVIEWED,
        "approve" => PARTIALLY_REVIEWED,
        "return" => RETURNED,
        _ => REJECTED,
    };
    set_state(conn, id, state, now)?;
    get(conn, id)
}

fn own(conn: &Connection, id: u64, author: &str) -> Result<Release, RegistryError> {
    let release = get(conn, id)?;
    if release.request.author != author {
        // As for a request that does not exist: nobody learns of others' requests.
        return Err(Refusal::NotFound(format!("no release request {id} of yours")).into());
    }
    Ok(release)
}

/// The author's request, or none (as if it did not exist) for anyone else.
pub fn of_author(conn: &Connection, id: u64, author: &str) -> Result<Release, RegistryError> {
    own(conn, id, author)
}

/// The author withdraws request `id` (at any point before it is released or rejected).
pub fn withdraw(conn: &Connection, id: u64, author: &str, now: &str) -> Result<Release, RegistryError> {
    let release = own(conn, id, author)?;
    expect_state(
        &release,
        &[SUBMITTED, PARTIALLY_REVIEWED, REVIEWED, RETURNED],
        "withdrawn",
    )?;
    set_state(conn, id, WITHDRAWN, now)?;
    get(conn, id)
}

/// The author resubmits returned request `id`, with a new justification if given: a new round
/// of reviews begins.
pub fn resubmit(
    conn: &Connection,
    id: u64,
    author: &str,
    justification: &str,
    now: &str,
) -> Result<Release, RegistryError> {
    let release = own(conn, id, author)?;
    expect_state(&release, &[RETURNED], "resubmitted")?;
    if !justification.trim().is_empty() {
        conn.execute(
            "UPDATE release_requests SET justification = ?2 WHERE id = ?1",
            params![id as i64, justification],
        )?;
    }
    conn.execute(
        "UPDATE release_requests SET state = ?2, round = round + 1, updated_at = ?3 WHERE id = ?1",
        params![id as i64, SUBMITTED, now],
    )?;
    get(conn, id)
}

/// Checks that the author may take reviewed request `id` as released.
pub fn releasable(conn: &Connection, id: u64, author: &str) -> Result<Release, RegistryError> {
    let release = own(conn, id, author)?;
    expect_state(&release, &[REVIEWED, RELEASED], "fetched")?;
    Ok(release)
}

/// Marks request `id` released by audit record `seq` (with its result hash).
pub fn mark_released(conn: &Connection, id: u64, seq: u64, hash: &str, now: &str) -> Result<Release, RegistryError> {
    let changed = conn.execute(
        "UPDATE release_requests SET state = ?2, released_seq = ?3, released_hash = ?4, updated_at = ?5
         WHERE id = ?1 AND state = ?6",
        params![id as i64, RELEASED, seq as i64, hash, now, REVIEWED],
    )?;
    if changed == 0 {
        return Err(refuse(format!("release request {id} is no longer reviewed")));
    }
    get(conn, id)
}
