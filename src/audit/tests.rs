use super::*;

fn entry(n: u64) -> Entry {
    Entry {
        call: "query.release".into(),
        decision: "accepted".into(),
        rows: Some(n),
        ..Default::default()
    }
}

fn key() -> (String, PublicKey) {
    let pem = SigningKey::generate_pem();
    let public = SigningKey::from_pem(&pem).unwrap().public_key();
    (pem, public)
}

fn open(dir: &Path, pem: &str, options: Options) -> AuditLog {
    AuditLog::open_with(dir, SigningKey::from_pem(pem).unwrap(), options).unwrap()
}

/// A closed log of `n` records, checkpointed every 2 records.
fn written(n: u64) -> (tempfile::TempDir, String, PublicKey) {
    let dir = tempfile::tempdir().unwrap();
    let (pem, public) = key();
    let options = Options {
        checkpoint_records: 2,
        ..Default::default()
    };
    let log = open(dir.path(), &pem, options);
    for i in 0..n {
        log.append_blocking(entry(i)).unwrap();
    }
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(log.close())
        .unwrap();
    (dir, pem, public)
}

fn lines(dir: &Path, file: &str) -> Vec<String> {
    std::fs::read_to_string(dir.join(file))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(dir: &Path, file: &str, lines: &[String]) {
    std::fs::write(
        dir.join(file),
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
}

#[test]
fn an_intact_log_verifies_reopens_and_continues_its_chain() {
    let (dir, pem, public) = written(5);
    let v = verify_dir(dir.path(), &public).unwrap();
    assert_eq!(v.records.len(), 5);
    assert_eq!(v.unsigned, 0, "close signs a final checkpoint");
    assert_eq!(v.checkpoints.last().unwrap().size, 5);
    let log = open(dir.path(), &pem, Options::default());
    assert_eq!(log.append_blocking(entry(5)).unwrap().seq, 5);
    assert_eq!(log.record(5).unwrap().unwrap().entry.rows, Some(5));
    assert_eq!(log.read(0, 10, |r| r.entry.rows > Some(2)).unwrap().len(), 3);
}

#[test]
fn a_flipped_byte_is_named_by_its_record() {
    let (dir, _, public) = written(5);
    let mut l = lines(dir.path(), LOG_FILE);
    l[2] = l[2].replace("\"rows\":2", "\"rows\":3");
    write_lines(dir.path(), LOG_FILE, &l);
    let err = verify_dir(dir.path(), &public).unwrap_err().to_string();
    assert!(
        err.contains("record 2") && err.contains("does not match its hash"),
        "{err}"
    );
}

#[test]
fn a_rewritten_chain_is_caught_by_the_signed_checkpoints() {
    // The forger recomputes every hash after the edit, so the chain alone looks intact.
    let (dir, _, public) = written(5);
    let records = verify(&dir.path().join(LOG_FILE)).unwrap();
    let mut prev = GENESIS.to_owned();
    let mut forged = Vec::new();
    for mut r in records {
        if r.seq == 3 {
            r.entry.rows = Some(99);
        }
        r.prev_hash = prev;
        r.hash = record_hash(r.seq, &r.time, &r.prev_hash, &r.entry);
        prev = r.hash.clone();
        forged.push(serde_json::to_string(&r).unwrap());
    }
    write_lines(dir.path(), LOG_FILE, &forged);
    let err = verify_dir(dir.path(), &public).unwrap_err().to_string();
    assert!(
        err.contains("changed after signing") && err.contains("records 2..4"),
        "{err}"
    );
}

#[test]
fn deleting_or_swapping_records_is_detected() {
    let (dir, _, public) = written(5);
    let l = lines(dir.path(), LOG_FILE);
    write_lines(
        dir.path(),
        LOG_FILE,
        &[l[0].clone(), l[2].clone(), l[3].clone(), l[4].clone()],
    );
    let err = verify_dir(dir.path(), &public).unwrap_err().to_string();
    assert!(err.contains("record 1"), "{err}");
    let mut swapped = l.clone();
    swapped.swap(1, 3);
    write_lines(dir.path(), LOG_FILE, &swapped);
    let err = verify_dir(dir.path(), &public).unwrap_err().to_string();
    assert!(err.contains("record 1"), "{err}");
}

#[test]
fn truncating_signed_records_is_detected() {
    let (dir, pem, public) = written(5);
    let l = lines(dir.path(), LOG_FILE);
    write_lines(dir.path(), LOG_FILE, &l[..3]);
    let err = verify_dir(dir.path(), &public).unwrap_err().to_string();
    assert!(err.contains("truncated") && err.contains("only 3 remain"), "{err}");
    // The gateway refuses to start on it too, rather than carrying on from record 3.
    let err = AuditLog::open(dir.path(), SigningKey::from_pem(&pem).unwrap()).unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
}

#[test]
fn a_forged_or_foreign_checkpoint_is_detected() {
    let (dir, _, public) = written(4);
    let mut c = lines(dir.path(), CHECKPOINT_FILE);
    let mut forged: Checkpoint = serde_json::from_str(&c[0]).unwrap();
    forged.root = "00".repeat(32);
    c[0] = serde_json::to_string(&forged).unwrap();
    write_lines(dir.path(), CHECKPOINT_FILE, &c);
    let err = verify_dir(dir.path(), &public).unwrap_err().to_string();
    assert!(err.contains("checkpoint 0") && err.contains("signature"), "{err}");

    let (dir, _, _) = written(4);
    let (_, other) = key();
    let err = verify_dir(dir.path(), &other).unwrap_err().to_string();
    assert!(err.contains("signature"), "{err}");

    let (dir, _, public) = written(4);
    std::fs::write(dir.path().join(CHECKPOINT_FILE), "").unwrap();
    let verified = verify_dir(dir.path(), &public).unwrap();
    assert_eq!(
        verified.unsigned,
        verified.records.len() as u64,
        "an unsigned tail, not damage"
    );
}

#[test]
fn a_torn_last_record_is_reported_moved_aside_and_recorded() {
    let (dir, pem, public) = written(3);
    let path = dir.path().join(LOG_FILE);
    let mut bytes = std::fs::read(&path).unwrap();
    let torn = b"{\"seq\":3,\"time\":\"2026";
    bytes.extend_from_slice(torn);
    std::fs::write(&path, &bytes).unwrap();
    let err = verify_dir(dir.path(), &public).unwrap_err().to_string();
    assert!(err.contains("record 3") && err.contains("torn"), "{err}");

    let log = open(dir.path(), &pem, Options::default());
    let note = log.record(3).unwrap().unwrap();
    assert_eq!(note.entry.call, "audit.recovery");
    assert!(note.entry.rule.unwrap().contains(&format!("{} bytes", torn.len())));
    assert!(
        std::fs::read_dir(dir.path())
            .unwrap()
            .any(|e| { e.unwrap().file_name().to_string_lossy().starts_with("audit.log.torn-") })
    );
    drop(log);
    // Reopening signed a checkpoint over the recovery record, so the log verifies whole.
    let v = verify_dir(dir.path(), &public).unwrap();
    assert_eq!(v.records.len(), 4);
}

#[test]
fn proofs_from_the_live_log_verify_with_the_public_key_only() {
    let (dir, pem, public) = written(6);
    let log = open(dir.path(), &pem, Options::default());
    let latest = log.latest_checkpoint().unwrap();
    assert!(latest.signed_by(&public));
    let first = log.checkpoint_of(2).unwrap();
    let record = log.record(4).unwrap().unwrap();
    let proof = log.inclusion_proof(4, latest.size).unwrap();
    assert!(checkpoint::verify_inclusion(
        latest.size,
        &latest.root,
        4,
        &record.hash,
        &proof
    ));
    let proof = log.consistency_proof(first.size, latest.size).unwrap();
    assert!(checkpoint::verify_consistency(
        first.size,
        &first.root,
        latest.size,
        &latest.root,
        &proof
    ));
    assert!(log.inclusion_proof(6, 6).is_none());
}

#[test]
fn concurrent_appends_share_fsyncs_and_all_land_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (pem, public) = key();
    let log = open(dir.path(), &pem, Options::default());
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                (0..50)
                    .map(|i| log.append_blocking(entry(t * 100 + i)).unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let receipts: Vec<Receipt> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(log.close()).unwrap();
    let v = verify_dir(dir.path(), &public).unwrap();
    assert_eq!(v.unsigned, 0);
    assert_eq!(v.records.len(), 400);
    for r in receipts {
        assert_eq!(v.records[r.seq as usize].hash, r.hash);
    }
}

#[test]
fn after_close_nothing_more_is_accepted() {
    let (dir, pem, _) = written(1);
    let log = open(dir.path(), &pem, Options::default());
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(log.close()).unwrap();
    let err = log.append_blocking(entry(9)).unwrap_err();
    assert!(matches!(err, AuditError::Unavailable(_)), "{err}");
}

#[test]
fn a_checkpoint_is_signed_once_the_interval_passes() {
    let dir = tempfile::tempdir().unwrap();
    let (pem, public) = key();
    let options = Options {
        checkpoint_records: 1_000_000,
        checkpoint_interval: Duration::from_millis(20),
        ..Default::default()
    };
    let log = open(dir.path(), &pem, options);
    log.append_blocking(entry(0)).unwrap();
    // The writer wakes by itself once the interval has passed; wait (bounded) for it.
    let signed = (0..1000).find_map(|_| {
        std::thread::sleep(Duration::from_millis(10));
        log.latest_checkpoint()
    });
    let c = signed.expect("a time-based checkpoint within 10 s");
    assert_eq!(c.size, 1);
    assert!(c.signed_by(&public));
}

#[test]
fn a_detached_append_is_durable_by_close_without_anyone_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let (pem, _) = key();
    let log = open(dir.path(), &pem, Options::default());
    let mut abandoned = entry(2);
    abandoned.decision = "cancelled".into();
    log.append_detached(abandoned);
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(log.close()).unwrap();
    let records = verify(&dir.path().join(LOG_FILE)).unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].entry.decision, "cancelled");
    assert_eq!(records[0].entry.rows, Some(2));
}

/// Appends `entry` as `durability` from a plain thread.
fn append_as(log: &AuditLog, entry: Entry, durability: Durability) -> Receipt {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(log.append_as(entry, durability))
        .unwrap()
}

/// A log in `dir` whose deferred records wait up to `wait` for their fsync.
fn deferring(dir: &Path, pem: &str, wait: Duration) -> AuditLog {
    let options = Options {
        deferred_sync: wait,
        ..Default::default()
    };
    open(dir, pem, options)
}

#[test]
fn a_deferred_record_is_written_at_once_and_durable_within_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (pem, _) = key();
    // Long enough that the checks below run before the timer, even on a loaded machine.
    let log = deferring(dir.path(), &pem, Duration::from_secs(1));
    let receipt = append_as(&log, entry(0), Durability::Deferred);
    // Answered once written: it is in the file (a crash of the gateway keeps it), not yet synced.
    assert_eq!((log.len(), log.durable_len()), (1, 0));
    assert_eq!(lines(dir.path(), LOG_FILE).len(), 1);
    assert_eq!(log.record(receipt.seq).unwrap().unwrap().hash, receipt.hash);
    // The writer syncs it by itself once the limit has passed; wait (bounded) for it.
    let synced = (0..1000).any(|_| {
        std::thread::sleep(Duration::from_millis(10));
        log.durable_len() == 1
    });
    assert!(synced, "durable within 10 s");
}

#[test]
fn the_next_fsync_or_checkpoint_makes_deferred_records_durable() {
    let dir = tempfile::tempdir().unwrap();
    let (pem, public) = key();
    let log = deferring(dir.path(), &pem, Duration::from_secs(3600));
    append_as(&log, entry(0), Durability::Deferred);
    append_as(&log, entry(1), Durability::Deferred);
    assert_eq!((log.len(), log.durable_len()), (2, 0));
    // A durable record's fsync covers every deferred record before it.
    log.append_blocking(entry(2)).unwrap();
    assert_eq!(log.durable_len(), 3);
    // A checkpoint signs only durable records: it syncs first.
    append_as(&log, entry(3), Durability::Deferred);
    assert_eq!(log.durable_len(), 3);
    let c = log.checkpoint_blocking().unwrap().expect("a new checkpoint");
    assert_eq!((c.size, log.durable_len()), (4, 4));
    assert!(c.signed_by(&public));
    // Zero wait: a deferred record is synced before it is answered.
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(log.close()).unwrap();
    let log = deferring(dir.path(), &pem, Duration::ZERO);
    append_as(&log, entry(4), Durability::Deferred);
    assert_eq!((log.len(), log.durable_len()), (5, 5));
}
