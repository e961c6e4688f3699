//! Ingest throughput: the demo's raw extracts for N people (default 1 000 000) put through the
//! real ingest (CSV and Parquet in, HMAC pseudonyms, generalisation, quarantine, identifier
//! scan, Parquet out, content hash), one dataset at a time.
//!
//! `cargo bench --bench ingest -- [people]`. Raw extracts are generated once into
//! `target/bench-ingest-<people>/raw`; each run writes new versions and reports rows read per
//! second, per dataset and overall.

use std::path::PathBuf;
use std::time::Instant;

use sde_gateway::demo::data;
use sde_gateway::ingest::{self, nhs::LinkageKey, spec::IngestSpec};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let people: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("target/bench-ingest-{people}"));
    let raw = root.join("raw");
    if !raw.join(".complete").exists() {
        let started = Instant::now();
        data::generate(&raw, people, sde_gateway::demo::DEFAULT_SEED).expect("raw extracts");
        std::fs::write(raw.join(".complete"), "").unwrap();
        println!(
            "raw extracts for {people} people written in {:.1}s",
            started.elapsed().as_secs_f64()
        );
    }
    std::fs::create_dir_all(root.join("keys")).unwrap();
    std::fs::write(root.join("keys/ingest-hmac.key"), LinkageKey::generate_hex()).unwrap();
    let specs = data::write_specs(&root.join("ingest")).expect("specs");

    let (mut rows, mut secs) = (0u64, 0f64);
    for path in specs {
        let (spec, text) = IngestSpec::load(&path, None).expect("spec");
        let _ = std::fs::remove_dir_all(spec.versions.join(&spec.dataset));
        let key = ingest::read_key(&spec.key_file).expect("key");
        let started = Instant::now();
        let report = ingest::ingest(&spec, &text, &key, chrono::Utc::now()).expect("ingest");
        let elapsed = started.elapsed().as_secs_f64();
        let m = &report.manifest;
        println!(
            "{:>14}: {:>10} rows read, {:>10} written in {:>6.2}s = {:>10.0} rows/s",
            m.dataset,
            m.source_rows,
            m.rows,
            elapsed,
            m.source_rows as f64 / elapsed
        );
        rows += m.source_rows;
        secs += elapsed;
    }
    println!(
        "{:>14}: {rows:>10} rows read in {secs:.2}s = {:.0} rows/s ({:.1}s per million rows)",
        "all",
        rows as f64 / secs,
        secs / (rows as f64 / 1e6)
    );
}
