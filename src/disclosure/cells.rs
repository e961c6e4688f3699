//! The cells' arithmetic, applied to the aggregate's output per batch: counts perturbed at
//! their cell key and rounded, sums and means flattened and perturbed, people told from rows.
//! Which cells are withheld is decided here too, cell by cell, and tallied for the result's
//! metadata. The functions that call it are built in [`super`].

use super::*;

impl CellRule {
    /// Counts released perturbed by the p-table at their cell key, then rounded; NULL where
    /// fewer than `threshold` people contribute. Where a count's own condition leaves out of its
    /// group between 1 and threshold − 1 people, its unconditioned count and keys are released
    /// instead (the condition is of low effect). Arguments: the counts, the cell keys (`keys` of
    /// them, one per identifier), contributors and group people per identifier, then, with
    /// `unconditioned`, the unconditioned counts and their keys.
    pub(super) fn count_cells(
        &self,
        arrays: &[ArrayRef],
        rows: usize,
        keys: usize,
        unconditioned: bool,
    ) -> DFResult<ArrayRef> {
        let ptable = match self.ptable.as_ref() {
            Ok(table) => table.as_ref(),
            Err(e) => return Err(DataFusionError::Internal(format!("the counts' p-table: {e}"))),
        };
        let int64 = |a: &ArrayRef| -> DFResult<Int64Array> {
            Ok(cast(a, &DataType::Int64)?.as_primitive::<Int64Type>().clone())
        };
        let value = int64(&arrays[0])?;
        let cell_keys = arrays[1..1 + keys].iter().map(int64).collect::<DFResult<Vec<_>>>()?;
        let rest = &arrays[1 + keys..];
        let people = match unconditioned {
            true => rest.len() - 1 - keys,
            false => rest.len(),
        };
        let (contributors, group_people) = rest[..people].split_at(people / 2);
        let contributors = fewest_people(contributors, rows)?;
        let group_people = fewest_people(group_people, rows)?;
        let (u_value, u_keys) = match unconditioned {
            true => (
                Some(int64(&rest[people])?),
                rest[people + 1..].iter().map(int64).collect::<DFResult<Vec<_>>>()?,
            ),
            false => (None, vec![]),
        };
        let (threshold, floor) = (self.rules.threshold as i64, self.rules.withhold_below());
        let base = self.rules.rounding as i64;
        let perturb = |count: i64, keys: &[Int64Array], i: usize| -> i64 {
            let noise = match ptable {
                Some(table) => table.noise((keys.iter().fold(0i64, |k, keys| k + keys.value(i)) & 255) as u8),
                None => 0,
            };
            round_to((count + noise).max(0), base)
        };
        let released: Int64Array = (0..rows)
            .map(|i| {
                let (c, g) = (contributors.value(i), group_people.value(i));
                let left_out = g - c;
                match &u_value {
                    // The condition leaves out few people: as if it were not there.
                    Some(u) if left_out > 0 && left_out < threshold => {
                        (g >= floor && !u.is_null(i)).then(|| perturb(u.value(i), &u_keys, i))
                    }
                    _ => (c >= floor && !value.is_null(i)).then(|| perturb(value.value(i), &cell_keys, i)),
                }
            })
            .collect();
        if self.tally {
            let nulls = released.null_count() as u64;
            self.withheld.cells_threshold.fetch_add(nulls, Ordering::Relaxed);
        }
        Ok(Arc::new(released))
    }

    /// Sums or means released flattened and perturbed ([`noise`]), NULL where fewer than
    /// `threshold` people contribute. Arguments: the cell's values, its
    /// row counts (means), the flattenings, then contributors and group people per identifier.
    pub(super) fn value_cells(
        &self,
        arrays: &[ArrayRef],
        rows: usize,
        mean: bool,
        perturbations: usize,
    ) -> DFResult<ArrayRef> {
        let Some(key) = &self.key else {
            return Err(DataFusionError::Internal(
                "a value cell without a perturbation key".into(),
            ));
        };
        let values = cast(&arrays[0], &DataType::Float64)?;
        let values = values.as_primitive::<Float64Type>();
        let counts = cast(&arrays[1], &DataType::Int64)?;
        let counts = counts.as_primitive::<Int64Type>();
        let flattenings = arrays[2..2 + perturbations]
            .iter()
            .map(|a| {
                let s = a
                    .as_any()
                    .downcast_ref::<StructArray>()
                    .ok_or_else(|| DataFusionError::Internal("a flattening is a struct".into()))?;
                let field = |name: &str| -> DFResult<ArrayRef> {
                    s.column_by_name(name)
                        .cloned()
                        .ok_or_else(|| DataFusionError::Internal(format!("a flattening without {name}")))
                };
                let (d, sc, se) = (field("delta")?, field("scale")?, field("seed")?);
                Ok((
                    d.as_primitive::<Float64Type>().clone(),
                    sc.as_primitive::<Float64Type>().clone(),
                    se.as_primitive::<UInt64Type>().clone(),
                ))
            })
            .collect::<DFResult<Vec<_>>>()?;
        let people = &arrays[2 + perturbations..];
        let contributors = fewest_people(&people[..people.len() / 2], rows)?;
        let threshold = self.rules.withhold_below();
        let sd = self.rules.noise_percent as f64 / 100.0;
        let salt = u64::from(mean);
        let mut withheld = 0;
        let released: Float64Array = (0..rows)
            .map(|i| {
                if contributors.value(i) < threshold {
                    withheld += 1;
                    return None;
                }
                if values.is_null(i) {
                    return None;
                }
                // The flattening with the most noise (one per identifier) governs.
                let (delta, scale, seed) = flattenings
                    .iter()
                    .map(|(d, sc, se)| (d.value(i), sc.value(i), se.value(i)))
                    .max_by(|a, b| a.1.total_cmp(&b.1))
                    .unwrap_or((0.0, 0.0, 0));
                let noise = sd * scale * key.normal(seed, salt);
                let n = match mean {
                    true => counts.value(i).max(1) as f64,
                    false => 1.0,
                };
                Some(values.value(i) + (noise - delta) / n)
            })
            .collect();
        if self.tally {
            self.withheld.cells_threshold.fetch_add(withheld, Ordering::Relaxed);
        }
        // Back to the cell's own type: integers to the nearest.
        let target = arrays[0].data_type();
        let released: Float64Array = match target.is_integer() {
            true => released.iter().map(|v| v.map(f64::round)).collect(),
            false => released,
        };
        Ok(cast(&(Arc::new(released) as ArrayRef), target)?)
    }
}

/// People told from a group's `rows` where no person has more than `most` of them: at least
/// `rows / most`, rounded up. With `contributing` rows, those of a cell: the same, where every
/// row contributes. Fails with [`Unsettled`] wherever that does not settle the threshold.
pub(super) fn people_from_rows(
    rows: &ArrayRef,
    contributing: Option<&ArrayRef>,
    most: u64,
    threshold: i64,
) -> DFResult<Int64Array> {
    let count = |a: &ArrayRef| -> DFResult<Vec<i64>> {
        let a = cast(a, &DataType::Int64)?;
        let a = a.as_primitive::<Int64Type>();
        Ok((0..a.len())
            .map(|i| if a.is_null(i) { 0 } else { a.value(i).max(0) })
            .collect())
    };
    let rows = count(rows)?;
    let contributing = contributing.map(count).transpose()?;
    rows.iter()
        .enumerate()
        .map(|(i, &r)| {
            let people = (r as u64).div_ceil(most) as i64;
            let all_contribute = contributing.as_ref().is_none_or(|c| c[i] == r);
            match all_contribute && people >= threshold {
                true => Ok(Some(people)),
                false => Err(DataFusionError::External(Box::new(Unsettled))),
            }
        })
        .collect()
}
