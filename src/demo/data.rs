//! Synthetic demo data: raw, identifiable extracts shaped like the health and social care data
//! a Secure Data Environment for Essex would receive, ready for `ingest` to pseudonymise.
//!
//! [`generate`] writes five raw extracts under one directory, one folder per dataset
//! (`patients` and `opt_outs` as CSV, the others as Parquet), and [`write_specs`] the ingest
//! spec for each:
//!
//! | dataset         | one row per                                          |
//! | --------------- | ---------------------------------------------------- |
//! | `patients`      | person: NHS number, name, date of birth, sex,        |
//! |                 | ethnicity, full postcode, IMD decile                 |
//! | `gp_events`     | coded GP record entry (a SNOMED CT concept)          |
//! | `asc_services`  | adult social care service episode, with weekly cost  |
//! | `ews_referrals` | referral to the Essex Wellbeing Service              |
//! | `opt_outs`      | person who has registered a national data opt-out    |
//!
//! Every row carries the person's NHS number (see [`nhs_number`]: synthetic, in the 9…
//! range, with valid Modulus 11 check digits), which `ingest` turns into `person_id`, so the
//! datasets join the way a real linked extract does: an analyst can follow people from an EWS
//! referral into adult social care, or count GP events by district and ethnicity. As in real
//! extracts, a few records cannot be linked: about 0.4% of people have a second registration
//! with a mistyped NHS number (wrong check digit), and about 1% of adults a self-referral to
//! the Essex Wellbeing Service with no NHS number. `ingest` quarantines those records.
//!
//! # Why it is realistic enough for disclosure control to matter
//!
//! The numbers are invented, but their *shape* follows published sources, because the
//! gateway's statistical disclosure control is only exercised by data that produces the
//! same awkward results as the real thing:
//!
//! * **Small cells.** Districts are weighted by their 2021 census populations, ethnicity by
//!   the ONS 2021 broad groups, with minority groups more common in Harlow, Basildon and
//!   Colchester and rarer in Maldon and Uttlesford. A district × ethnicity × age band
//!   table therefore has many cells under 10, exactly as a real one does.
//! * **Outliers.** Ages run to 105 with only a handful over 100; a few people have 50–200
//!   GP events; adult social care costs are log-normal by service type with roughly 0.1%
//!   of packages costing £5,000–£15,000 a week. A maximum or a mean over a small group
//!   would single such people out.
//! * **Rare conditions.** SNOMED codes follow skewed, age-dependent frequencies, so codes
//!   such as HIV infection, cystic fibrosis or Down syndrome fall on very few people.
//! * **Linkage.** Referrals that end "Referred to ASC" are often followed, 1–180 days
//!   later, by a social care episode, and older people are far more likely to use both
//!   services: joins across datasets narrow groups down quickly.
//! * **Opt-outs.** About 3% of people have opted out. They remain in every dataset, as in a
//!   raw extract; the gateway has to remove them at query time.
//!
//! # Determinism
//!
//! The raw output depends only on `(people, seed)`: every person draws from their own random
//! streams, seeded from the seed, their index and the dataset, and the split of people
//! into chunks (one file per chunk per dataset, written in parallel) depends only on
//! `people`, so thread scheduling never changes a byte. Byte identity holds for a given
//! build: `SmallRng`'s algorithm and Parquet's encoder may change with the `rand` and
//! `parquet` versions. Identifying details (name, exact date of birth, postcode, the extra
//! unlinkable records) come from a separate stream, so the pseudonymised data has the same
//! people, ages and events as the generator made before it wrote raw extracts.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow;

use arrow::array::{ArrayBuilder, ArrayRef, Date32Builder, Float64Builder, Int32Builder, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::ingest::scan::{FAMILY_NAMES, GIVEN_NAMES};

/// The twelve Essex County Council districts with their relative population weights
/// (2021 census usual residents, in thousands).
pub const DISTRICTS: [(&str, u32); 12] = [
    ("Basildon", 188),
    ("Braintree", 156),
    ("Brentwood", 77),
    ("Castle Point", 90),
    ("Chelmsford", 181),
    ("Colchester", 194),
    ("Epping Forest", 134),
    ("Harlow", 94),
    ("Maldon", 66),
    ("Rochford", 87),
    ("Tendring", 148),
    ("Uttlesford", 91),
];

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoDataSummary {
    /// Number of people generated (rows of `patients`).
    pub people: usize,
    /// `(dataset, rows written)` for each dataset, in a fixed order.
    pub rows: Vec<(String, usize)>,
}

/// Why the demo data could not be written.
#[derive(Debug, thiserror::Error)]
pub enum DemoDataError {
    /// A directory or file could not be created, listed or removed.
    #[error("cannot write demo data to {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// Parquet encoding or writing failed.
    #[error("cannot encode demo data: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    /// An Arrow batch could not be assembled.
    #[error("cannot build demo data: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
}

/// Generates demo data for `people` people from `seed` into `out`.
///
/// Writes `out/<dataset>/part-<k>.parquet` for each of `patients`, `gp_events`,
/// `asc_services`, `ews_referrals` and `opt_outs`, creating the directories as needed.
/// Existing `part-*.parquet` files in those directories are removed first, so a rerun
/// with fewer people leaves no stale parts behind. Files are Snappy-compressed with row
/// groups of at most 1,000,000 rows.
///
/// The same `(people, seed)` always produces byte-identical files.
pub fn generate(out: &Path, people: usize, seed: u64) -> Result<DemoDataSummary, DemoDataError> {
    for dataset in DATASETS {
        let dir = out.join(dataset);
        fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        remove_stale_parts(&dir)?;
    }

    let model = Model::new();
    let chunks = people.div_ceil(MIN_PEOPLE_PER_CHUNK).clamp(1, MAX_CHUNKS);
    let per_chunk = people.div_ceil(chunks);
    let results: Vec<Result<[usize; 5], DemoDataError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..chunks)
            .map(|chunk| {
                let model = &model;
                let range = (chunk * per_chunk).min(people)..((chunk + 1) * per_chunk).min(people);
                scope.spawn(move || model.write_chunk(out, chunk, range, seed))
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
            .collect()
    });

    let mut totals = [0usize; 5];
    for rows in results {
        for (total, n) in totals.iter_mut().zip(rows?) {
            *total += n;
        }
    }
    Ok(DemoDataSummary {
        people,
        rows: DATASETS
            .iter()
            .zip(totals)
            .map(|(dataset, rows)| ((*dataset).to_owned(), rows))
            .collect(),
    })
}

/// The synthetic NHS number of person `index` (up to 10 million people): ten digits starting
/// with 9, outside the ranges issued to patients, with a valid Modulus 11 check digit. Person
/// `i` gets the first nine digits `900000000 + 10 i` (or `+ 1` where that base has no valid
/// check digit; two neighbouring bases never both lack one), so numbers never collide.
pub fn nhs_number(index: usize) -> String {
    let mut out = String::with_capacity(10);
    write_nhs_number(&mut out, index);
    out
}

fn write_nhs_number(out: &mut String, index: usize) {
    assert!(index < 10_000_000, "synthetic NHS numbers run out at 10 million people");
    let base = 900_000_000 + 10 * index as u64;
    for candidate in [base, base + 1] {
        let first_nine = candidate.to_string();
        if let Some(check) = crate::ingest::nhs::check_digit(first_nine.as_bytes()) {
            write!(out, "{first_nine}{check}").expect("writing to a String cannot fail");
            return;
        }
    }
    unreachable!("of two neighbouring bases at least one has a check digit");
}

/// Outward codes (postcode districts) of each of [`DISTRICTS`], in the same order. Each code
/// belongs to one district only, so `ingest` can map postcodes to districts.
pub const OUTWARD_CODES: [&[&str]; 12] = [
    &["SS13", "SS14", "SS15", "SS16", "CM11", "CM12"], // Basildon
    &["CM7", "CM77", "CM8", "CO9"],                    // Braintree
    &["CM13", "CM14", "CM15"],                         // Brentwood
    &["SS7", "SS8"],                                   // Castle Point
    &["CM1", "CM2", "CM3"],                            // Chelmsford
    &["CO1", "CO2", "CO3", "CO4"],                     // Colchester
    &["CM16", "IG10", "EN9"],                          // Epping Forest
    &["CM17", "CM18", "CM19", "CM20"],                 // Harlow
    &["CM9", "CM0"],                                   // Maldon
    &["SS4", "SS5", "SS6"],                            // Rochford
    &["CO12", "CO13", "CO15", "CO16"],                 // Tendring
    &["CB10", "CB11", "CM6", "CM24"],                  // Uttlesford
];

/// The extract date: ages are counted to it.
pub const EXTRACT_DATE: &str = "2025-12-31";

/// Writes `<dir>/<dataset>.toml`, the ingest spec of each raw extract, for a world laid out
/// as `raw/`, `ingest/` (this folder), `keys/`, `versions/` and `data/` side by side.
/// Returns the spec paths, in [`DATASETS`] order.
pub fn write_specs(dir: &Path) -> Result<Vec<PathBuf>, DemoDataError> {
    fs::create_dir_all(dir).map_err(io_error(dir))?;
    let mut paths = Vec::new();
    for dataset in DATASETS {
        let mut spec = format!(
            "# Ingest spec for the demo's raw {dataset} extract (see config/ingest.example.toml).\n\
             dataset = \"{dataset}\"\n\
             input = \"../raw/{dataset}\"\n\
             extract_date = \"{EXTRACT_DATE}\"\n\
             versions = \"../versions\"\n\
             publish = \"../data\"\n\
             key_file = \"../keys/ingest-hmac.key\"\n"
        );
        let rule = |spec: &mut String, name: &str, action: &str, extra: &str| {
            write!(spec, "\n[[columns]]\nname = \"{name}\"\naction = \"{action}\"\n{extra}").expect("String");
        };
        rule(&mut spec, "nhs_number", "pseudonymise", "");
        match dataset {
            "patients" => {
                rule(&mut spec, "name", "drop", "");
                rule(&mut spec, "sex", "keep", "");
                rule(&mut spec, "date_of_birth", "generalise", "to = \"age\"\n");
                rule(&mut spec, "date_of_birth", "generalise", "to = \"age_band\"\n");
                rule(&mut spec, "ethnicity", "keep", "");
                let mut map = String::from("to = \"postcode_district\"\noutput = \"district\"\n[columns.map]\n");
                for (codes, (district, _)) in OUTWARD_CODES.iter().zip(DISTRICTS) {
                    for code in *codes {
                        writeln!(map, "{code} = \"{district}\"").expect("String");
                    }
                }
                rule(&mut spec, "postcode", "generalise", &map);
                rule(&mut spec, "imd_decile", "keep", "type = \"int32\"\n");
            }
            "gp_events" => {
                rule(&mut spec, "event_date", "keep", "");
                rule(&mut spec, "snomed_code", "keep", "");
            }
            "asc_services" => {
                for column in ["service_type", "primary_support_reason", "start_date"] {
                    rule(&mut spec, column, "keep", "");
                }
                rule(&mut spec, "end_date", "keep", "nullable = true\n");
                rule(&mut spec, "weekly_cost", "keep", "");
            }
            "ews_referrals" => {
                for column in ["referral_date", "referral_source", "service", "outcome"] {
                    rule(&mut spec, column, "keep", "");
                }
            }
            _ => {}
        }
        let path = dir.join(format!("{dataset}.toml"));
        fs::write(&path, spec).map_err(io_error(&path))?;
        paths.push(path);
    }
    Ok(paths)
}

// ---------------------------------------------------------------------------------------
// Layout, sizes and calendar
// ---------------------------------------------------------------------------------------

/// The datasets, in the order summaries list them.
pub const DATASETS: [&str; 5] = ["patients", "gp_events", "asc_services", "ews_referrals", "opt_outs"];

/// Raw extracts written as CSV (the others are Parquet).
const CSV_DATASETS: [&str; 2] = ["patients", "opt_outs"];

/// Rows per Arrow batch handed to the Parquet writer.
const BATCH_ROWS: usize = 256 * 1024;
/// Upper bound on Parquet row group size.
const MAX_ROW_GROUP_ROWS: usize = 1_000_000;
/// People are split into at most this many chunks, each written by its own thread.
const MAX_CHUNKS: usize = 4;
/// Below this many people per chunk, fewer chunks are used.
const MIN_PEOPLE_PER_CHUNK: usize = 10_000;

/// First day covered by the extract, 2019-01-01, as days since the Unix epoch.
const FIRST_DAY: i32 = days_from_civil(2019, 1, 1);
/// Last day covered by the extract (the extract date), 2025-12-31.
const LAST_DAY: i32 = days_from_civil(2025, 12, 31);

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
const fn days_from_civil(year: i32, month: i32, day: i32) -> i32 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let year_of_era = y - era * 400;
    let shifted_month = (month + 9) % 12;
    let day_of_year = (153 * shifted_month + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

// ---------------------------------------------------------------------------------------
// Reference tables
// ---------------------------------------------------------------------------------------

/// How each district differs from the county average, in [`DISTRICTS`] order.
struct DistrictShape {
    /// Multiplier on the 65-and-over age bands (coastal and rural districts are older).
    older: f64,
    /// Multiplier on the 20–39 age bands.
    young_adults: f64,
    /// Multiplier on the shares of the minority ethnic groups.
    minorities: f64,
    /// Centre of the district's IMD decile distribution (1 = most deprived).
    imd_centre: f64,
}

const DISTRICT_SHAPES: [DistrictShape; 12] = [
    district_shape(0.90, 1.08, 1.60, 4.2), // Basildon
    district_shape(1.05, 0.95, 0.80, 6.0), // Braintree
    district_shape(1.05, 0.92, 1.20, 8.2), // Brentwood
    district_shape(1.30, 0.85, 0.70, 5.8), // Castle Point
    district_shape(0.95, 1.02, 1.20, 7.2), // Chelmsford
    district_shape(0.85, 1.20, 1.50, 5.6), // Colchester
    district_shape(1.05, 0.92, 1.50, 6.6), // Epping Forest
    district_shape(0.80, 1.12, 2.10, 4.0), // Harlow
    district_shape(1.45, 0.80, 0.45, 6.8), // Maldon
    district_shape(1.25, 0.85, 0.70, 7.4), // Rochford
    district_shape(1.60, 0.75, 0.55, 3.2), // Tendring
    district_shape(1.10, 0.85, 0.50, 8.6), // Uttlesford
];

const fn district_shape(older: f64, young_adults: f64, minorities: f64, imd: f64) -> DistrictShape {
    DistrictShape {
        older,
        young_adults,
        minorities,
        imd_centre: imd,
    }
}

/// Share of the population in each five-year age band (`0-4` … `95-99`, `100+`), in per cent (England and Wales,
/// 2021 census, rounded).
const AGE_BAND_SHARES: [f64; 21] = [
    5.4, 5.9, 6.0, 5.6, 5.9, 6.6, 6.8, 6.6, 6.2, 6.5, 7.0, 6.8, 5.9, 5.1, 5.1, 3.7, 2.6, 1.6, 0.7, 0.2, 0.02,
];

/// ONS 2021 broad ethnic groups.
const ETHNICITIES: [&str; 6] = [
    "White",
    "Asian or Asian British",
    "Black, Black British, Caribbean or African",
    "Mixed or Multiple",
    "Other ethnic group",
    "Not stated",
];

/// County-level shares per thousand of the four minority groups (before the district
/// multiplier); "Not stated" is fixed and "White" takes the rest.
const MINORITY_PER_MILLE: [f64; 4] = [31.0, 18.0, 18.0, 9.0];
const NOT_STATED_PER_MILLE: f64 = 15.0;

/// SNOMED CT concepts used for GP events, with relative frequencies for people under 50
/// and for people 50 and over. The skew is deliberate: common codes dominate and the
/// last few fall on a handful of people.
const SNOMED_CODES: [(&str, f64, f64); 45] = [
    ("54150009", 120.0, 60.0), // Upper respiratory infection
    ("38341003", 20.0, 200.0), // Hypertensive disorder
    ("35489007", 70.0, 45.0),  // Depressive disorder
    ("197480006", 70.0, 35.0), // Anxiety disorder
    ("195967001", 60.0, 35.0), // Asthma
    ("68566005", 40.0, 45.0),  // Urinary tract infection
    ("279039007", 45.0, 50.0), // Low back pain
    ("44054006", 10.0, 90.0),  // Type 2 diabetes mellitus
    ("55822004", 8.0, 70.0),   // Hyperlipidaemia
    ("396275006", 4.0, 60.0),  // Osteoarthritis
    ("235595009", 20.0, 30.0), // Gastro-oesophageal reflux disease
    ("40930008", 8.0, 25.0),   // Hypothyroidism
    ("13645005", 1.0, 35.0),   // Chronic obstructive lung disease
    ("49436004", 0.5, 35.0),   // Atrial fibrillation
    ("414545008", 1.0, 30.0),  // Ischaemic heart disease
    ("709044004", 1.0, 30.0),  // Chronic kidney disease
    ("414916001", 20.0, 20.0), // Obesity
    ("37796009", 18.0, 6.0),   // Migraine
    ("271737000", 10.0, 15.0), // Anaemia
    ("64859006", 0.5, 15.0),   // Osteoporosis
    ("84114007", 0.2, 15.0),   // Heart failure
    ("52448006", 0.05, 14.0),  // Dementia
    ("230690007", 0.3, 10.0),  // Cerebrovascular accident (stroke)
    ("22298006", 0.3, 8.0),    // Myocardial infarction
    ("9014002", 6.0, 5.0),     // Psoriasis
    ("69896004", 1.5, 5.0),    // Rheumatoid arthritis
    ("84757009", 4.0, 3.0),    // Epilepsy
    ("46635009", 3.0, 2.0),    // Type 1 diabetes mellitus
    ("7200002", 3.0, 3.0),     // Alcoholism
    ("254837009", 0.8, 5.0),   // Malignant neoplasm of breast
    ("399068003", 0.05, 5.0),  // Malignant tumour of prostate
    ("363406005", 0.2, 3.0),   // Malignant neoplasm of colon
    ("93880001", 0.1, 3.0),    // Primary malignant neoplasm of lung
    ("49049000", 0.05, 2.5),   // Parkinson's disease
    ("13746004", 1.5, 1.0),    // Bipolar disorder
    ("58214004", 1.2, 0.8),    // Schizophrenia
    ("34000006", 1.0, 0.6),    // Crohn's disease
    ("64766004", 1.0, 0.8),    // Ulcerative colitis
    ("24700007", 0.8, 0.6),    // Multiple sclerosis
    ("71620000", 0.1, 1.5),    // Fracture of femur
    ("110359009", 0.8, 0.3),   // Intellectual disability
    ("56882008", 0.4, 0.05),   // Anorexia nervosa
    ("86406008", 0.3, 0.15),   // Human immunodeficiency virus infection
    ("41040004", 0.15, 0.05),  // Complete trisomy 21 syndrome (Down syndrome)
    ("190905008", 0.1, 0.01),  // Cystic fibrosis
];

const SERVICE_TYPES: [&str; 8] = [
    "Residential care",
    "Nursing care",
    "Home care",
    "Day care",
    "Direct payment",
    "Supported living",
    "Reablement",
    "Equipment and adaptations",
];
const HOME_CARE: usize = 2;
const REABLEMENT: usize = 6;
const EQUIPMENT: usize = 7;

const SUPPORT_REASONS: [&str; 6] = [
    "Physical support",
    "Sensory support",
    "Support with memory and cognition",
    "Learning disability support",
    "Mental health support",
    "Social support",
];

/// Primary support reason weights for working-age adults (18–64), people 65–84 and
/// people 85 and over, in [`SUPPORT_REASONS`] order.
const REASONS_WORKING_AGE: [f64; 6] = [20.0, 3.0, 2.0, 45.0, 25.0, 5.0];
const REASONS_OLDER: [f64; 6] = [62.0, 5.0, 16.0, 2.0, 7.0, 8.0];
const REASONS_OLDEST: [f64; 6] = [58.0, 6.0, 28.0, 0.5, 3.0, 4.5];

/// Service type weights per support reason, rows in [`SUPPORT_REASONS`] order, columns
/// in [`SERVICE_TYPES`] order.
const SERVICE_MIX: [[f64; 8]; 6] = [
    [10.0, 8.0, 40.0, 2.0, 10.0, 0.0, 15.0, 15.0],  // Physical support
    [3.0, 1.0, 30.0, 10.0, 20.0, 2.0, 4.0, 30.0],   // Sensory support
    [28.0, 20.0, 30.0, 15.0, 3.0, 0.0, 4.0, 0.0],   // Memory and cognition
    [10.0, 2.0, 5.0, 20.0, 25.0, 38.0, 0.0, 0.0],   // Learning disability
    [12.0, 2.0, 20.0, 10.0, 20.0, 26.0, 10.0, 0.0], // Mental health
    [3.0, 0.0, 30.0, 35.0, 17.0, 10.0, 5.0, 0.0],   // Social support
];

/// Median weekly cost in pounds and log-scale spread per service type, in
/// [`SERVICE_TYPES`] order.
const SERVICE_COSTS: [(f64, f64); 8] = [
    (800.0, 0.25),  // Residential care
    (1100.0, 0.25), // Nursing care
    (250.0, 0.60),  // Home care
    (120.0, 0.50),  // Day care
    (350.0, 0.70),  // Direct payment
    (1200.0, 0.65), // Supported living
    (300.0, 0.30),  // Reablement
    (15.0, 0.80),   // Equipment and adaptations
];
/// Share of packages that are exceptional (£5,000–£15,000 a week).
const EXTREME_PACKAGE_SHARE: f64 = 0.001;
/// Chance that a person's most recent social care episode is still open.
const LAST_EPISODE_ONGOING: f64 = 0.8;
/// Chance that an EWS "Referred to ASC" outcome leads to a social care episode.
const REFERRAL_TAKEN_UP: f64 = 0.75;

const REFERRAL_SOURCES: [&str; 6] = [
    "GP",
    "Hospital discharge",
    "Self-referral",
    "Social care",
    "Community health",
    "Voluntary sector",
];
const EWS_SERVICES: [&str; 6] = [
    "Wellbeing coaching",
    "Stop smoking",
    "Weight management",
    "Social prescribing",
    "Falls prevention",
    "Carers support",
];
const EWS_OUTCOMES: [&str; 5] = ["Completed", "Declined", "Did not engage", "Referred to ASC", "Ongoing"];
const COMPLETED: usize = 0;
const REFERRED_TO_ASC: usize = 3;
const ONGOING: usize = 4;

/// EWS weights for people under 65 (first row) and 65 and over (second row).
const EWS_SOURCE_MIX: [[f64; 6]; 2] = [[40.0, 5.0, 30.0, 5.0, 10.0, 10.0], [35.0, 20.0, 10.0, 12.0, 15.0, 8.0]];
const EWS_SERVICE_MIX: [[f64; 6]; 2] = [[30.0, 20.0, 25.0, 15.0, 1.0, 9.0], [15.0, 5.0, 8.0, 30.0, 30.0, 12.0]];
const EWS_OUTCOME_MIX: [[f64; 5]; 2] = [[50.0, 12.0, 22.0, 5.0, 11.0], [45.0, 10.0, 12.0, 20.0, 13.0]];

/// Share of people with a national data opt-out.
const OPT_OUT_SHARE: f64 = 0.03;
/// Share of people with a second registration under a mistyped NHS number.
const UNLINKABLE_DUPLICATE_SHARE: f64 = 0.004;
/// Share of adults with a self-referral recorded without an NHS number.
const ANONYMOUS_REFERRAL_SHARE: f64 = 0.01;

// ---------------------------------------------------------------------------------------
// Randomness
// ---------------------------------------------------------------------------------------

/// The SplitMix64 finaliser: a bijection on `u64` with good avalanche.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Independent random streams per person, one for each dataset.
#[derive(Clone, Copy)]
enum Stream {
    Patient = 1,
    GpEvents = 2,
    SocialCare = 3,
    Wellbeing = 4,
    OptOut = 5,
    /// Identifying details: name, date of birth, postcode.
    Identity = 6,
    /// Records that cannot be linked (see [`Model::unlinkable`]).
    Unlinkable = 7,
}

/// The random stream of person `index` for one dataset.
fn person_rng(seed: u64, index: usize, stream: Stream) -> SmallRng {
    let key = splitmix64(seed ^ splitmix64((index as u64).wrapping_mul(8) ^ stream as u64));
    SmallRng::seed_from_u64(key)
}

/// Draws an index with probability proportional to its weight.
struct Weighted {
    cumulative: Vec<f64>,
}

impl Weighted {
    fn new(weights: impl IntoIterator<Item = f64>) -> Self {
        let cumulative: Vec<f64> = weights
            .into_iter()
            .scan(0.0, |total, weight| {
                *total += weight;
                Some(*total)
            })
            .collect();
        assert!(
            cumulative.last().is_some_and(|&total| total > 0.0),
            "a weighted choice needs a positive total weight"
        );
        Self { cumulative }
    }

    fn sample(&self, rng: &mut SmallRng) -> usize {
        let total = self.cumulative[self.cumulative.len() - 1];
        let x = rng.random::<f64>() * total;
        self.cumulative
            .partition_point(|&c| c <= x)
            .min(self.cumulative.len() - 1)
    }
}

/// A standard normal draw (Box–Muller).
fn standard_normal(rng: &mut SmallRng) -> f64 {
    let u1 = 1.0 - rng.random::<f64>(); // (0, 1]: keeps ln finite
    let u2 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// An exponential draw with the given mean.
fn exponential(rng: &mut SmallRng, mean: f64) -> f64 {
    -mean * (1.0 - rng.random::<f64>()).ln()
}

fn random_day(rng: &mut SmallRng) -> i32 {
    rng.random_range(FIRST_DAY..=LAST_DAY)
}

// ---------------------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------------------

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> DemoDataError + '_ {
    move |source| DemoDataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Removes `part-*` files left by an earlier run.
fn remove_stale_parts(dir: &Path) -> Result<(), DemoDataError> {
    for entry in fs::read_dir(dir).map_err(io_error(dir))? {
        let path = entry.map_err(io_error(dir))?.path();
        let stale = path
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.starts_with("part-"));
        if stale {
            fs::remove_file(&path).map_err(io_error(&path))?;
        }
    }
    Ok(())
}

fn utf8(name: &str) -> Field {
    Field::new(name, DataType::Utf8, false)
}

fn date(name: &str, nullable: bool) -> Field {
    Field::new(name, DataType::Date32, nullable)
}

fn schema(fields: Vec<Field>) -> SchemaRef {
    Arc::new(Schema::new(fields))
}

/// Column builders for one dataset.
trait Columns: Default {
    fn schema() -> SchemaRef;
    fn len(&self) -> usize;
    /// Takes the built columns, in schema order, and resets the builders.
    fn finish(&mut self) -> Vec<ArrayRef>;
}

enum Writer {
    Parquet(ArrowWriter<File>),
    Csv(arrow::csv::Writer<std::io::BufWriter<File>>),
}

/// One raw file being written: builders plus the writer they are flushed to.
struct Part<C> {
    schema: SchemaRef,
    writer: Writer,
    columns: C,
    rows: usize,
}

impl<C: Columns> Part<C> {
    fn create(out: &Path, dataset: &str, chunk: usize) -> Result<Self, DemoDataError> {
        let csv = CSV_DATASETS.contains(&dataset);
        let extension = if csv { "csv" } else { "parquet" };
        let path = out.join(dataset).join(format!("part-{chunk}.{extension}"));
        let file = File::create(&path).map_err(io_error(&path))?;
        let schema = C::schema();
        let writer = if csv {
            Writer::Csv(arrow::csv::Writer::new(std::io::BufWriter::with_capacity(
                1 << 20,
                file,
            )))
        } else {
            let properties = WriterProperties::builder()
                .set_compression(Compression::SNAPPY)
                .set_max_row_group_row_count(Some(MAX_ROW_GROUP_ROWS))
                .build();
            Writer::Parquet(ArrowWriter::try_new(file, schema.clone(), Some(properties))?)
        };
        Ok(Self {
            schema,
            writer,
            columns: C::default(),
            rows: 0,
        })
    }

    /// Hands a full batch to the writer; call after each person.
    fn flush_if_full(&mut self) -> Result<(), DemoDataError> {
        if self.columns.len() >= BATCH_ROWS {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DemoDataError> {
        if self.columns.len() == 0 {
            return Ok(());
        }
        let batch = RecordBatch::try_new(self.schema.clone(), self.columns.finish())?;
        self.rows += batch.num_rows();
        match &mut self.writer {
            Writer::Parquet(w) => w.write(&batch)?,
            Writer::Csv(w) => w.write(&batch)?,
        }
        Ok(())
    }

    /// Writes what is left and the footer; returns the number of rows written.
    fn close(mut self) -> Result<usize, DemoDataError> {
        self.flush()?;
        match self.writer {
            Writer::Parquet(w) => {
                w.close()?;
            }
            Writer::Csv(w) => {
                use std::io::Write as _;
                w.into_inner().flush().map_err(|source| DemoDataError::Io {
                    path: PathBuf::from("csv extract"),
                    source,
                })?;
            }
        }
        Ok(self.rows)
    }
}

#[derive(Default)]
struct PatientColumns {
    nhs_number: StringBuilder,
    name: StringBuilder,
    date_of_birth: Date32Builder,
    sex: StringBuilder,
    ethnicity: StringBuilder,
    postcode: StringBuilder,
    imd_decile: Int32Builder,
}

impl Columns for PatientColumns {
    fn schema() -> SchemaRef {
        schema(vec![
            utf8("nhs_number"),
            utf8("name"),
            date("date_of_birth", false),
            utf8("sex"),
            utf8("ethnicity"),
            utf8("postcode"),
            Field::new("imd_decile", DataType::Int32, false),
        ])
    }

    fn len(&self) -> usize {
        self.nhs_number.len()
    }

    fn finish(&mut self) -> Vec<ArrayRef> {
        vec![
            Arc::new(self.nhs_number.finish()),
            Arc::new(self.name.finish()),
            Arc::new(self.date_of_birth.finish()),
            Arc::new(self.sex.finish()),
            Arc::new(self.ethnicity.finish()),
            Arc::new(self.postcode.finish()),
            Arc::new(self.imd_decile.finish()),
        ]
    }
}

#[derive(Default)]
struct GpEventColumns {
    nhs_number: StringBuilder,
    event_date: Date32Builder,
    snomed_code: StringBuilder,
}

impl Columns for GpEventColumns {
    fn schema() -> SchemaRef {
        schema(vec![utf8("nhs_number"), date("event_date", false), utf8("snomed_code")])
    }

    fn len(&self) -> usize {
        self.nhs_number.len()
    }

    fn finish(&mut self) -> Vec<ArrayRef> {
        vec![
            Arc::new(self.nhs_number.finish()),
            Arc::new(self.event_date.finish()),
            Arc::new(self.snomed_code.finish()),
        ]
    }
}

#[derive(Default)]
struct AscColumns {
    nhs_number: StringBuilder,
    service_type: StringBuilder,
    primary_support_reason: StringBuilder,
    start_date: Date32Builder,
    end_date: Date32Builder,
    weekly_cost: Float64Builder,
}

impl Columns for AscColumns {
    fn schema() -> SchemaRef {
        schema(vec![
            utf8("nhs_number"),
            utf8("service_type"),
            utf8("primary_support_reason"),
            date("start_date", false),
            date("end_date", true),
            Field::new("weekly_cost", DataType::Float64, false),
        ])
    }

    fn len(&self) -> usize {
        self.nhs_number.len()
    }

    fn finish(&mut self) -> Vec<ArrayRef> {
        vec![
            Arc::new(self.nhs_number.finish()),
            Arc::new(self.service_type.finish()),
            Arc::new(self.primary_support_reason.finish()),
            Arc::new(self.start_date.finish()),
            Arc::new(self.end_date.finish()),
            Arc::new(self.weekly_cost.finish()),
        ]
    }
}

#[derive(Default)]
struct EwsColumns {
    nhs_number: StringBuilder,
    referral_date: Date32Builder,
    referral_source: StringBuilder,
    service: StringBuilder,
    outcome: StringBuilder,
}

impl Columns for EwsColumns {
    fn schema() -> SchemaRef {
        schema(vec![
            Field::new("nhs_number", DataType::Utf8, true),
            date("referral_date", false),
            utf8("referral_source"),
            utf8("service"),
            utf8("outcome"),
        ])
    }

    fn len(&self) -> usize {
        self.nhs_number.len()
    }

    fn finish(&mut self) -> Vec<ArrayRef> {
        vec![
            Arc::new(self.nhs_number.finish()),
            Arc::new(self.referral_date.finish()),
            Arc::new(self.referral_source.finish()),
            Arc::new(self.service.finish()),
            Arc::new(self.outcome.finish()),
        ]
    }
}

#[derive(Default)]
struct OptOutColumns {
    nhs_number: StringBuilder,
}

impl Columns for OptOutColumns {
    fn schema() -> SchemaRef {
        schema(vec![utf8("nhs_number")])
    }

    fn len(&self) -> usize {
        self.nhs_number.len()
    }

    fn finish(&mut self) -> Vec<ArrayRef> {
        vec![Arc::new(self.nhs_number.finish())]
    }
}

/// The five files of one chunk.
struct ChunkParts {
    patients: Part<PatientColumns>,
    gp_events: Part<GpEventColumns>,
    asc_services: Part<AscColumns>,
    ews_referrals: Part<EwsColumns>,
    opt_outs: Part<OptOutColumns>,
}

impl ChunkParts {
    fn create(out: &Path, chunk: usize) -> Result<Self, DemoDataError> {
        Ok(Self {
            patients: Part::create(out, DATASETS[0], chunk)?,
            gp_events: Part::create(out, DATASETS[1], chunk)?,
            asc_services: Part::create(out, DATASETS[2], chunk)?,
            ews_referrals: Part::create(out, DATASETS[3], chunk)?,
            opt_outs: Part::create(out, DATASETS[4], chunk)?,
        })
    }

    fn flush_if_full(&mut self) -> Result<(), DemoDataError> {
        self.patients.flush_if_full()?;
        self.gp_events.flush_if_full()?;
        self.asc_services.flush_if_full()?;
        self.ews_referrals.flush_if_full()?;
        self.opt_outs.flush_if_full()
    }

    /// Closes all five files; returns rows written, in [`DATASETS`] order.
    fn close(self) -> Result<[usize; 5], DemoDataError> {
        Ok([
            self.patients.close()?,
            self.gp_events.close()?,
            self.asc_services.close()?,
            self.ews_referrals.close()?,
            self.opt_outs.close()?,
        ])
    }
}

// ---------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------

/// One person: who they are in the run, and the facts the other datasets depend on.
struct Person {
    seed: u64,
    index: usize,
    age: i32,
    imd_decile: i32,
    name: String,
    date_of_birth: i32,
    sex: &'static str,
    ethnicity: &'static str,
    postcode: String,
}

impl Person {
    /// The person's own random stream for one dataset.
    fn rng(&self, stream: Stream) -> SmallRng {
        person_rng(self.seed, self.index, stream)
    }
}

/// A run of consecutive social care episodes for one person.
struct CareRun {
    start: i32,
    episodes: usize,
    reason: usize,
    /// Service type of the first episode, if not drawn from the reason's usual mix.
    first_service: Option<usize>,
}

/// Buffers reused from one person to the next.
#[derive(Default)]
struct Scratch {
    nhs_number: String,
    events: Vec<(i32, usize)>,
    conditions: Vec<usize>,
    referrals: Vec<i32>,
    asc_links: Vec<i32>,
}

/// Pre-built samplers shared read-only by the worker threads.
struct Model {
    district: Weighted,
    /// Age band sampler per district.
    age_band: Vec<Weighted>,
    /// Ethnicity sampler per district.
    ethnicity: Vec<Weighted>,
    snomed_under_50: Weighted,
    snomed_50_and_over: Weighted,
    reasons_working_age: Weighted,
    reasons_older: Weighted,
    reasons_oldest: Weighted,
    /// Service type sampler per support reason.
    service_mix: Vec<Weighted>,
    /// Service type at the start of care that follows an EWS referral.
    first_service_after_referral: Weighted,
    ews_source: [Weighted; 2],
    ews_service: [Weighted; 2],
    ews_outcome: [Weighted; 2],
}

impl Model {
    fn new() -> Self {
        let age_band = DISTRICT_SHAPES
            .iter()
            .map(|shape| {
                let share = |(band, &share): (usize, &f64)| match band {
                    4..=7 => share * shape.young_adults, // 20–39
                    13.. => share * shape.older,         // 65 and over
                    _ => share,
                };
                Weighted::new(AGE_BAND_SHARES.iter().enumerate().map(share))
            })
            .collect();
        let ethnicity = DISTRICT_SHAPES
            .iter()
            .map(|shape| {
                let minorities = MINORITY_PER_MILLE.map(|share| share * shape.minorities);
                let white = 1000.0 - minorities.iter().sum::<f64>() - NOT_STATED_PER_MILLE;
                Weighted::new(
                    std::iter::once(white)
                        .chain(minorities)
                        .chain(std::iter::once(NOT_STATED_PER_MILLE)),
                )
            })
            .collect();
        let mut first_service = [0.0; 8];
        first_service[REABLEMENT] = 45.0;
        first_service[HOME_CARE] = 30.0;
        first_service[EQUIPMENT] = 25.0;
        Self {
            district: Weighted::new(DISTRICTS.iter().map(|&(_, weight)| f64::from(weight))),
            age_band,
            ethnicity,
            snomed_under_50: Weighted::new(SNOMED_CODES.iter().map(|&(_, young, _)| young)),
            snomed_50_and_over: Weighted::new(SNOMED_CODES.iter().map(|&(_, _, old)| old)),
            reasons_working_age: Weighted::new(REASONS_WORKING_AGE),
            reasons_older: Weighted::new(REASONS_OLDER),
            reasons_oldest: Weighted::new(REASONS_OLDEST),
            service_mix: SERVICE_MIX.iter().map(|mix| Weighted::new(*mix)).collect(),
            first_service_after_referral: Weighted::new(first_service),
            ews_source: EWS_SOURCE_MIX.map(Weighted::new),
            ews_service: EWS_SERVICE_MIX.map(Weighted::new),
            ews_outcome: EWS_OUTCOME_MIX.map(Weighted::new),
        }
    }

    /// Generates people `range` and writes them as chunk `chunk` of every dataset.
    fn write_chunk(
        &self,
        out: &Path,
        chunk: usize,
        range: Range<usize>,
        seed: u64,
    ) -> Result<[usize; 5], DemoDataError> {
        let mut parts = ChunkParts::create(out, chunk)?;
        let mut scratch = Scratch::default();
        for index in range {
            scratch.nhs_number.clear();
            write_nhs_number(&mut scratch.nhs_number, index);
            let person = self.patient(seed, index, &scratch.nhs_number, &mut parts.patients.columns);
            self.gp_events(&person, &mut scratch, &mut parts.gp_events.columns);
            // Referrals come first: they decide who is referred on to social care.
            self.ews_referrals(&person, &mut scratch, &mut parts.ews_referrals.columns);
            self.asc_services(&person, &scratch, &mut parts.asc_services.columns);
            if person.rng(Stream::OptOut).random_bool(OPT_OUT_SHARE) {
                let opt_outs = &mut parts.opt_outs.columns;
                opt_outs.nhs_number.append_value(&scratch.nhs_number);
            }
            self.unlinkable(&person, &mut parts);
            parts.flush_if_full()?;
        }
        parts.close()
    }

    /// Records `ingest` must quarantine: a second registration with a mistyped NHS number
    /// (wrong check digit), and a self-referral to the wellbeing service with no NHS number.
    fn unlinkable(&self, person: &Person, parts: &mut ChunkParts) {
        let rng = &mut person.rng(Stream::Unlinkable);
        let number = nhs_number(person.index);
        if rng.random_bool(UNLINKABLE_DUPLICATE_SHARE) {
            let check = number.as_bytes()[9] - b'0';
            let mistyped = format!("{}{}", &number[..9], (check + 1) % 10);
            let out = &mut parts.patients.columns;
            out.nhs_number.append_value(mistyped);
            out.name.append_value(&person.name);
            out.date_of_birth.append_value(person.date_of_birth);
            out.sex.append_value(person.sex);
            out.ethnicity.append_value(person.ethnicity);
            out.postcode.append_value(&person.postcode);
            out.imd_decile.append_value(person.imd_decile);
        }
        if person.age >= 18 && rng.random_bool(ANONYMOUS_REFERRAL_SHARE) {
            let out = &mut parts.ews_referrals.columns;
            out.nhs_number.append_null();
            out.referral_date.append_value(random_day(rng));
            out.referral_source.append_value("Self-referral");
            out.service
                .append_value(EWS_SERVICES[rng.random_range(0..EWS_SERVICES.len())]);
            out.outcome.append_value("Did not engage");
        }
    }

    fn patient(&self, seed: u64, index: usize, nhs_number: &str, out: &mut PatientColumns) -> Person {
        let rng = &mut person_rng(seed, index, Stream::Patient);
        let district = self.district.sample(rng);
        let band = self.age_band[district].sample(rng);
        let age = if band < 20 {
            band as i32 * 5 + rng.random_range(0..5)
        } else {
            // Centenarians thin out fast: most are 100 or 101, almost none reach 105.
            (100.0 + exponential(rng, 1.2)).min(105.0) as i32
        };
        // Women outlive men, so the older bands are increasingly female.
        let female_share = match age {
            0..=64 => 0.505,
            65..=84 => 0.535,
            85..=94 => 0.63,
            _ => 0.75,
        };
        let sex = if rng.random_bool(female_share) { "F" } else { "M" };
        let ethnicity = self.ethnicity[district].sample(rng);
        let shape = &DISTRICT_SHAPES[district];
        let imd_decile = (shape.imd_centre + 2.0 * standard_normal(rng)).round().clamp(1.0, 10.0) as i32;

        // Identifying details come from their own stream, leaving the draws above unchanged.
        let identity = &mut person_rng(seed, index, Stream::Identity);
        let year = 2025 - age;
        let days_in_year = days_from_civil(year + 1, 1, 1) - days_from_civil(year, 1, 1);
        let date_of_birth = days_from_civil(year, 1, 1) + identity.random_range(0..days_in_year);
        let given = if sex == "M" {
            &GIVEN_NAMES[..24]
        } else {
            &GIVEN_NAMES[24..]
        };
        let name = format!(
            "{} {}",
            given[identity.random_range(0..given.len())],
            FAMILY_NAMES[identity.random_range(0..FAMILY_NAMES.len())]
        );
        let codes = OUTWARD_CODES[district];
        let postcode = format!(
            "{} {}{}{}",
            codes[identity.random_range(0..codes.len())],
            identity.random_range(0..10),
            char::from(b'A' + identity.random_range(0..26u8)),
            char::from(b'A' + identity.random_range(0..26u8)),
        );

        let spaced = format!("{} {} {}", &nhs_number[..3], &nhs_number[3..6], &nhs_number[6..]);
        out.nhs_number.append_value(&spaced);
        out.name.append_value(&name);
        out.date_of_birth.append_value(date_of_birth);
        out.sex.append_value(sex);
        out.ethnicity.append_value(ETHNICITIES[ethnicity]);
        out.postcode.append_value(&postcode);
        out.imd_decile.append_value(imd_decile);
        Person {
            seed,
            index,
            age,
            imd_decile,
            name,
            date_of_birth,
            sex,
            ethnicity: ETHNICITIES[ethnicity],
            postcode,
        }
    }

    /// GP events: a few for most people, 50–200 for a minority (mostly older people with
    /// long-term conditions), concentrated on each person's own conditions.
    fn gp_events(&self, person: &Person, scratch: &mut Scratch, out: &mut GpEventColumns) {
        let rng = &mut person.rng(Stream::GpEvents);
        let heavy_share = match person.age {
            0..=39 => 0.01,
            40..=64 => 0.04,
            65..=79 => 0.12,
            _ => 0.22,
        };
        let count = if rng.random_bool(heavy_share) {
            // Log-uniform on 50..=200.
            (50.0 * 4f64.powf(rng.random::<f64>())).round() as usize
        } else {
            let mean = match person.age {
                0..=4 => 5.0,
                5..=17 => 2.5,
                18..=39 => 4.0,
                40..=64 => 5.5,
                65..=79 => 8.0,
                _ => 10.0,
            };
            (exponential(rng, mean) as usize).min(49)
        };
        if count == 0 {
            return;
        }
        let codes = if person.age < 50 {
            &self.snomed_under_50
        } else {
            &self.snomed_50_and_over
        };
        scratch.conditions.clear();
        for _ in 0..(1 + count / 25).min(5) {
            scratch.conditions.push(codes.sample(rng));
        }
        scratch.events.clear();
        for _ in 0..count {
            let code = if rng.random_bool(0.65) {
                scratch.conditions[rng.random_range(0..scratch.conditions.len())]
            } else {
                codes.sample(rng)
            };
            scratch.events.push((random_day(rng), code));
        }
        scratch.events.sort_unstable();
        for &(day, code) in &scratch.events {
            out.nhs_number.append_value(&scratch.nhs_number);
            out.event_date.append_value(day);
            out.snomed_code.append_value(SNOMED_CODES[code].0);
        }
    }

    /// Essex Wellbeing Service referrals: adults, more often older or in deprived areas.
    /// Records in `scratch.asc_links` the referrals that lead on to social care.
    fn ews_referrals(&self, person: &Person, scratch: &mut Scratch, out: &mut EwsColumns) {
        scratch.asc_links.clear();
        let rng = &mut person.rng(Stream::Wellbeing);
        let base = match person.age {
            0..=17 => return,
            18..=64 => 0.035,
            _ => 0.09,
        };
        let deprivation = match person.imd_decile {
            1..=3 => 1.4,
            4..=7 => 1.0,
            _ => 0.7,
        };
        if !rng.random_bool(base * deprivation) {
            return;
        }
        let count = match rng.random::<f64>() {
            x if x < 0.65 => 1,
            x if x < 0.90 => 2,
            _ => 3,
        };
        scratch.referrals.clear();
        scratch.referrals.extend((0..count).map(|_| random_day(rng)));
        scratch.referrals.sort_unstable();
        let group = usize::from(person.age >= 65);
        for &day in &scratch.referrals {
            let source = self.ews_source[group].sample(rng);
            let service = self.ews_service[group].sample(rng);
            let mut outcome = self.ews_outcome[group].sample(rng);
            // Only recent referrals can still be open at the extract date.
            if outcome == ONGOING && day < LAST_DAY - 120 {
                outcome = COMPLETED;
            }
            if outcome == REFERRED_TO_ASC && rng.random_bool(REFERRAL_TAKEN_UP) {
                scratch.asc_links.push(day);
            }
            out.nhs_number.append_value(&scratch.nhs_number);
            out.referral_date.append_value(day);
            out.referral_source.append_value(REFERRAL_SOURCES[source]);
            out.service.append_value(EWS_SERVICES[service]);
            out.outcome.append_value(EWS_OUTCOMES[outcome]);
        }
    }

    /// Adult social care: mostly people over 65, plus working-age adults (many with a
    /// learning disability), and people referred on by the Essex Wellbeing Service.
    fn asc_services(&self, person: &Person, scratch: &Scratch, out: &mut AscColumns) {
        let rng = &mut person.rng(Stream::SocialCare);
        let (share, reasons) = match person.age {
            0..=17 => return,
            18..=64 => (0.015, &self.reasons_working_age),
            65..=74 => (0.09, &self.reasons_older),
            75..=84 => (0.22, &self.reasons_older),
            _ => (0.45, &self.reasons_oldest),
        };
        let reason = reasons.sample(rng);
        if rng.random_bool(share) {
            let episodes = match rng.random::<f64>() {
                x if x < 0.75 => 1,
                x if x < 0.93 => rng.random_range(2..=4),
                // A long tail of service changes: 5 to 30, mostly at the low end.
                _ => 5 + (exponential(rng, 4.0) as usize).min(25),
            };
            // Long histories of service changes start early in the period.
            let start = if episodes >= 5 {
                rng.random_range(FIRST_DAY..=FIRST_DAY + (LAST_DAY - FIRST_DAY) / 3)
            } else {
                random_day(rng)
            };
            let run = CareRun {
                start,
                episodes,
                reason,
                first_service: None,
            };
            self.care_episodes(rng, &scratch.nhs_number, run, out);
        }
        for &referral in &scratch.asc_links {
            let start = referral + rng.random_range(1..=180);
            if start > LAST_DAY {
                continue;
            }
            let mut episodes = match rng.random::<f64>() {
                x if x < 0.70 => 1,
                x if x < 0.95 => rng.random_range(2..=4),
                _ => rng.random_range(5..=10),
            };
            let first = self.first_service_after_referral.sample(rng);
            // Half of those leaving reablement go on to longer-term support.
            if first == REABLEMENT && episodes == 1 && rng.random_bool(0.5) {
                episodes = 2;
            }
            let run = CareRun {
                start,
                episodes,
                reason,
                first_service: Some(first),
            };
            self.care_episodes(rng, &scratch.nhs_number, run, out);
        }
    }

    /// Writes a run of consecutive care episodes from `start`, stopping at the first one
    /// still open at the extract date.
    fn care_episodes(&self, rng: &mut SmallRng, nhs_number: &str, run: CareRun, out: &mut AscColumns) {
        let CareRun {
            start,
            episodes,
            reason,
            first_service,
        } = run;
        let mean_days = if episodes == 1 {
            700.0
        } else {
            (f64::from(LAST_DAY - start) / episodes as f64).max(14.0)
        };
        let mut day = start;
        for episode in 0..episodes {
            if day > LAST_DAY {
                break;
            }
            let service = match first_service {
                Some(service) if episode == 0 => service,
                _ => self.service_mix[reason].sample(rng),
            };
            let length = if service == REABLEMENT {
                rng.random_range(7..=42) // reablement is time-limited, up to six weeks
            } else {
                (exponential(rng, mean_days) as i32).max(7)
            };
            let open = day + length > LAST_DAY
                || (episode + 1 == episodes && service != REABLEMENT && rng.random_bool(LAST_EPISODE_ONGOING));
            out.nhs_number.append_value(nhs_number);
            out.service_type.append_value(SERVICE_TYPES[service]);
            out.primary_support_reason.append_value(SUPPORT_REASONS[reason]);
            out.start_date.append_value(day);
            out.end_date.append_option((!open).then_some(day + length));
            out.weekly_cost.append_value(weekly_cost(rng, service));
            if open {
                break;
            }
            day += length + rng.random_range(0..=14);
        }
    }
}

/// Weekly cost in pounds, rounded to pennies: log-normal around the service's median,
/// with a small share of exceptional packages.
fn weekly_cost(rng: &mut SmallRng, service: usize) -> f64 {
    let pounds = if rng.random_bool(EXTREME_PACKAGE_SHARE) {
        rng.random_range(5_000.0..15_000.0)
    } else {
        let (median, spread) = SERVICE_COSTS[service];
        median * (spread * standard_normal(rng)).exp()
    };
    ((pounds * 100.0).round() / 100.0).max(0.01)
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use arrow::array::AsArray;
    use arrow::datatypes::{Date32Type, Float64Type, Int32Type};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    use super::*;

    const PEOPLE: usize = 20_000;
    const SEED: u64 = 42;

    fn part_files(out: &Path, dataset: &str) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = fs::read_dir(out.join(dataset))
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| path.extension().is_some_and(|e| e == "parquet" || e == "csv"))
            .collect();
        files.sort();
        files
    }

    fn read(out: &Path, dataset: &str) -> Vec<RecordBatch> {
        part_files(out, dataset)
            .into_iter()
            .flat_map(|path| {
                ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap())
                    .unwrap()
                    .build()
                    .unwrap()
                    .map(Result::unwrap)
            })
            .collect()
    }

    fn strings(batches: &[RecordBatch], column: &str) -> Vec<String> {
        batches
            .iter()
            .flat_map(|batch| {
                let array = batch.column_by_name(column).unwrap().as_string::<i32>();
                array.iter().map(|value| value.unwrap().to_owned()).collect::<Vec<_>>()
            })
            .collect()
    }

    fn days(batches: &[RecordBatch], column: &str) -> Vec<Option<i32>> {
        batches
            .iter()
            .flat_map(|batch| {
                let array = batch.column_by_name(column).unwrap();
                array.as_primitive::<Date32Type>().iter().collect::<Vec<_>>()
            })
            .collect()
    }

    fn rows(batches: &[RecordBatch]) -> usize {
        batches.iter().map(RecordBatch::num_rows).sum()
    }

    fn all_bytes(out: &Path) -> Vec<(String, Vec<u8>)> {
        DATASETS
            .iter()
            .flat_map(|dataset| part_files(out, dataset))
            .map(|path| {
                let name = path.strip_prefix(out).unwrap().display().to_string();
                (name, fs::read(&path).unwrap())
            })
            .collect()
    }

    #[test]
    fn calendar_constants() {
        assert_eq!(FIRST_DAY, 17_897);
        assert_eq!(LAST_DAY, 20_453);
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    }

    #[test]
    fn nhs_numbers_are_unique_and_valid() {
        let numbers: HashSet<String> = (0..100_000).map(nhs_number).collect();
        assert_eq!(numbers.len(), 100_000);
        assert!(numbers.iter().all(|n| crate::ingest::nhs::normalise(n).is_ok()));
        assert!(numbers.iter().all(|n| n.starts_with('9')));
        assert_eq!(nhs_number(9_999_999).len(), 10);
    }

    #[test]
    fn same_seed_gives_identical_raw_files() {
        let (a, b, c) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let first = generate(a.path(), PEOPLE, SEED).unwrap();
        let second = generate(b.path(), PEOPLE, SEED).unwrap();
        assert_eq!(first, second);
        let bytes = all_bytes(a.path());
        assert_eq!(bytes.len(), 2 * DATASETS.len(), "two chunks per dataset");
        assert_eq!(bytes, all_bytes(b.path()));

        generate(c.path(), PEOPLE, SEED + 1).unwrap();
        let other = all_bytes(c.path());
        assert!(bytes.iter().zip(&other).all(|(x, y)| x.0 == y.0 && x.1 != y.1));

        // Regenerating in place with fewer people leaves no stale parts behind.
        let summary = generate(a.path(), 10, SEED).unwrap();
        assert!(summary.rows[0].1 >= 10);
        assert_eq!(part_files(a.path(), "patients").len(), 1);
    }

    #[test]
    fn raw_extracts_hold_identifiers_and_unlinkable_records() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), PEOPLE, SEED).unwrap();
        let csv = fs::read_to_string(dir.path().join("patients/part-0.csv")).unwrap();
        let header = csv.lines().next().unwrap();
        assert_eq!(
            header,
            "nhs_number,name,date_of_birth,sex,ethnicity,postcode,imd_decile"
        );
        let first = csv.lines().nth(1).unwrap();
        assert!(first.starts_with(&format!("{} ", &nhs_number(0)[..3])), "{first}");
        let ews = read(dir.path(), "ews_referrals");
        let missing: usize = ews
            .iter()
            .map(|b| b.column_by_name("nhs_number").unwrap().null_count())
            .sum();
        assert!(missing > 50, "{missing} referrals without an NHS number");
    }

    #[test]
    fn shapes_are_realistic() {
        let dir = tempfile::tempdir().unwrap();
        let out = &crate::demo::ensure_data(dir.path(), PEOPLE, SEED).unwrap();
        let manifest = |dataset: &str| {
            crate::ingest::version::read_manifest(&out.join(dataset))
                .unwrap()
                .unwrap()
        };

        // patients
        let patients = read(out, "patients");
        assert_eq!(rows(&patients), PEOPLE);
        let fields: Vec<(String, DataType, bool)> = patients[0]
            .schema()
            .fields()
            .iter()
            .map(|f| (f.name().clone(), f.data_type().clone(), f.is_nullable()))
            .collect();
        let expected = [
            ("person_id", DataType::Utf8),
            ("sex", DataType::Utf8),
            ("age", DataType::Int32),
            ("age_band", DataType::Utf8),
            ("ethnicity", DataType::Utf8),
            ("district", DataType::Utf8),
            ("imd_decile", DataType::Int32),
        ]
        .map(|(name, data_type)| (name.to_owned(), data_type, false));
        assert_eq!(fields, expected);

        let ids = strings(&patients, "person_id");
        let id_set: HashSet<&String> = ids.iter().collect();
        assert_eq!(id_set.len(), PEOPLE);
        assert!(ids.iter().all(|id| id.len() == crate::ingest::nhs::PERSON_ID_LEN));
        // The mistyped duplicate registrations were quarantined, and nothing else.
        let quarantined = manifest("patients").quarantined;
        assert_eq!(
            quarantined.keys().collect::<Vec<_>>(),
            ["nhs_number: check digit invalid"]
        );
        assert!((20..=140).contains(&quarantined["nhs_number: check digit invalid"]));
        assert_eq!(
            manifest("ews_referrals").quarantined.keys().collect::<Vec<_>>(),
            ["nhs_number: missing"]
        );

        let districts: HashSet<String> = strings(&patients, "district").into_iter().collect();
        assert_eq!(districts.len(), 12);
        assert!(DISTRICTS.iter().all(|(name, _)| districts.contains(*name)));

        let bands = strings(&patients, "age_band");
        assert!(bands.iter().any(|band| band == "100+" || band == "95-99"));
        let females = strings(&patients, "sex").iter().filter(|s| *s == "F").count();
        assert!((0.49..0.53).contains(&(females as f64 / PEOPLE as f64)));
        let white = strings(&patients, "ethnicity").iter().filter(|e| *e == "White").count();
        assert!((0.86..0.93).contains(&(white as f64 / PEOPLE as f64)));
        for batch in &patients {
            let ages = batch.column_by_name("age").unwrap().as_primitive::<Int32Type>();
            assert!(ages.values().iter().all(|age| (0..=105).contains(age)));
            let imd = batch.column_by_name("imd_decile").unwrap();
            let imd = imd.as_primitive::<Int32Type>();
            assert!(imd.values().iter().all(|decile| (1..=10).contains(decile)));
        }

        // gp_events
        let gp = read(out, "gp_events");
        let gp_rows = rows(&gp);
        assert!((5 * PEOPLE..=20 * PEOPLE).contains(&gp_rows), "{gp_rows} GP events");
        assert!(
            days(&gp, "event_date")
                .iter()
                .all(|day| (FIRST_DAY..=LAST_DAY).contains(&day.unwrap()))
        );

        // opt_outs
        let opt_outs = strings(&read(out, "opt_outs"), "person_id");
        let share = opt_outs.len() as f64 / PEOPLE as f64;
        assert!((0.02..=0.04).contains(&share), "opt-out share {share}");
        assert!(opt_outs.iter().all(|id| id_set.contains(id)));

        // asc_services
        let asc = read(out, "asc_services");
        assert!(asc[0].schema().field_with_name("end_date").unwrap().is_nullable());
        let costs: Vec<f64> = asc
            .iter()
            .flat_map(|batch| {
                let costs = batch.column_by_name("weekly_cost").unwrap();
                costs.as_primitive::<Float64Type>().values().to_vec()
            })
            .collect();
        let max = costs.iter().copied().fold(f64::MIN, f64::max);
        let min = costs.iter().copied().fold(f64::MAX, f64::min);
        assert!(max > 5_000.0, "max weekly cost {max}");
        assert!(min >= 0.0, "min weekly cost {min}");
        let starts = days(&asc, "start_date");
        let ends = days(&asc, "end_date");
        assert!(starts.iter().zip(&ends).all(|(start, end)| {
            let start = start.unwrap();
            (FIRST_DAY..=LAST_DAY).contains(&start) && end.is_none_or(|end| end > start)
        }));
        let open = ends.iter().filter(|end| end.is_none()).count() as f64 / ends.len() as f64;
        assert!((0.25..0.55).contains(&open), "open episode share {open}");

        // EWS referrals that lead on to social care
        let ews = read(out, "ews_referrals");
        let mut first_asc_after: HashMap<String, Vec<i32>> = HashMap::new();
        for (id, start) in strings(&asc, "person_id").into_iter().zip(&starts) {
            first_asc_after.entry(id).or_default().push(start.unwrap());
        }
        let linked: HashSet<String> = strings(&ews, "person_id")
            .into_iter()
            .zip(strings(&ews, "outcome"))
            .zip(days(&ews, "referral_date"))
            .filter(|((_, outcome), _)| outcome == "Referred to ASC")
            .filter(|((id, _), referral)| {
                let referral = referral.unwrap();
                first_asc_after.get(id).is_some_and(|starts| {
                    starts
                        .iter()
                        .any(|&start| (referral + 1..=referral + 180).contains(&start))
                })
            })
            .map(|((id, _), _)| id)
            .collect();
        assert!(linked.len() >= 10, "{} linked EWS→ASC people", linked.len());

        // Nothing identifiable in any dataset: every value (not a sample) is scanned.
        for dataset in DATASETS {
            for batch in read(out, dataset) {
                let findings = crate::ingest::scan::scan_batch(&batch, &["person_id".to_owned()]);
                assert!(findings.is_empty(), "{dataset}: {findings:?}");
                assert!(batch.schema().field_with_name("nhs_number").is_err());
            }
        }

        assert_eq!(manifest("gp_events").rows as usize, gp_rows);
        assert_eq!(manifest("asc_services").rows as usize, rows(&asc));
        assert_eq!(manifest("ews_referrals").rows as usize, rows(&ews));
        assert_eq!(manifest("opt_outs").rows as usize, opt_outs.len());
    }
}
