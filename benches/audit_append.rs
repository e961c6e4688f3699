//! Audit append throughput with and without group commit.
//!
//! `cargo bench --bench audit_append [-- TASKS RECORDS_PER_TASK]`: TASKS concurrent appenders
//! (default 64) each append RECORDS_PER_TASK records (default 50) to a fresh log in a temporary
//! folder on the target directory's disk, once with `max_batch = 1` (one fsync per record) and
//! once with the default `max_batch` (group commit). Every append waits until its record is
//! durable, as a query does before its result is released.

use std::time::Instant;

use sde_gateway::audit::{AuditLog, Entry, Options, SigningKey};

fn entry(i: usize) -> Entry {
    Entry {
        call: "query.release".into(),
        user: Some("alice".into()),
        project: Some("ews-asc-linkage".into()),
        sql: Some("SELECT sex, COUNT(*) FROM patients GROUP BY sex".into()),
        decision: "accepted".into(),
        result_hash: Some(format!("{i:064x}")),
        rows: Some(2),
        ..Default::default()
    }
}

fn run(rt: &tokio::runtime::Runtime, tasks: usize, per_task: usize, max_batch: usize) -> f64 {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir");
    let key = SigningKey::from_pem(&SigningKey::generate_pem()).expect("key");
    let options = Options {
        max_batch,
        ..Default::default()
    };
    let log = AuditLog::open_with(dir.path(), key, options).expect("open log");
    let started = Instant::now();
    rt.block_on(async {
        let handles: Vec<_> = (0..tasks)
            .map(|t| {
                let log = log.clone();
                tokio::spawn(async move {
                    for i in 0..per_task {
                        log.append(entry(t * per_task + i)).await.expect("append");
                    }
                })
            })
            .collect();
        for h in handles {
            h.await.expect("task");
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    rt.block_on(log.close()).expect("close");
    (tasks * per_task) as f64 / elapsed
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let tasks = args.first().copied().unwrap_or(64);
    let per_task = args.get(1).copied().unwrap_or(50);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let single = run(&rt, tasks, per_task, 1);
    let group = run(&rt, tasks, per_task, Options::default().max_batch);
    println!("audit appends, {tasks} concurrent appenders x {per_task} records, each durable before it returns:");
    println!("  one fsync per record (max_batch = 1): {single:>9.0} appends/s");
    println!(
        "  group commit (max_batch = {}):      {group:>9.0} appends/s",
        Options::default().max_batch
    );
    println!("  speed-up: {:.1}x", group / single);
}
