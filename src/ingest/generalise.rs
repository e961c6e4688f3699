//! Generalisers: a full date of birth becomes a year of birth, an age or an age band at the
//! extract date; a full postcode becomes its district (outward code, optionally mapped to a
//! named area); an exact date becomes its month. Each returns `None` where the value cannot
//! be generalised, and the row is then quarantined.

use chrono::{Datelike, NaiveDate};

use super::scan::is_full_postcode;

/// Days from 0001-01-01 (CE day 1) to 1970-01-01, for Arrow's Date32.
const UNIX_EPOCH_CE: i32 = 719_163;

pub fn date_from_days(days: i32) -> Option<NaiveDate> {
    NaiveDate::from_num_days_from_ce_opt(days.checked_add(UNIX_EPOCH_CE)?)
}

pub fn days_from_date(date: NaiveDate) -> i32 {
    date.num_days_from_ce() - UNIX_EPOCH_CE
}

/// Whole years from `birth` to `at`; `None` if born after `at`.
pub fn age_at(birth: NaiveDate, at: NaiveDate) -> Option<i32> {
    let mut age = at.year() - birth.year();
    if (at.month(), at.day()) < (birth.month(), birth.day()) {
        age -= 1;
    }
    (age >= 0).then_some(age)
}

/// Five-year bands `0-4` … `95-99`, then `100+`.
pub fn age_band(age: i32) -> &'static str {
    const BANDS: [&str; 21] = [
        "0-4", "5-9", "10-14", "15-19", "20-24", "25-29", "30-34", "35-39", "40-44", "45-49", "50-54", "55-59",
        "60-64", "65-69", "70-74", "75-79", "80-84", "85-89", "90-94", "95-99", "100+",
    ];
    BANDS[(age.max(0) as usize / 5).min(BANDS.len() - 1)]
}

/// The first day of the date's month.
pub fn month(date: NaiveDate) -> NaiveDate {
    date.with_day(1).expect("every month has a first day")
}

/// The outward code (postcode district) of a full postcode, upper case.
pub fn postcode_district(postcode: &str) -> Option<String> {
    if !is_full_postcode(postcode) {
        return None;
    }
    let compact: String = postcode
        .chars()
        .filter(|c| !c.is_whitespace())
        .map(|c| c.to_ascii_uppercase())
        .collect();
    Some(compact[..compact.len() - 3].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(y: i32, m: u32, day: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, day).unwrap()
    }

    #[test]
    fn ages_bands_months_and_districts() {
        let extract = d(2025, 12, 31);
        assert_eq!(age_at(d(1950, 12, 31), extract), Some(75));
        assert_eq!(age_at(d(1950, 6, 1), d(2025, 5, 31)), Some(74));
        assert_eq!(age_at(d(2026, 1, 1), extract), None);
        assert_eq!(age_band(0), "0-4");
        assert_eq!(age_band(64), "60-64");
        assert_eq!(age_band(99), "95-99");
        assert_eq!(age_band(104), "100+");
        assert_eq!(month(d(2024, 2, 29)), d(2024, 2, 1));
        assert_eq!(date_from_days(0), Some(d(1970, 1, 1)));
        assert_eq!(days_from_date(d(2019, 1, 1)), 17_897);
        assert_eq!(postcode_district("cm1 2ab").as_deref(), Some("CM1"));
        assert_eq!(postcode_district("SS143AB").as_deref(), Some("SS14"));
        assert_eq!(postcode_district("CM1"), None);
        assert_eq!(postcode_district("not a postcode"), None);
    }
}
