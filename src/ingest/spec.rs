//! The ingest spec: where a raw extract is, what becomes of each of its columns, and where the
//! pseudonymised dataset goes. Every column of the extract must be named by a rule, so a column
//! added to an extract upstream is refused rather than passed through. Documented key by key in
//! `config/ingest.example.toml`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use datafusion::arrow::datatypes::DataType;
use serde::Deserialize;

use super::IngestError;

/// Environment variable that overrides the spec's `key_file` (keeps the key's location out of
/// files that travel with the data).
pub const KEY_FILE_ENV: &str = "SDE_INGEST__KEY_FILE";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestSpec {
    /// Name the dataset is served as.
    pub dataset: String,
    /// A CSV or Parquet file, or a folder of them.
    pub input: PathBuf,
    /// `csv` or `parquet`; by default taken from the file extension.
    #[serde(default)]
    pub format: Option<InputFormat>,
    /// Ages are computed at this date (`2025-12-31`, quoted or not).
    #[serde(deserialize_with = "date")]
    pub extract_date: NaiveDate,
    /// Every version is written, immutable, under `<versions>/<dataset>/<version>/`.
    pub versions: PathBuf,
    /// If set, the new version is also published to `<publish>/<dataset>/` (the served folder).
    #[serde(default)]
    pub publish: Option<PathBuf>,
    /// Hex file holding the HMAC key (at least 32 bytes). Never inside the data folders.
    pub key_file: PathBuf,
    /// One rule per column of the extract, in output order.
    pub columns: Vec<ColumnRule>,
}

/// `path` taken from `base` if relative, with `.` and `..` folded away (so reports say
/// `world/versions`, not `world/ingest/../versions`).
fn resolve(base: &Path, path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for component in base.join(path).components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.components().next_back(), Some(Component::Normal(_))) => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// A TOML date or a `YYYY-MM-DD` string.
fn date<'de, D: serde::Deserializer<'de>>(d: D) -> Result<NaiveDate, D::Error> {
    let text = match toml::Value::deserialize(d)? {
        toml::Value::String(s) => s,
        toml::Value::Datetime(dt) => dt.to_string(),
        other => {
            return Err(serde::de::Error::custom(format!(
                "expected a date, found {}",
                other.type_str()
            )));
        }
    };
    NaiveDate::parse_from_str(&text, "%Y-%m-%d").map_err(|_| serde::de::Error::custom("expected a date YYYY-MM-DD"))
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum InputFormat {
    Csv,
    Parquet,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnRule {
    /// Column of the extract.
    pub name: String,
    pub action: Action,
    /// Output column name. Defaults: `person_id` for `pseudonymise`; for `generalise`, the
    /// generalisation's name (`age`, `age_band`, `year_of_birth`, `postcode_district`) or, for
    /// `month`, the column's own name; otherwise the column's own name.
    #[serde(default)]
    pub output: Option<String>,
    /// For `keep` and `identifier`: the output type (default: as read; CSV columns are text).
    #[serde(default, rename = "type")]
    pub data_type: Option<ColumnType>,
    /// For `keep` and `identifier`: whether empty values are allowed (default false: a row
    /// with the value missing is quarantined).
    #[serde(default)]
    pub nullable: bool,
    /// For `generalise`: what the value becomes.
    #[serde(default)]
    pub to: Option<Generalisation>,
    /// For `generalise` with `to = "postcode_district"`: outward code → area name. Postcodes
    /// outside the map are quarantined. Without a map the outward code itself is kept.
    #[serde(default)]
    pub map: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Keep,
    Drop,
    Pseudonymise,
    Generalise,
    Identifier,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Generalisation {
    YearOfBirth,
    Age,
    AgeBand,
    PostcodeDistrict,
    Month,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ColumnType {
    Utf8,
    Int32,
    Int64,
    Float64,
    Date,
    Boolean,
}

impl ColumnType {
    pub fn arrow(self) -> DataType {
        match self {
            Self::Utf8 => DataType::Utf8,
            Self::Int32 => DataType::Int32,
            Self::Int64 => DataType::Int64,
            Self::Float64 => DataType::Float64,
            Self::Date => DataType::Date32,
            Self::Boolean => DataType::Boolean,
        }
    }
}

impl ColumnRule {
    pub fn output_name(&self) -> &str {
        match (&self.output, self.action) {
            (Some(name), _) => name,
            (None, Action::Pseudonymise) => super::PERSON_ID,
            (None, Action::Generalise) => match self.to {
                Some(Generalisation::YearOfBirth) => "year_of_birth",
                Some(Generalisation::Age) => "age",
                Some(Generalisation::AgeBand) => "age_band",
                Some(Generalisation::PostcodeDistrict) => "postcode_district",
                Some(Generalisation::Month) | None => &self.name,
            },
            (None, _) => &self.name,
        }
    }
}

impl IngestSpec {
    /// Reads and checks a spec; relative paths are taken from the spec's folder. `key_file`,
    /// if given, replaces the spec's (the CLI passes `SDE_INGEST__KEY_FILE`).
    pub fn load(path: &Path, key_file: Option<std::ffi::OsString>) -> Result<(Self, String), IngestError> {
        let text = std::fs::read_to_string(path).map_err(|source| IngestError::Io {
            path: path.to_owned(),
            source,
        })?;
        let spec = Self::parse(&text, path.parent().unwrap_or(Path::new(".")), key_file)?;
        Ok((spec, text))
    }

    pub fn parse(text: &str, base: &Path, key_file: Option<std::ffi::OsString>) -> Result<Self, IngestError> {
        let mut spec: IngestSpec = toml::from_str(text).map_err(|e| IngestError::Spec(e.to_string()))?;
        if let Some(key_file) = key_file {
            spec.key_file = key_file.into();
        }
        for path in [&mut spec.input, &mut spec.versions, &mut spec.key_file]
            .into_iter()
            .chain(spec.publish.as_mut())
        {
            *path = resolve(base, path);
        }
        spec.validate()?;
        Ok(spec)
    }

    fn validate(&self) -> Result<(), IngestError> {
        let bad = |message: String| Err(IngestError::Spec(message));
        let plain = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !plain(&self.dataset) {
            return bad(format!("dataset `{}`: use letters, digits and _ only", self.dataset));
        }
        let pseudonymised = self.columns.iter().filter(|c| c.action == Action::Pseudonymise).count();
        if pseudonymised != 1 {
            return bad(format!(
                "exactly one column must be `pseudonymise` (the NHS number); found {pseudonymised}"
            ));
        }
        let mut outputs = std::collections::BTreeSet::new();
        for rule in &self.columns {
            let col = &rule.name;
            match rule.action {
                Action::Generalise if rule.to.is_none() => {
                    return bad(format!("column {col}: `generalise` needs `to`"));
                }
                Action::Generalise => {}
                _ if rule.to.is_some() || rule.map.is_some() => {
                    return bad(format!("column {col}: `to` and `map` belong to `generalise` only"));
                }
                _ => {}
            }
            if rule.map.is_some() && rule.to != Some(Generalisation::PostcodeDistrict) {
                return bad(format!("column {col}: `map` is only for `to = \"postcode_district\"`"));
            }
            if rule.data_type.is_some() && !matches!(rule.action, Action::Keep | Action::Identifier) {
                return bad(format!("column {col}: `type` is only for `keep` and `identifier`"));
            }
            if rule.action == Action::Drop {
                continue;
            }
            let output = rule.output_name();
            if !plain(output) {
                return bad(format!(
                    "column {col}: output name `{output}`: use letters, digits and _ only"
                ));
            }
            if !outputs.insert(output.to_owned()) {
                return bad(format!("output column {output} is written by two rules"));
            }
        }
        Ok(())
    }

    /// Output columns marked as identifiers (only the engine may use them): the pseudonym and
    /// every `identifier` column.
    pub fn identifiers(&self) -> Vec<String> {
        self.columns
            .iter()
            .filter(|c| matches!(c.action, Action::Pseudonymise | Action::Identifier))
            .map(|c| c.output_name().to_owned())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"
dataset = "people"
input = "raw/people.csv"
extract_date = "2025-12-31"
versions = "versions"
key_file = "keys/k"
[[columns]]
name = "nhs_number"
action = "pseudonymise"
[[columns]]
name = "dob"
action = "generalise"
to = "age"
"#;

    fn parse(text: &str) -> Result<IngestSpec, IngestError> {
        IngestSpec::parse(text, Path::new("/base"), None)
    }

    #[test]
    fn paths_are_resolved_and_the_key_file_can_be_overridden() {
        let spec = parse(SPEC).unwrap();
        assert_eq!(spec.input, Path::new("/base/raw/people.csv"));
        assert_eq!(spec.key_file, Path::new("/base/keys/k"));
        assert_eq!(spec.identifiers(), ["person_id"]);
        let spec = IngestSpec::parse(SPEC, Path::new("/base"), Some("/secret/k".into())).unwrap();
        assert_eq!(spec.key_file, Path::new("/secret/k"));
        let spec = IngestSpec::parse(
            &SPEC.replace("\"versions\"", "\"../versions\""),
            Path::new("/w/ingest/"),
            None,
        );
        assert_eq!(spec.unwrap().versions, Path::new("/w/versions"));
    }

    #[test]
    fn the_example_spec_parses_with_every_documented_key() {
        let text = include_str!("../../config/ingest.example.toml");
        let spec = parse(text).expect("example spec parses");
        assert_eq!(spec.dataset, "patients");
        assert_eq!(spec.publish.as_deref(), Some(Path::new("/base/data")));
        let outputs: Vec<&str> = spec
            .columns
            .iter()
            .filter(|c| c.action != Action::Drop)
            .map(ColumnRule::output_name)
            .collect();
        assert_eq!(
            outputs,
            [
                "person_id",
                "sex",
                "age",
                "age_band",
                "ethnicity",
                "district",
                "imd_decile"
            ]
        );
        assert_eq!(spec.columns[6].map.as_ref().unwrap()["CM1"], "Chelmsford");
        // The commented keys parse too.
        let text = text
            .replace("# format = \"csv\"", "format = \"csv\"")
            .replace(
                "# [[columns]]\n# name = \"household_ref\"\n# action",
                "[[columns]]\nname = \"household_ref\"\naction",
            )
            .replace("# action = \"identifier\"", "action = \"identifier\"");
        let spec = parse(&text).expect("uncommented keys parse");
        assert_eq!(spec.format, Some(InputFormat::Csv));
        assert_eq!(spec.identifiers(), ["person_id", "household_ref"]);
    }

    #[test]
    fn bad_specs_are_named() {
        let no_pseudonym = SPEC.replace("pseudonymise", "keep");
        assert!(parse(&no_pseudonym).unwrap_err().to_string().contains("pseudonymise"));
        let no_to = SPEC.replace("to = \"age\"", "");
        assert!(parse(&no_to).unwrap_err().to_string().contains("needs `to`"));
        let clash = SPEC.replace("to = \"age\"", "to = \"age\"\noutput = \"person_id\"");
        assert!(parse(&clash).unwrap_err().to_string().contains("two rules"));
        let unknown = SPEC.replace("action = \"generalise\"", "action = \"generalise\"\nbogus = 1");
        assert!(parse(&unknown).unwrap_err().to_string().contains("bogus"));
    }
}
