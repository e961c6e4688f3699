//! The per-row step of an ingest: each input batch pseudonymised, kept, generalised or
//! dropped column by column as the spec says, with rows that fail a rule quarantined and
//! counted by reason. Reading inputs and writing the version stay in [`super`].

use super::*;

/// Per-thread state: the pseudonymiser and a one-entry cache (extracts are usually sorted by
/// person, so consecutive rows often share an NHS number).
pub(super) struct Rows {
    pseudonymiser: Pseudonymiser,
    last: Option<([u8; 10], [u8; nhs::PERSON_ID_LEN])>,
    /// Per row of the current batch: already quarantined?
    bad: Vec<bool>,
}

impl Rows {
    pub(super) fn new(pseudonymiser: Pseudonymiser) -> Self {
        Self {
            pseudonymiser,
            last: None,
            bad: Vec::new(),
        }
    }

    pub(super) fn transform_file(
        &mut self,
        plan: &Plan,
        path: &Path,
        format: InputFormat,
        target: &Path,
        counts: &mut Counts,
    ) -> Result<(), IngestError> {
        let file = File::create(target).map_err(io(target))?;
        let properties = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(1_000_000))
            .build();
        let write_err = |e: parquet::errors::ParquetError| IngestError::Write(e.to_string());
        let mut writer = ArrowWriter::try_new(file, Arc::clone(&plan.output), Some(properties)).map_err(write_err)?;
        for batch in read_batches(path, format, &plan.input)? {
            let batch = batch.map_err(|e| IngestError::Read {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
            counts.rows_in += batch.num_rows() as u64;
            let out = self.transform(plan, &batch, &mut counts.quarantined)?;
            counts.rows_out += out.num_rows() as u64;
            writer.write(&out).map_err(write_err)?;
        }
        writer.close().map_err(write_err)?;
        Ok(())
    }

    /// Marks row `i` as quarantined for `reason`, counting only its first reason.
    fn quarantine(&mut self, i: usize, column: &str, reason: &str, report: &mut BTreeMap<String, u64>) {
        if !self.bad[i] {
            self.bad[i] = true;
            *report.entry(format!("{column}: {reason}")).or_default() += 1;
        }
    }

    fn transform(
        &mut self,
        plan: &Plan,
        batch: &RecordBatch,
        report: &mut BTreeMap<String, u64>,
    ) -> Result<RecordBatch, IngestError> {
        let n = batch.num_rows();
        self.bad.clear();
        self.bad.resize(n, false);
        let mut columns = Vec::with_capacity(plan.steps.len());
        for step in &plan.steps {
            let source = batch.column(step.source);
            let column = match step.rule.action {
                Action::Pseudonymise => self.pseudonymise(step, source, report)?,
                Action::Generalise => self.generalise(plan, step, source, report)?,
                _ => self.keep(step, source, report)?,
            };
            columns.push(column);
        }
        if !self.bad.contains(&true) {
            return RecordBatch::try_new(Arc::clone(&plan.output), columns)
                .map_err(|e| IngestError::Write(e.to_string()));
        }
        let keep = BooleanArray::from(self.bad.iter().map(|b| !b).collect::<Vec<bool>>());
        let columns = columns
            .iter()
            .map(|c| filter(c, &keep))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| IngestError::Write(e.to_string()))?;
        RecordBatch::try_new(Arc::clone(&plan.output), columns).map_err(|e| IngestError::Write(e.to_string()))
    }

    fn pseudonymise(
        &mut self,
        step: &Step,
        source: &ArrayRef,
        report: &mut BTreeMap<String, u64>,
    ) -> Result<ArrayRef, IngestError> {
        let text = as_text(step, source)?;
        let text = text.as_string::<i32>();
        let mut out = StringBuilder::with_capacity(text.len(), text.len() * nhs::PERSON_ID_LEN);
        for (i, raw) in text.iter().enumerate() {
            let normalised = nhs::normalise(raw.unwrap_or(""));
            let id = match normalised {
                Ok(number) => match self.last {
                    Some((last, id)) if last == number => Some(id),
                    _ => {
                        let id = self.pseudonymiser.person_id(&number);
                        self.last = Some((number, id));
                        Some(id)
                    }
                },
                Err(problem) => {
                    self.quarantine(i, &step.rule.name, problem.reason(), report);
                    None
                }
            };
            match id {
                Some(id) => out.append_value(std::str::from_utf8(&id).expect("hex is UTF-8")),
                None => out.append_value(""),
            }
        }
        Ok(Arc::new(out.finish()))
    }

    fn keep(
        &mut self,
        step: &Step,
        source: &ArrayRef,
        report: &mut BTreeMap<String, u64>,
    ) -> Result<ArrayRef, IngestError> {
        let cast = cast_safe(step, source, step.field.data_type())?;
        for i in 0..cast.len() {
            if cast.is_null(i) {
                if source.is_valid(i) {
                    let reason = format!("not a valid {}", step.field.data_type());
                    self.quarantine(i, &step.rule.name, &reason, report);
                } else if !step.field.is_nullable() {
                    self.quarantine(i, &step.rule.name, "missing", report);
                }
            }
        }
        Ok(cast)
    }

    fn generalise(
        &mut self,
        plan: &Plan,
        step: &Step,
        source: &ArrayRef,
        report: &mut BTreeMap<String, u64>,
    ) -> Result<ArrayRef, IngestError> {
        let to = step.rule.to.expect("checked when the spec was parsed");
        let name = step.rule.name.as_str();
        let nullable = step.field.is_nullable();
        if to == Generalisation::PostcodeDistrict {
            let text = as_text(step, source)?;
            let mut out = StringBuilder::with_capacity(text.len(), text.len() * 8);
            for (i, raw) in text.as_string::<i32>().iter().enumerate() {
                let district = match raw.filter(|s| !s.trim().is_empty()) {
                    None if nullable => {
                        out.append_null();
                        continue;
                    }
                    None => Err("missing"),
                    Some(raw) => match generalise::postcode_district(raw) {
                        None => Err("not a valid postcode"),
                        Some(outward) => match &step.rule.map {
                            None => Ok(outward),
                            Some(map) => map.get(&outward).cloned().ok_or("outside the mapped area"),
                        },
                    },
                };
                match district {
                    Ok(district) => out.append_value(district),
                    Err(reason) => {
                        self.quarantine(i, name, reason, report);
                        out.append_value("");
                    }
                }
            }
            return Ok(Arc::new(out.finish()));
        }
        let dates = cast_safe(step, source, &DataType::Date32)?;
        let dates = dates.as_primitive::<Date32Type>();
        let mut ints = Int32Builder::with_capacity(dates.len());
        let mut texts = StringBuilder::new();
        let mut days = Date32Builder::with_capacity(dates.len());
        for i in 0..dates.len() {
            let value = dates
                .is_valid(i)
                .then(|| generalise::date_from_days(dates.value(i)))
                .flatten();
            let Some(date) = value else {
                if source.is_null(i) && nullable {
                    ints.append_null();
                    texts.append_null();
                    days.append_null();
                    continue;
                }
                let reason = if source.is_null(i) {
                    "missing"
                } else {
                    "not a valid date"
                };
                self.quarantine(i, name, reason, report);
                ints.append_value(0);
                texts.append_value("");
                days.append_value(0);
                continue;
            };
            let age = generalise::age_at(date, plan.extract_date);
            let needs_age = matches!(to, Generalisation::Age | Generalisation::AgeBand);
            if needs_age && age.is_none() {
                self.quarantine(i, name, "after the extract date", report);
            }
            let age = age.unwrap_or(0);
            match to {
                Generalisation::YearOfBirth => ints.append_value(chrono::Datelike::year(&date)),
                Generalisation::Age => ints.append_value(age),
                Generalisation::AgeBand => texts.append_value(generalise::age_band(age)),
                Generalisation::Month => days.append_value(generalise::days_from_date(generalise::month(date))),
                Generalisation::PostcodeDistrict => unreachable!("handled above"),
            }
        }
        Ok(match to {
            Generalisation::YearOfBirth | Generalisation::Age => Arc::new(ints.finish()),
            Generalisation::AgeBand => Arc::new(texts.finish()),
            _ => Arc::new(days.finish()),
        })
    }
}

/// `source` cast to `to`; values that do not convert become null (and are then quarantined).
pub(super) fn cast_safe(step: &Step, source: &ArrayRef, to: &DataType) -> Result<ArrayRef, IngestError> {
    if source.data_type() == to {
        return Ok(Arc::clone(source));
    }
    let options = CastOptions {
        safe: true,
        ..Default::default()
    };
    cast_with_options(source, to, &options).map_err(|_| {
        IngestError::Spec(format!(
            "column {} ({}) cannot be read as {to}",
            step.rule.name,
            source.data_type()
        ))
    })
}

pub(super) fn as_text(step: &Step, source: &ArrayRef) -> Result<ArrayRef, IngestError> {
    cast_safe(step, source, &DataType::Utf8)
}
