//! `sde-gateway release …` (researchers) and `sde-gateway review …` (output checkers): a
//! command-line client of ReviewService over TLS, printing readable text or, with `--json`,
//! the service's messages as JSON. It holds no rights of its own: the gateway decides with the
//! caller's token.

use std::path::PathBuf;

use clap::Subcommand;
use datafusion::arrow::ipc::reader::StreamReader;
use datafusion::arrow::record_batch::RecordBatch;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::admin_client::{Connection, emit};
use crate::api::client::{Bearer, tls_channel};
use crate::api::proto::review_service_client::ReviewServiceClient;
use crate::api::proto::{self as pb};

#[derive(Debug, Subcommand)]
pub enum ReleaseCommand {
    /// Ask for the release of a result whose cells were withheld, by its receipt (the
    /// x-sde-audit-seq of its DoGet).
    Request {
        receipt: u64,
        /// What the output is for, and why its withheld cells are safe to release.
        #[arg(long)]
        why: String,
    },
    /// Your release requests.
    List,
    /// One request: its state and the checkers' reviews.
    Status { id: u64 },
    /// Withdraw a request.
    Withdraw { id: u64 },
    /// Resubmit a returned request, with a new justification if given.
    Resubmit {
        id: u64,
        #[arg(long, default_value = "")]
        why: String,
    },
    /// Fetch a reviewed request's release: printed, or written to a file (`.csv`, or `.arrow`
    /// for an Arrow IPC stream).
    Fetch {
        id: u64,
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ReviewCommand {
    /// The requests you may review now (output checkers), and the changes to approved projects
    /// that wait for your signature (board members).
    List,
    /// A request with every cell's true value, its release value, what the author saw and the
    /// rule outcome.
    Show { id: u64 },
    /// Approve a request (a second checker's approval makes it reviewed).
    Approve {
        id: u64,
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Return a request to its author for changes.
    Return {
        id: u64,
        #[arg(long)]
        comment: String,
    },
    /// Reject a request (final).
    Reject {
        id: u64,
        #[arg(long)]
        comment: String,
    },
}

async fn open(c: &Connection) -> anyhow::Result<ReviewServiceClient<InterceptedService<Channel, Bearer>>> {
    let bearer = Bearer::from_file(&c.token)?;
    let channel = tls_channel(&c.addr, &c.ca, &c.server_name, None, &c.client).await?;
    Ok(ReviewServiceClient::with_interceptor(channel, bearer).max_decoding_message_size(64 * 1024 * 1024))
}

fn print_list(list: &[pb::ReleaseRequest]) {
    println!(
        "{:<5} {:<20} {:<10} {:<19} {:<8} SQL",
        "ID", "PROJECT", "AUTHOR", "STATE", "RECEIPT"
    );
    for r in list {
        let sql: String = r.sql.split_whitespace().collect::<Vec<_>>().join(" ");
        println!(
            "{:<5} {:<20} {:<10} {:<19} {:<8} {}",
            r.id, r.project, r.author, r.state, r.receipt, sql
        );
    }
}

fn print_request(r: &pb::ReleaseRequest) {
    println!("release request {} ({})", r.id, r.state);
    println!("project        {}", r.project);
    println!("author         {}", r.author);
    println!("result         receipt {}", r.receipt);
    println!(
        "sql            {}",
        r.sql.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    println!("justification  {}", r.justification);
    println!("round          {}", r.round);
    for v in &r.reviews {
        println!(
            "review         round {}: {} by {} on {}{}",
            v.round,
            v.decision,
            v.checker,
            v.decided_at,
            if v.comment.is_empty() {
                String::new()
            } else {
                format!(": {}", v.comment)
            }
        );
    }
    if r.released_receipt > 0 {
        println!("released       audit record {}", r.released_receipt);
    }
}

fn print_view(v: &pb::ReviewView) {
    if let Some(r) = &v.request {
        print_request(r);
    }
    println!(
        "withheld       {} cells, {} groups (rules {})",
        v.cells_withheld, v.groups_withheld, v.rules
    );
    println!();
    let keys = v.key_columns.join(", ");
    println!(
        "{:<30} {:>7} {:<16} {:>12} {:>12} {:>12}  OUTCOME",
        if keys.is_empty() { "(no keys)" } else { &keys },
        "PEOPLE",
        "COLUMN",
        "TRUE",
        "RELEASE",
        "AUTHOR SAW"
    );
    for row in &v.rows {
        let people = if row.people.is_empty() { "?" } else { &row.people };
        for c in &row.cells {
            println!(
                "{:<30} {:>7} {:<16} {:>12} {:>12} {:>12}  {}",
                row.keys.join(", "),
                people,
                c.column,
                c.true_value,
                c.release_value,
                c.author_value,
                c.outcome
            );
        }
    }
}

fn batches(ipc: &[u8]) -> anyhow::Result<Vec<RecordBatch>> {
    Ok(StreamReader::try_new(std::io::Cursor::new(ipc), None)?.collect::<Result<Vec<_>, _>>()?)
}

/// Runs one `release` command.
pub async fn release(c: &Connection, command: ReleaseCommand) -> anyhow::Result<()> {
    let json_out = c.json;
    let mut client = open(c).await?;
    let request = match command {
        ReleaseCommand::Request { receipt, why } => {
            client
                .request_release(pb::NewReleaseRequest {
                    receipt,
                    justification: why,
                })
                .await?
        }
        ReleaseCommand::List => {
            let list = client
                .list_releases(pb::ListReleasesRequest { queue: false })
                .await?
                .into_inner();
            emit(json_out, &list, |l| print_list(&l.requests));
            return Ok(());
        }
        ReleaseCommand::Status { id } => client.get_release(pb::ReleaseRef { id }).await?,
        ReleaseCommand::Withdraw { id } => client.withdraw_release(pb::ReleaseRef { id }).await?,
        ReleaseCommand::Resubmit { id, why } => {
            client
                .resubmit_release(pb::Resubmission { id, justification: why })
                .await?
        }
        ReleaseCommand::Fetch { id, out } => {
            let released = client.fetch_release(pb::ReleaseRef { id }).await?.into_inner();
            let rows = batches(&released.arrow_ipc)?;
            match out {
                Some(path) if path.extension().is_some_and(|e| e == "arrow") => {
                    std::fs::write(&path, &released.arrow_ipc)?;
                }
                Some(path) => {
                    let mut writer = datafusion::arrow::csv::Writer::new(std::fs::File::create(&path)?);
                    for b in &rows {
                        writer.write(b)?;
                    }
                }
                None if json_out => {}
                None => println!("{}", datafusion::arrow::util::pretty::pretty_format_batches(&rows)?),
            }
            let receipt = serde_json::json!({
                "request": released.request,
                "receipt_seq": released.receipt_seq,
                "receipt_hash": released.receipt_hash,
            });
            emit(json_out, &receipt, |_| {
                println!(
                    "released by audit record {} ({})",
                    released.receipt_seq, released.receipt_hash
                )
            });
            return Ok(());
        }
    };
    let request = request.into_inner();
    emit(json_out, &request, print_request);
    Ok(())
}

/// Runs one `review` command.
pub async fn review(c: &Connection, command: ReviewCommand) -> anyhow::Result<()> {
    let json_out = c.json;
    let mut client = open(c).await?;
    let (id, decision, comment) = match command {
        ReviewCommand::List => {
            let list = client
                .list_releases(pb::ListReleasesRequest { queue: true })
                .await?
                .into_inner();
            emit(json_out, &list, |l| {
                print_list(&l.requests);
                for c in &l.changes {
                    println!(
                        "change {} to {}: {} (by {} on {}); sign as {} with `admin sign-change {} {} --role {}`",
                        c.change,
                        c.project,
                        c.description,
                        c.requested_by,
                        c.requested_at,
                        c.role,
                        c.project,
                        c.change,
                        c.role
                    );
                }
            });
            return Ok(());
        }
        ReviewCommand::Show { id } => {
            let v = client.show_review(pb::ReleaseRef { id }).await?.into_inner();
            emit(json_out, &v, print_view);
            return Ok(());
        }
        ReviewCommand::Approve { id, comment } => (id, "approve", comment),
        ReviewCommand::Return { id, comment } => (id, "return", comment),
        ReviewCommand::Reject { id, comment } => (id, "reject", comment),
    };
    let r = client
        .decide_review(pb::ReviewDecision {
            id,
            decision: decision.into(),
            comment,
        })
        .await?
        .into_inner();
    emit(json_out, &r, print_request);
    Ok(())
}
