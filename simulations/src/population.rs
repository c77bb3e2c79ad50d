//! Who lives where: the 1,741 real municipalities with populations that follow Japan's
//! shape — twenty designated cities of 0.7–3.8 million, special wards of 60,000–950,000, a
//! long tail of cities, towns and villages — summing to about 125 million, then scaled.
//!
//! The register has no population column, so sizes are drawn (from the code, not the
//! seed: every run sees the same country) around a typical size per kind, with a spread
//! wide enough to give a few large cities and many small towns.

use protocol::municipality::{Municipality, MunicipalityKind, all_municipalities};

use crate::rng::Rng;

/// Japan's population in the simulated year.
pub const JAPAN: f64 = 125_000_000.0;

/// Yokohama, the largest municipality, sized as it is.
const YOKOHAMA: &str = "141003";

/// A designated city (政令指定都市): code `xx1xx0`-style ward parents, e.g. 141003.
fn designated(m: &Municipality) -> bool {
    let code = m.code.as_str();
    m.kind == MunicipalityKind::City && &code[2..5] == "100"
}

/// Unscaled populations of every municipality, in the order of `all_municipalities()`,
/// summing to [`JAPAN`].
pub fn full_populations() -> Vec<f64> {
    let municipalities = all_municipalities();
    let mut raw: Vec<f64> = municipalities
        .iter()
        .map(|m| {
            let mut rng = Rng::new(m.code.as_str().parse::<u64>().unwrap_or(0));
            let spread = (rng.unit() * 2.0 - 1.0) * 1.3;
            let typical = if m.code.as_str() == YOKOHAMA {
                return 3_770_000.0;
            } else if designated(m) {
                1_200_000.0
            } else {
                match m.kind {
                    MunicipalityKind::SpecialWard => 300_000.0,
                    MunicipalityKind::City => 55_000.0,
                    MunicipalityKind::Town => 12_000.0,
                    MunicipalityKind::Village => 3_500.0,
                }
            };
            typical * spread.exp()
        })
        .collect();
    let fixed = 3_770_000.0;
    let rest: f64 = raw.iter().sum::<f64>() - fixed;
    let factor = (JAPAN - fixed) / rest;
    for (m, p) in municipalities.iter().zip(raw.iter_mut()) {
        if m.code.as_str() != YOKOHAMA {
            *p *= factor;
        }
    }
    raw
}

/// The municipalities a run simulates: all of them, or `count` spread over the list (every
/// k-th by code, so every region is represented), always with Yokohama.
pub fn chosen(count: usize) -> Vec<usize> {
    let n = all_municipalities().len();
    if count == 0 || count >= n {
        return (0..n).collect();
    }
    let yokohama = all_municipalities().iter().position(|m| m.code.as_str() == YOKOHAMA).unwrap_or(0);
    let mut picked: Vec<usize> = (0..count).map(|i| i * n / count).collect();
    if !picked.contains(&yokohama) {
        picked[count / 2] = yokohama;
        picked.sort_unstable();
    }
    picked.dedup();
    picked
}
