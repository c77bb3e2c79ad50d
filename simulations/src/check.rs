//! The invariants of `design/system.md`, checked on the simulated federation once it has
//! settled. Each violation is one line saying what and where.

use std::collections::{BTreeMap, BTreeSet};

use protocol::document::{CouponStatus, ResidentStatus, read_record};
use protocol::statistics::{Cell, Statistics, record_cells};
use protocol::terminal::CaptureState;

use crate::world::{AskLocal, DAY, World};

/// Every invariant that does not hold (empty when all do).
pub(crate) fn violations(world: &World) -> Vec<String> {
    let mut out = Vec::new();
    if world.settled_at.is_none() {
        out.push("the federation did not settle within the convergence budget".to_owned());
    }
    // 5. No personal data at the national node.
    let markers: BTreeSet<&String> = world.national_personal().iter().collect();
    for marker in markers {
        out.push(format!("the national node received personal data (marker {marker:?})"));
    }
    // Walk every document once.
    let mut active_events: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut any_events: BTreeSet<String> = BTreeSet::new();
    let mut holders: BTreeMap<String, Vec<protocol::municipality::MunicipalityCode>> = BTreeMap::new();
    for (i, code) in world.codes.iter().enumerate() {
        let mut recounted: BTreeMap<Cell, i64> = BTreeMap::new();
        let mut n_docs = 0;
        for (id, doc, heads) in world.primary_docs(i) {
            n_docs += 1;
            // 1. Convergence: the standby holds the same heads.
            match world.standby_heads(i, id) {
                Some(standby) if standby == heads => {}
                Some(_) => out.push(format!("{code}: standby differs from primary on {id}")),
                None => out.push(format!("{code}: standby lacks {id}")),
            }
            let record = match read_record(&doc) {
                Ok(record) => record,
                Err(error) => {
                    out.push(format!("{code}: {id} unreadable: {error}"));
                    continue;
                }
            };
            for (cell, n) in record_cells(&record) {
                *recounted.entry(cell).or_default() += n;
            }
            for event_id in record.doses.keys() {
                any_events.insert(event_id.clone());
            }
            holders.entry(record.person_key.clone()).or_default();
            let active = record.transfer.is_none() && record.identity.status == ResidentStatus::Active;
            if !active {
                continue;
            }
            if let Some(at) = holders.get_mut(&record.person_key) {
                at.push(*code);
            }
            for event_id in record.doses.keys() {
                active_events.entry(event_id.clone()).or_default().push(id.clone());
            }
            // The valid doses are numbered 1, 2, … (a dose given before a history arrived is
            // numbered again when it joins; a void numbers the later doses down).
            let numbers: Vec<u8> = record.valid_doses().iter().map(|d| d.dose_number).collect();
            for pair in numbers.windows(2).filter(|w| w[0] == w[1]) {
                out.push(format!("{code}: {id} holds two valid doses numbered {}", pair[0]));
            }
            if numbers.iter().zip(1u8..).any(|(n, k)| *n != k) && numbers.windows(2).all(|w| w[0] != w[1]) {
                out.push(format!("{code}: {id} holds valid doses numbered {numbers:?}, not 1, 2, …"));
            }
            // 3. No two valid coupons for the same person and dose, and none for a dose
            // already given (it could only be refused at a venue).
            let mut rounds = BTreeSet::new();
            let next = record.next_dose_number();
            for coupon in record.coupons.values().filter(|c| c.status == CouponStatus::Valid) {
                if !rounds.insert(coupon.code.dose_round) {
                    out.push(format!(
                        "{code}: {id} holds two valid coupons for dose {}",
                        coupon.code.dose_round
                    ));
                }
                if coupon.code.dose_round < next {
                    out.push(format!(
                        "{code}: {id} holds a valid coupon for dose {}, already given",
                        coupon.code.dose_round
                    ));
                }
            }
        }
        if world.standby_len(i) != n_docs {
            out.push(format!("{code}: standby holds {} documents, primary {n_docs}", world.standby_len(i)));
        }
        // The counters equal what the documents say (what `vrs-node statistics verify` checks).
        // Entry lags and refusals are facts about events, not about records.
        let of_records = |(c, n): (&Cell, &i64)| {
            (*n != 0 && !matches!(c, Cell::Lag { .. } | Cell::Rejected { .. })).then_some((c.clone(), *n))
        };
        let counters: BTreeMap<Cell, i64> = world.primary_cells(i).iter().filter_map(of_records).collect();
        let documents: BTreeMap<Cell, i64> = recounted.iter().filter_map(of_records).collect();
        if counters != documents {
            let differing: Vec<String> = counters
                .keys()
                .chain(documents.keys())
                .filter(|c| counters.get(*c) != documents.get(*c))
                .take(3)
                .map(|c| {
                    format!("{} counted {:?}, documents {:?}", c.key(), counters.get(c), documents.get(c))
                })
                .collect();
            out.push(format!("{code}: counters differ from the documents: {}", differing.join("; ")));
        }
        // 4. The national node's figures equal the municipality's own.
        let own: BTreeMap<(String, u8), i64> = doses_by_kind(world.primary_cells(i).iter());
        let national: BTreeMap<(String, u8), i64> =
            match world.national_reports().get(&(*code, format!("daily/{DAY}"))) {
                Some(Statistics::Daily(daily)) => {
                    let mut sums = BTreeMap::new();
                    for count in &daily.doses {
                        *sums.entry((count.product.clone(), count.dose_number)).or_default() +=
                            count.count as i64;
                    }
                    sums
                }
                _ => BTreeMap::new(),
            };
        if own != national {
            out.push(format!("{code}: national figures {national:?} differ from the municipality's {own:?}"));
        }
    }
    // 3. One owner per person key — every key any record or the ledger knows — and the
    // ledger agrees; no handoff refused.
    for person_key in world.ledger_persons() {
        holders.entry(person_key.clone()).or_default();
    }
    for (id, reason) in world.refused_handoffs() {
        out.push(format!("handoff {id} refused by the ledger: {reason}"));
    }
    for refusal in &world.join_refusals {
        out.push(format!(
            "a history could not join the resident the register extract listed first: {refusal}"
        ));
    }
    for (person_key, at) in &holders {
        if at.len() != 1 {
            let codes: Vec<String> = at.iter().map(ToString::to_string).collect();
            out.push(format!("person {person_key} is active in {} records: {}", at.len(), codes.join(", ")));
        } else if let Some(holder) = world.ledger_holder(person_key)
            && holder.in_transit.is_none()
            && holder.holder != at[0]
        {
            out.push(format!(
                "person {person_key} is active at {} but the ledger says {}",
                at[0], holder.holder
            ));
        }
    }
    // Every newcomer's history asked for has arrived.
    for (p, code) in world.primaries.iter().zip(&world.codes) {
        for (person_key, ask) in &p.asks {
            if ask.state != AskLocal::Received {
                out.push(format!("{code}: the history asked for person {person_key} ended {:?}", ask.state));
            }
        }
    }
    // 2. No acknowledged dose lost or duplicated; no refused one recorded.
    let mut acknowledged = BTreeSet::new();
    for (event_id, state) in world.captures() {
        acknowledged.insert(event_id.clone());
        let recorded_in = active_events.get(event_id).map_or(0, Vec::len);
        match state {
            CaptureState::Recorded { .. } => {
                if recorded_in != 1 {
                    out.push(format!("capture {event_id} recorded, but in {recorded_in} active records"));
                }
                if world.expect_refused.contains(event_id) {
                    out.push(format!("capture {event_id} used a superseded coupon and was recorded"));
                }
            }
            CaptureState::Refused { code, .. } => {
                if any_events.contains(event_id) {
                    out.push(format!("capture {event_id} refused ({code}), but a record holds it"));
                }
                // Every capture of this workload is valid except one made with a superseded
                // coupon: any other refusal lost a dose the operator was told was recorded.
                if !world.expect_refused.contains(event_id) {
                    out.push(format!("capture {event_id} of a valid coupon was refused ({code})"));
                }
            }
            other => out.push(format!("capture {event_id} never settled: {other:?}")),
        }
    }
    for event_id in active_events.keys() {
        if !acknowledged.contains(event_id) {
            out.push(format!("dose {event_id} is in a record but no terminal captured it"));
        }
    }
    out
}

fn doses_by_kind<'a>(cells: impl Iterator<Item = (&'a Cell, &'a i64)>) -> BTreeMap<(String, u8), i64> {
    let mut sums = BTreeMap::new();
    for (cell, n) in cells {
        if let Cell::Dose { date, product, dose_number, .. } = cell
            && *date == DAY
            && *n != 0
        {
            *sums.entry((product.clone(), *dose_number)).or_default() += n;
        }
    }
    sums.retain(|_, n| *n != 0);
    sums
}
