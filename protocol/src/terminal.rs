//! Venue terminals: what a terminal and its municipal node say to each other, and the checks
//! a terminal makes offline.
//!
//! A terminal is a venue laptop enrolled with its municipal node. It never holds resident
//! documents. It receives a [`TerminalBundle`] — the signed directory (the coupon keys of
//! every municipality), the vaccine catalogue, the lots, its venue, and the coupons its
//! municipality has revoked or superseded — and checks each capture against it with
//! [`check_offline`] before storing it durably. It then pushes its capture log; the owner
//! of the coupon (its own node, or another municipality's node reached through it) makes
//! the full check against the resident's document and answers with the final outcome.
//!
//! The same messages carry captures between municipal nodes: a node that receives a
//! capture of another municipality's coupon forwards it to that municipality's node
//! ([`CaptureRequest::Forward`]) and keeps it only until the owner has answered.

use std::collections::BTreeMap;
use std::sync::Arc;

use ring::signature::{ED25519, Ed25519KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use time::{Date, OffsetDateTime};

use crate::catalogue::{Catalogue, Lot};
use crate::coupon::{Ed25519Check, ScannedCoupon, SignatureCheck};
use crate::directory::SignedDirectory;
use crate::municipality::MunicipalityCode;
use crate::person::{hex_decode, hex_lower};
use crate::validation::{CaptureError, ScannedCapture, authenticate_coupon_with, check_date, check_lot};

/// Captures in one push or forward.
pub const MAX_CAPTURES_PER_REQUEST: usize = 256;

/// A capture as the terminal stored it: the texts the scanner typed, never a decoded form,
/// so that the owner decodes and checks them itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalCapture {
    /// Globally unique id made by the terminal; retries and forwards reuse it.
    pub event_id: String,
    /// The coupon's QR text (or legacy 18 digits) as scanned.
    pub coupon: String,
    /// The vial's GS1 text as scanned.
    pub vial: String,
    /// The date of vaccination at the venue.
    pub vaccinated_on: Date,
    /// When the terminal stored it.
    #[serde(with = "time::serde::rfc3339")]
    pub captured_at: OffsetDateTime,
    /// The venue id, in the venue's municipality.
    pub venue: String,
    /// The venue's municipality.
    pub venue_municipality: MunicipalityCode,
    /// The operator who scanned (`token:NAME` or `user:NAME` on the terminal).
    pub recorded_by: String,
}

/// The final or provisional answer about one capture.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum CaptureState {
    /// Stored on the terminal, not yet answered by a node.
    Pending,
    /// The municipal node holds it and is delivering it to the owner municipality.
    Forwarded {
        /// The owner.
        owner: MunicipalityCode,
    },
    /// The owner recorded it in the resident's document (or had already: a replay).
    Recorded {
        /// The owner.
        owner: MunicipalityCode,
        /// The dose number it became.
        dose_number: u8,
        /// True when the owner had recorded it before.
        replay: bool,
    },
    /// The owner refused it; nothing was recorded.
    Refused {
        /// The owner (or the node that refused before delivery).
        owner: MunicipalityCode,
        /// Machine-readable reason (the capture error code).
        code: String,
        /// Japanese message for the operator.
        message_ja: String,
        /// English message.
        message_en: String,
    },
}

impl CaptureState {
    /// True when no further answer will change it.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Recorded { .. } | Self::Refused { .. })
    }
}

/// One capture and the lot registered for its vial at the venue's municipality, so an owner
/// elsewhere can check the lot it never registered itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardedCapture {
    /// The capture.
    pub capture: TerminalCapture,
    /// The lot as the venue's municipality registered it, if it did.
    pub lot: Option<Lot>,
}

/// A request on `/vrs/capture/1`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum CaptureRequest {
    /// A new terminal presents its one-time enrolment secret.
    Enrol {
        /// The secret part of the enrolment token.
        secret: String,
    },
    /// An enrolled terminal asks for a newer bundle.
    Refresh {
        /// The bundle version it holds (0 for none).
        held_version: u64,
    },
    /// An enrolled terminal pushes captures (at most [`MAX_CAPTURES_PER_REQUEST`]).
    Push {
        /// Captures, oldest first.
        captures: Vec<TerminalCapture>,
    },
    /// A municipal node delivers captures of this node's coupons.
    Forward {
        /// Captures with their lots.
        captures: Vec<ForwardedCapture>,
    },
}

/// An answer on `/vrs/capture/1`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum CaptureResponse {
    /// Enrolment accepted: the certificate binding the terminal to its venue.
    Enrolled {
        /// The certificate.
        certificate: TerminalCertificate,
    },
    /// A newer bundle, or none if the held one is current.
    Bundle {
        /// The bundle.
        bundle: Option<Box<TerminalBundle>>,
    },
    /// The state of each pushed or forwarded capture, by event id.
    States {
        /// One entry per capture of the request.
        states: Vec<(String, CaptureState)>,
    },
    /// The request was refused as a whole.
    Refused {
        /// Machine-readable reason.
        code: String,
        /// Explanation.
        message: String,
    },
}

/// A coupon generation the terminal must refuse.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockedCoupon {
    /// Superseded (a newer generation exists) or revoked.
    pub superseded: bool,
    /// The revocation reason, or the newest generation's number for a superseded one.
    pub reason: String,
    /// The resident moved to this municipality: the terminal says where.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_to: Option<MunicipalityCode>,
}

impl BlockedCoupon {
    /// A coupon of a resident who moved to `to`.
    pub fn transferred(to: MunicipalityCode) -> Self {
        Self { superseded: false, reason: format!("transferred:{to}"), moved_to: Some(to) }
    }
}

/// What a terminal needs to check captures offline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalBundle {
    /// Increases whenever anything in the bundle changes.
    pub version: u64,
    /// The terminal's municipality.
    pub municipality: MunicipalityCode,
    /// The terminal's venue.
    pub venue: String,
    /// First day of the campaign.
    pub campaign_start: Date,
    /// The national directory-signing key (hex), to verify `directory`.
    pub national_key: String,
    /// The newest signed directory the node holds (the coupon keys of every municipality),
    /// left out when the terminal holds that very version already (`directory_unchanged`).
    /// Shared, not copied, between the bundles that carry it.
    pub directory: Option<Arc<SignedDirectory>>,
    /// The directory was left out: it is the one in the terminal's bundle, whose version
    /// the terminal said it held (the low 24 bits of a bundle version are its directory's
    /// version). The directory is ~400 KB for 1,742 municipalities, and a bundle changes
    /// with every reissue, revocation or move-out; the directory changes rarely.
    #[serde(default)]
    pub directory_unchanged: bool,
    /// The node's own coupon key (hex), valid even before the node joined a federation.
    pub own_coupon_key: String,
    /// The vaccine catalogue.
    pub catalogue: Catalogue,
    /// Registered lots by lot number.
    pub lots: BTreeMap<String, Lot>,
    /// Coupons of this municipality that must be refused, by their document key
    /// ([`crate::document::coupon_key`]).
    pub blocked: BTreeMap<String, BlockedCoupon>,
}

impl TerminalBundle {
    /// The coupon-signing key of a municipality, from the directory (or the node's own key).
    pub fn coupon_key(&self, municipality: MunicipalityCode) -> Option<Vec<u8>> {
        if municipality == self.municipality {
            return hex_decode(&self.own_coupon_key);
        }
        let directory = &self.directory.as_ref()?.directory;
        directory.primary_of(municipality).and_then(|e| hex_decode(&e.coupon_key))
    }
}

/// The municipality's signature binding a terminal's peer id to one venue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalCertificate {
    /// The municipality.
    pub municipality: MunicipalityCode,
    /// The venue.
    pub venue: String,
    /// The terminal's libp2p peer id.
    pub peer_id: String,
    /// When it was enrolled (RFC 3339).
    pub issued_at: String,
    /// Ed25519 signature (hex) by the municipality's coupon key.
    pub signature: String,
}

fn certificate_message(
    municipality: MunicipalityCode,
    venue: &str,
    peer_id: &str,
    issued_at: &str,
) -> Vec<u8> {
    format!("vrs-terminal-certificate/1\n{municipality}\n{venue}\n{peer_id}\n{issued_at}").into_bytes()
}

impl TerminalCertificate {
    /// Signs a certificate.
    pub fn sign(
        municipality: MunicipalityCode,
        venue: &str,
        peer_id: &str,
        issued_at: &str,
        key: &Ed25519KeyPair,
    ) -> Self {
        let signature = key.sign(&certificate_message(municipality, venue, peer_id, issued_at));
        Self {
            municipality,
            venue: venue.to_owned(),
            peer_id: peer_id.to_owned(),
            issued_at: issued_at.to_owned(),
            signature: hex_lower(signature.as_ref()),
        }
    }

    /// Checks the signature with the municipality's coupon key.
    pub fn verify(&self, coupon_key: &[u8]) -> bool {
        let Some(signature) = hex_decode(&self.signature) else { return false };
        let message = certificate_message(self.municipality, &self.venue, &self.peer_id, &self.issued_at);
        UnparsedPublicKey::new(&ED25519, coupon_key).verify(&message, &signature).is_ok()
    }
}

/// Checks a capture at a terminal, offline, with what the bundle says: the coupon's
/// signature (any municipality in the directory), the coupon not revoked or superseded (own
/// municipality), the date, the product and the lot. What needs the resident's document —
/// dose order, interval, age, a coupon used elsewhere — is the owner's check on push.
pub fn check_offline(
    scans: &ScannedCapture,
    vaccinated_on: Date,
    today: Date,
    bundle: &TerminalBundle,
) -> Result<(), CaptureError> {
    check_offline_with(scans, vaccinated_on, today, bundle, &Ed25519Check)
}

/// [`check_offline`] with the coupon's signature checked by `check`.
pub fn check_offline_with(
    scans: &ScannedCapture,
    vaccinated_on: Date,
    today: Date,
    bundle: &TerminalBundle,
    check: &impl SignatureCheck,
) -> Result<(), CaptureError> {
    let code = *scans.coupon.code();
    authenticate_coupon_with(&scans.coupon, |m| bundle.coupon_key(m), check)?;
    // A signed coupon of this municipality names its generation: refuse a revoked or
    // superseded one. (A legacy 18-digit code stands for the newest generation, which only
    // the owner knows; the owner checks it on push.)
    if code.municipality == bundle.municipality
        && let ScannedCoupon::Signed(signed) = &scans.coupon
        && let Some(entry) = bundle.blocked.get(&crate::document::coupon_key(&code, signed.generation))
    {
        return Err(if let Some(to) = entry.moved_to {
            CaptureError::CouponTransferred { to }
        } else if entry.superseded {
            CaptureError::CouponSuperseded {
                generation: signed.generation,
                current: entry.reason.parse().unwrap_or(signed.generation.saturating_add(1)),
            }
        } else {
            CaptureError::CouponRevoked { reason: entry.reason.clone() }
        });
    }
    check_date(vaccinated_on, today, bundle.campaign_start)?;
    bundle
        .catalogue
        .product(&scans.vial.gtin)
        .ok_or_else(|| CaptureError::ProductUnknown { gtin: scans.vial.gtin.to_string() })?;
    check_lot(&scans.vial.lot, &scans.vial, vaccinated_on, bundle.lots.get(&scans.vial.lot))
}
