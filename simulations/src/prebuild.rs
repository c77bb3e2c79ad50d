//! The second core: what the day's first touch of a resident needs, built ahead.
//!
//! The simulation itself runs on one thread, in the order its seed dictates. But a resident's
//! state before the day — the registration document with the coupon issued in bulk, and the
//! signed coupon they bring — depends only on who they are, not on anything that happens
//! during the day. Residents are vaccinated in register order within each municipality, so a
//! second thread can build these for the residents about to come, in proportion to each
//! municipality's share of the day's doses, a few thousand ahead of the simulation. The
//! simulation takes what is ready and builds anything else itself with the same function,
//! so the run — and its digest — is the same whether the helper keeps up or not.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use automerge::ActorId;
use protocol::coupon::SignedCoupon;
use protocol::municipality::MunicipalityCode;
use protocol::person::PersonKeySecret;

use crate::world::{Resident, build_resident, coupon_of, key_from_seed};

/// How many residents the helper may have built that the simulation has not yet drawn.
const LEAD: u64 = 2_048;

/// What the helper needs of one municipality.
pub(crate) struct Plan {
    pub(crate) code: MunicipalityCode,
    pub(crate) actor: ActorId,
    pub(crate) key_seed: [u8; 32],
    pub(crate) population: u64,
    /// Doses expected in the day (its share of the total).
    pub(crate) expected: f64,
}

#[derive(Default)]
struct Ready {
    qr: Option<String>,
    resident: Option<Resident>,
}

struct Shared {
    ready: Mutex<HashMap<(u32, u64), Ready>>,
    /// Residents the simulation has drawn, in all.
    drawn: AtomicU64,
    /// Residents the helper has built, in all.
    built: AtomicU64,
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
            built: AtomicU64::new(0),
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
    /// generation-0 coupon text, if built.
    pub(crate) fn draw(&self, m: u32, index: u64) -> Option<String> {
        self.shared.next[m as usize].fetch_max(index + 1, Ordering::Relaxed);
        self.shared.drawn.fetch_add(1, Ordering::Relaxed);
        let mut ready = self.shared.ready.lock().unwrap_or_else(|e| e.into_inner());
        let entry = ready.get_mut(&(m, index))?;
        let qr = entry.qr.take();
        if entry.resident.is_none() {
            ready.remove(&(m, index));
        }
        qr
    }

    /// The resident's state before the day, if built.
    pub(crate) fn resident(&self, m: u32, index: u64) -> Option<Resident> {
        let mut ready = self.shared.ready.lock().unwrap_or_else(|e| e.into_inner());
        let entry = ready.get_mut(&(m, index))?;
        let resident = entry.resident.take();
        if entry.qr.is_none() {
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
    let mut built = vec![0u64; plans.len()];
    const ROUNDS: u64 = 1_000;
    for round in 1..=ROUNDS {
        for (m, plan) in plans.iter().enumerate() {
            let target =
                ((plan.expected * round as f64 / ROUNDS as f64).ceil() as u64 + 1).min(plan.population);
            while built[m] < target {
                while shared.built.load(Ordering::Relaxed) >= shared.drawn.load(Ordering::Relaxed) + LEAD {
                    if shared.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                if shared.stop.load(Ordering::Relaxed) {
                    return;
                }
                let index = built[m];
                built[m] += 1;
                if index < shared.next[m].load(Ordering::Relaxed) {
                    continue; // the simulation got there first and built it itself
                }
                let resident = build_resident(plan.code, &plan.actor, index, secret);
                let qr = SignedCoupon::sign(coupon_of(plan.code, index), 0, &keys[m]).to_qr_text();
                shared
                    .ready
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert((m as u32, index), Ready { qr: Some(qr), resident: Some(resident) });
                shared.built.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
