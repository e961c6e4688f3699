//! The auditor's offline check: `sde-gateway audit verify --dir --public-key` on the log a real
//! gateway wrote.

use std::process::Command;

use crate::helpers::*;

#[tokio::test]
async fn audit_verify_passes_an_intact_log_and_names_the_first_edited_record() {
    // A checkpoint after every record, so the live log is signed up to its last record.
    let gw = spawn_gateway_with(|c| c.audit.checkpoint_records = 1).await;
    gw.query_as("alice", PROJECT, "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex")
        .await
        .unwrap();
    gw.query_as("dave", PROJECT, "SELECT COUNT(*) FROM patients")
        .await
        .unwrap_err();
    let verify = || {
        Command::new(env!("CARGO_BIN_EXE_sde-gateway"))
            .args(["audit", "verify", "--dir"])
            .arg(&gw.config.audit.dir)
            .arg("--public-key")
            .arg(gw.path(sde_gateway::demo::AUDIT_PUBLIC_KEY))
            .output()
            .unwrap()
    };
    let ok = verify();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("intact: 3 records"));

    // Rewrite history: make dave's refusal look accepted.
    let log = gw.audit_log();
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::write(&log, text.replacen("\"refused\"", "\"accepted\"", 1)).unwrap();
    let bad = verify();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("record 2"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}
