//! The second core: what the day's first touch of a resident needs, built ahead.
//!
//! The simulation itself runs on one thread, in the order its seed dictates. But a resident's
//! state before the day — the registration document with the coupon issued in bulk, and the
//! signed coupon they bring — depends only on who they are, not on anything that happens
//! during the day. Residents are vaccinated in register order within each municipality, so a
//! second thread can build these for the residents about to come: it keeps every
//! municipality a few residents, and 1/250 of the doses it expects in the day, ahead of where
//! the simulation has got to in its register. The simulation takes what is ready and builds
//! anything else itself with the same function, so the run — and its digest — is the same
//! whether the helper keeps up or not.
//!
//! The helper also checks each coupon's signature, as the terminal that scans it and the
//! owner that records it will: in the federation those are other machines' CPUs. Their
//! state machines take the outcome from [`CheckedSignatures`] (the check depends on nothing
//! but the coupon and the key) and compute any check not found there themselves.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use automerge::ActorId;
use protocol::coupon::{Ed25519Check, SignatureCheck, SignedCoupon};
use protocol::municipality::MunicipalityCode;
use protocol::person::PersonKeySecret;
use ring::signature::KeyPair;

use crate::world::{Resident, build_resident, coupon_of, key_from_seed};

/// The fewest residents of a municipality the helper keeps built ahead of the simulation.
const AHEAD_MIN: u64 = 2;

/// What the helper needs of one municipality.
pub(crate) struct Plan {
    pub(crate) code: MunicipalityCode,
    pub(crate) actor: ActorId,
    pub(crate) key_seed: [u8; 32],
    pub(crate) population: u64,
    /// Doses expected in the day (its share of the total).
    pub(crate) expected: f64,
}

/// A resident's generation-0 coupon as printed, and its signature checked.
#[derive(Clone)]
pub(crate) struct Printed {
    pub(crate) qr: String,
    pub(crate) coupon: SignedCoupon,
    /// The issuer's public key the signature was checked with.
    pub(crate) key: [u8; 32],
    pub(crate) verifies: bool,
}

#[derive(Default)]
struct Ready {
    printed: Option<Printed>,
    resident: Option<Resident>,
}

/// How many checked signatures the simulation remembers: a coupon is checked at the
/// terminal and at its owner within minutes; one checked again after it was forgotten is
/// computed again.
const REMEMBERED: usize = 1 << 17;

/// Coupon signatures checked on the helper thread, with their outcome.
#[derive(Default)]
pub(crate) struct CheckedSignatures {
    known: HashMap<SignedCoupon, ([u8; 32], bool)>,
    order: VecDeque<SignedCoupon>,
}

impl CheckedSignatures {
    pub(crate) fn remember(&mut self, printed: &Printed) {
        if self.known.insert(printed.coupon, (printed.key, printed.verifies)).is_none() {
            self.order.push_back(printed.coupon);
        }
        while self.order.len() > REMEMBERED {
            if let Some(old) = self.order.pop_front() {
                self.known.remove(&old);
            }
        }
    }
}

impl SignatureCheck for CheckedSignatures {
    fn verifies(&self, coupon: &SignedCoupon, public_key: &[u8]) -> bool {
        match self.known.get(coupon) {
            Some((key, verifies)) if key.as_slice() == public_key => *verifies,
            _ => Ed25519Check.verifies(coupon, public_key),
        }
    }
}

struct Shared {
    ready: Mutex<HashMap<(u32, u64), Ready>>,
    /// Residents the simulation has drawn, in all.
    drawn: AtomicU64,
    /// Coupons the simulation drew ready-made.
    hits: AtomicU64,
    /// Per municipality, the next resident the simulation will draw.
    next: Vec<AtomicU64>,
    stop: AtomicBool,
}

/// The helper thread and what it has built.
pub(crate) struct Prebuild {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Prebuild {
    /// Starts the helper.
    pub(crate) fn start(plans: Vec<Plan>, person_secret: [u8; 32]) -> Self {
        let shared = Arc::new(Shared {
            ready: Mutex::new(HashMap::new()),
            drawn: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            next: plans.iter().map(|_| AtomicU64::new(0)).collect(),
            stop: AtomicBool::new(false),
        });
        let helper = shared.clone();
        let thread = std::thread::Builder::new()
            .name("vrs-sim-prebuild".into())
            .spawn(move || build_ahead(&helper, &plans, &PersonKeySecret::new(&person_secret)))
            .expect("a thread starts");
        Prebuild { shared, thread: Some(thread) }
    }

    /// The simulation draws resident `index` of municipality `m` to come today: their
    /// generation-0 coupon, if built.
    pub(crate) fn draw(&self, m: u32, index: u64) -> Option<Printed> {
        self.shared.next[m as usize].fetch_max(index + 1, Ordering::Relaxed);
        self.shared.drawn.fetch_add(1, Ordering::Relaxed);
        let mut ready = self.shared.ready.lock().unwrap_or_else(|e| e.into_inner());
        let entry = ready.get_mut(&(m, index))?;
        let printed = entry.printed.take();
        if entry.resident.is_none() {
            ready.remove(&(m, index));
        }
        self.shared.hits.fetch_add(u64::from(printed.is_some()), Ordering::Relaxed);
        printed
    }

    /// Residents the simulation drew, and of them how many it found ready.
    pub(crate) fn drawn_and_ready(&self) -> (u64, u64) {
        (self.shared.drawn.load(Ordering::Relaxed), self.shared.hits.load(Ordering::Relaxed))
    }

    /// The resident's state before the day, if built.
    pub(crate) fn resident(&self, m: u32, index: u64) -> Option<Resident> {
        let mut ready = self.shared.ready.lock().unwrap_or_else(|e| e.into_inner());
        let entry = ready.get_mut(&(m, index))?;
        let resident = entry.resident.take();
        if entry.printed.is_none() {
            ready.remove(&(m, index));
        }
        resident
    }
}

impl Drop for Prebuild {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn build_ahead(shared: &Shared, plans: &[Plan], secret: &PersonKeySecret) {
    let keys: Vec<_> = plans.iter().map(|p| key_from_seed(p.key_seed)).collect();
    let public: Vec<[u8; 32]> = keys
        .iter()
        .map(|k| k.public_key().as_ref().try_into().expect("an Ed25519 public key is 32 bytes"))
        .collect();
    // How far ahead of the simulation each municipality is kept: a few of its residents
    // plus what it expects in 1/250 of the day, so that chance runs of its draws rarely
    // overtake the helper.
    let ahead: Vec<u64> = plans.iter().map(|p| AHEAD_MIN + (p.expected / 250.0).ceil() as u64).collect();
    let mut built = vec![0u64; plans.len()];
    while !shared.stop.load(Ordering::Relaxed) {
        let mut busy = false;
        for (m, plan) in plans.iter().enumerate() {
            let next = shared.next[m].load(Ordering::Relaxed);
            // Anything before `next` the simulation has built itself.
            built[m] = built[m].max(next);
            let target = (next + ahead[m]).min(plan.population);
            while built[m] < target {
                if shared.stop.load(Ordering::Relaxed) {
                    return;
                }
                let index = built[m];
                built[m] += 1;
                busy = true;
                let resident = build_resident(plan.code, &plan.actor, index, secret);
                let coupon = SignedCoupon::sign(coupon_of(plan.code, index), 0, &keys[m]);
                let key = public[m];
                let printed = Printed {
                    qr: coupon.to_qr_text(),
                    coupon,
                    key,
                    verifies: Ed25519Check.verifies(&coupon, &key),
                };
                shared
                    .ready
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert((m as u32, index), Ready { printed: Some(printed), resident: Some(resident) });
            }
        }
        if !busy {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn printed(key_seed: u8, index: u64) -> Printed {
        let key = key_from_seed([key_seed; 32]);
        let public: [u8; 32] = key.public_key().as_ref().try_into().expect("32 bytes");
        let coupon = SignedCoupon::sign(coupon_of("141003".parse().expect("a code"), index), 0, &key);
        Printed {
            qr: coupon.to_qr_text(),
            verifies: Ed25519Check.verifies(&coupon, &public),
            coupon,
            key: public,
        }
    }

    #[test]
    fn a_remembered_check_answers_only_for_its_own_coupon_and_key() {
        let mut checked = CheckedSignatures::default();
        let good = printed(1, 0);
        assert!(good.verifies);
        checked.remember(&good);
        assert!(checked.verifies(&good.coupon, &good.key));
        // The same coupon under another municipality's key is checked, and fails.
        let other = printed(2, 0);
        assert!(!checked.verifies(&good.coupon, &other.key));
        // A coupon with one signature byte changed is not the remembered one: checked, fails.
        let mut forged = good.coupon;
        forged.signature[0] ^= 1;
        assert!(!checked.verifies(&forged, &good.key));
        // A remembered failure stays a failure.
        let mut bad = printed(1, 1);
        bad.coupon.signature[5] ^= 1;
        bad.verifies = Ed25519Check.verifies(&bad.coupon, &bad.key);
        checked.remember(&bad);
        assert!(!checked.verifies(&bad.coupon, &bad.key));
    }

    #[test]
    fn a_forgotten_check_is_computed_again() {
        let mut checked = CheckedSignatures::default();
        let first = printed(1, 0);
        checked.remember(&first);
        let filler = printed(1, 1);
        for serial in 0..REMEMBERED as u64 {
            let mut coupon = filler.coupon;
            coupon.signature[..8].copy_from_slice(&serial.to_be_bytes());
            checked.remember(&Printed { coupon, verifies: false, ..filler.clone() });
        }
        assert_eq!(checked.known.len(), REMEMBERED);
        assert!(!checked.known.contains_key(&first.coupon));
        assert!(checked.verifies(&first.coupon, &first.key));
    }
}
