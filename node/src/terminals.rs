//! The municipal node's side of venue terminals and of vaccination away from home:
//! enrolment tokens, enrolled terminals, the bundle a terminal validates with, captures
//! pushed by terminals, and captures forwarded to or from other municipalities.
//!
//! A capture of this municipality's coupon goes straight to the writer, which checks it
//! against the resident's document. A capture of another municipality's coupon is stored in
//! the forward outbox (one durable commit), forwarded to the owner's node, and removed once
//! the owner has answered; the answer (no personal data) waits for the terminal to fetch it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use anyhow::Context;
use protocol::catalogue::Catalogue;
use protocol::directory::SignedDirectory;
use protocol::document::ResidentStatus;
use protocol::municipality::MunicipalityCode;
use protocol::person::hex_lower;
use protocol::terminal::{
    CaptureResponse, CaptureState, ForwardedCapture, TerminalBundle, TerminalCapture, TerminalCertificate,
};
use protocol::validation::{CaptureError, authenticate_coupon, decode_scans};
use redb::ReadableTable;
use ring::rand::SystemRandom;
use ring::signature::Ed25519KeyPair;
use serde::{Deserialize, Serialize};
use time::{Date, OffsetDateTime};

use crate::config::{random_bytes, sha256_hex};
use crate::problem::Problem;
use crate::store::{
    ENROLMENTS, FORWARD_OUTBOX, FORWARD_RESULTS, META_BUNDLE_SEQ, META_TERMINALS_SEQ, Store, TERMINALS, bump,
    get_json, put_json,
};
use crate::writer::{CaptureCommand, Command, Who, WriterHandle};

/// Prefix of enrolment tokens.
pub const ENROLMENT_PREFIX: &str = "vrs_e_";

/// An enrolment token waiting for its terminal.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Enrolment {
    /// The venue the terminal will be bound to.
    pub venue: String,
    /// Who made it.
    pub created_by: String,
    /// When it stops working.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// The terminal that used it, once used.
    pub used_by: Option<String>,
}

/// An enrolled terminal.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TerminalRecord {
    /// Its certificate (venue, peer id, time, signature).
    pub certificate: TerminalCertificate,
    /// Revoked terminals are disconnected and refused.
    pub revoked: bool,
}

/// A capture waiting in the forward outbox.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Outgoing {
    /// The coupon's municipality.
    pub owner: MunicipalityCode,
    /// The capture and its lot.
    pub forwarded: ForwardedCapture,
}

/// The three parts of an enrolment token: `vrs_e_<secret>@<node address>/p2p/<peer id>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrolmentToken {
    /// The secret (64 hex digits).
    pub secret: String,
    /// The node's libp2p address, ending in `/p2p/<peer id>`.
    pub node: String,
}

impl EnrolmentToken {
    /// Parses a token as the administrator copied it.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let text = text.trim();
        let rest = text.strip_prefix(ENROLMENT_PREFIX).with_context(|| {
            format!("an enrolment token starts with {ENROLMENT_PREFIX}; 登録トークンは {ENROLMENT_PREFIX} で始まります")
        })?;
        let (secret, node) = rest.split_once('@').context(
            "the enrolment token has no node address after @; 登録トークンに @ 以降のノードアドレスがありません",
        )?;
        anyhow::ensure!(
            secret.len() == 64 && secret.bytes().all(|b| b.is_ascii_hexdigit()),
            "the enrolment token's secret must be 64 hex digits; 登録トークンの秘密部分が不正です"
        );
        anyhow::ensure!(
            node.contains("/p2p/"),
            "the enrolment token's node address must end in /p2p/<peer id>; ノードアドレスが不正です"
        );
        Ok(Self { secret: secret.to_owned(), node: node.to_owned() })
    }

    /// The text shown to the administrator.
    pub fn to_text(&self) -> String {
        format!("{ENROLMENT_PREFIX}{}@{}", self.secret, self.node)
    }
}

/// Creates an enrolment token for `venue`, valid for `valid_hours`, in `txn`.
pub fn add_enrolment(
    txn: &redb::WriteTransaction,
    venue: &str,
    valid_hours: u32,
    created_by: &str,
    node_address: &str,
    now: OffsetDateTime,
) -> anyhow::Result<(EnrolmentToken, Enrolment)> {
    let secret = hex_lower(&random_bytes(&SystemRandom::new(), 32)?);
    let enrolment = Enrolment {
        venue: venue.to_owned(),
        created_by: created_by.to_owned(),
        expires_at: now + time::Duration::hours(i64::from(valid_hours.clamp(1, 24 * 14))),
        used_by: None,
    };
    put_json(txn, ENROLMENTS, &sha256_hex(secret.as_bytes()), &enrolment)?;
    bump(txn, META_TERMINALS_SEQ)?;
    Ok((EnrolmentToken { secret, node: node_address.to_owned() }, enrolment))
}

/// Uses an enrolment secret for `certificate`'s peer: `Ok(Err(reason))` when refused.
pub fn enrol(
    txn: &redb::WriteTransaction,
    secret: &str,
    certificate: &TerminalCertificate,
    now: OffsetDateTime,
) -> anyhow::Result<Result<(), Problem>> {
    let key = sha256_hex(secret.as_bytes());
    let enrolment: Option<Enrolment> = get_json(&txn.open_table(ENROLMENTS)?, &key)?;
    let refuse = |code: &str, en: &str, ja: &str| {
        Ok(Err(Problem::new(axum::http::StatusCode::FORBIDDEN, code, None, en.to_owned(), ja.to_owned())))
    };
    let Some(mut enrolment) = enrolment else {
        return refuse("enrolment_unknown", "no such enrolment token", "この登録トークンは存在しません");
    };
    if let Some(used_by) = &enrolment.used_by {
        let revoked =
            get_json::<TerminalRecord>(&txn.open_table(TERMINALS)?, used_by)?.is_none_or(|t| t.revoked);
        if *used_by == certificate.peer_id && !revoked {
            return Ok(Ok(()));
        }
        return refuse(
            "enrolment_used",
            "this enrolment token was used already",
            "この登録トークンは使用済みです",
        );
    }
    if enrolment.expires_at <= now {
        return refuse(
            "enrolment_expired",
            "this enrolment token has expired",
            "この登録トークンは期限切れです",
        );
    }
    if enrolment.venue != certificate.venue {
        return refuse("enrolment_venue", "the certificate names another venue", "会場が一致しません");
    }
    enrolment.used_by = Some(certificate.peer_id.clone());
    put_json(txn, ENROLMENTS, &key, &enrolment)?;
    let record = TerminalRecord { certificate: certificate.clone(), revoked: false };
    put_json(txn, TERMINALS, &certificate.peer_id, &record)?;
    bump(txn, META_TERMINALS_SEQ)?;
    Ok(Ok(()))
}

/// Revokes an enrolled terminal: the node disconnects it and refuses it from then on.
pub fn revoke(txn: &redb::WriteTransaction, peer_id: &str) -> anyhow::Result<Result<(), Problem>> {
    let Some(mut record) = get_json::<TerminalRecord>(&txn.open_table(TERMINALS)?, peer_id)? else {
        return Ok(Err(Problem::not_found("terminal", "端末", peer_id)));
    };
    record.revoked = true;
    put_json(txn, TERMINALS, peer_id, &record)?;
    bump(txn, META_TERMINALS_SEQ)?;
    Ok(Ok(()))
}

/// The address terminals dial: `[p2p] advertise` (or `listen`) and this node's peer id.
pub fn p2p_address(files: &crate::config::NodeFiles) -> anyhow::Result<String> {
    let keypair = crate::p2p::load_or_create_identity(&files.dir.join("keys/p2p-identity.key"))?;
    let p2p = &files.config.p2p;
    let address = p2p.advertise.clone().unwrap_or_else(|| p2p.listen.clone());
    anyhow::ensure!(
        !address.contains("/0.0.0.0/") && !address.ends_with("/tcp/0"),
        "[p2p] listen {address} is not an address a terminal can dial: set [p2p] advertise in node.toml; \
         端末が接続できるアドレスを [p2p] advertise に設定してください"
    );
    Ok(format!("{address}/p2p/{}", keypair.public().to_peer_id()))
}

/// The venue an enrolment secret is for, if it is usable now.
pub fn enrolment_venue(store: &Store, secret: &str, now: OffsetDateTime) -> anyhow::Result<Option<String>> {
    let enrolment: Option<Enrolment> = store.read()?.json(ENROLMENTS, &sha256_hex(secret.as_bytes()))?;
    Ok(enrolment.filter(|e| e.expires_at > now).map(|e| e.venue))
}

/// Enrolled terminals not revoked, and whether an enrolment token is usable now.
pub fn terminal_peers(store: &Store, now: OffsetDateTime) -> anyhow::Result<(Vec<TerminalRecord>, bool)> {
    let view = store.read()?;
    let terminals =
        view.all::<TerminalRecord>(TERMINALS)?.into_iter().map(|(_, t)| t).filter(|t| !t.revoked).collect();
    let open = view
        .all::<Enrolment>(ENROLMENTS)?
        .into_iter()
        .any(|(_, e)| e.used_by.is_none() && e.expires_at > now);
    Ok((terminals, open))
}

/// What the node puts into every terminal's bundle.
pub struct CaptureService {
    /// The store.
    pub store: Arc<Store>,
    /// The writer.
    pub writer: WriterHandle,
    /// This municipality.
    pub municipality: MunicipalityCode,
    /// Signs terminal certificates (the coupon key).
    pub signing_key: Arc<Ed25519KeyPair>,
    /// Verifies this municipality's coupons.
    pub coupon_public_key: Vec<u8>,
    /// The catalogue.
    pub catalogue: Catalogue,
    /// First day of the campaign.
    pub campaign_start: Date,
    /// The national directory key (hex).
    pub national_key: String,
}

/// The low bits of a bundle version: the version of the directory in it.
pub const DIRECTORY_VERSION_MASK: u64 = (1 << 24) - 1;

impl CaptureService {
    /// The bundle for a terminal of `venue`, if newer than `held_version`.
    pub fn bundle(
        &self,
        venue: &str,
        directory: Option<&SignedDirectory>,
        held_version: u64,
    ) -> anyhow::Result<Option<TerminalBundle>> {
        let view = self.store.read()?;
        let directory_version = directory.map_or(0, |d| d.directory.version);
        let version = (view.meta(META_BUNDLE_SEQ)? << 24) + directory_version;
        if version == held_version && held_version != 0 {
            return Ok(None);
        }
        let lots = view.lots()?.into_iter().map(|lot| (lot.lot.clone(), lot)).collect();
        let blocked = view.all(crate::store::BLOCKED_COUPONS)?.into_iter().collect();
        let unchanged = directory_version != 0 && held_version & DIRECTORY_VERSION_MASK == directory_version;
        Ok(Some(TerminalBundle {
            version,
            municipality: self.municipality,
            venue: venue.to_owned(),
            campaign_start: self.campaign_start,
            national_key: self.national_key.clone(),
            directory: if unchanged { None } else { directory.map(|d| Arc::new(d.clone())) },
            directory_unchanged: unchanged,
            own_coupon_key: hex_lower(&self.coupon_public_key),
            catalogue: self.catalogue.clone(),
            lots,
            blocked,
        }))
    }

    /// Signs a certificate for a terminal of `venue` and stores the enrolment.
    pub async fn enrol(&self, peer: &str, secret: &str) -> CaptureResponse {
        let now = OffsetDateTime::now_utc();
        let venue = match enrolment_venue(&self.store, secret, now) {
            Ok(Some(venue)) => venue,
            Ok(None) => {
                return refused("enrolment_refused", "the enrolment token is unknown, used or expired");
            }
            Err(error) => return refused("internal", &format!("{error:#}")),
        };
        let issued_at = now.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
        let certificate =
            TerminalCertificate::sign(self.municipality, &venue, peer, &issued_at, &self.signing_key);
        let who = Who { actor: format!("terminal:{peer}"), role: "terminal".into(), request_id: "-".into() };
        let secret = secret.to_owned();
        let written = certificate.clone();
        let result = self
            .writer
            .call(&who, |reply| Command::Apply {
                action: "terminal.enrol".into(),
                subject: format!("venue:{venue}"),
                op: Box::new(move |txn, now| {
                    Ok(enrol(txn, &secret, &written, now)?.map(|()| serde_json::Value::Null))
                }),
                reply,
            })
            .await;
        match result {
            Ok(_) => CaptureResponse::Enrolled { certificate },
            Err(problem) => refused(&problem.code, &problem.message_en),
        }
    }

    /// Captures pushed by an enrolled terminal of `venue`. `directory` gives the other
    /// municipalities' coupon keys.
    pub async fn push(
        &self,
        peer: &str,
        venue: &str,
        captures: Vec<TerminalCapture>,
        directory: Option<&SignedDirectory>,
    ) -> CaptureResponse {
        let futures = captures.into_iter().map(|capture| self.push_one(peer, venue, capture, directory));
        let states = libp2p::futures::future::join_all(futures).await;
        CaptureResponse::States { states }
    }

    async fn push_one(
        &self,
        peer: &str,
        venue: &str,
        capture: TerminalCapture,
        directory: Option<&SignedDirectory>,
    ) -> (String, CaptureState) {
        let event_id = capture.event_id.clone();
        let state = if capture.venue != venue || capture.venue_municipality != self.municipality {
            self.refusal(
                "venue_not_allowed",
                "この端末はこの会場の記録をできません",
                &format!("this terminal records for venue {venue} only"),
            )
        } else {
            match self.owner_of(&capture) {
                Ok(owner) if owner == self.municipality => {
                    if let Some(to) = self.passed_on(peer, &capture.event_id) {
                        return (event_id, self.queue_forward(peer, to, capture, None).await);
                    }
                    let state = self.record(peer, capture.clone(), None, None).await;
                    match self.moved_to(&capture, &state) {
                        // The resident moved away and the terminal did not know yet: the
                        // dose goes to their new municipality, like a dose given away
                        // from home.
                        Some(to) => self.queue_forward(peer, to, capture, None).await,
                        None => state,
                    }
                }
                Ok(owner) => match self.check_foreign(&capture, owner, directory) {
                    Ok(()) => self.queue_forward(peer, owner, capture, None).await,
                    Err(state) => state,
                },
                Err(error) => self.refusal(error.code(), &error.message_ja(), &error.to_string()),
            }
        };
        (event_id, state)
    }

    /// Before holding another municipality's coupon: the owner is in the directory and the
    /// coupon carries its signature (what the terminal checked, checked again here).
    fn check_foreign(
        &self,
        capture: &TerminalCapture,
        owner: MunicipalityCode,
        directory: Option<&SignedDirectory>,
    ) -> Result<(), CaptureState> {
        let key = directory
            .and_then(|d| d.directory.primary_of(owner))
            .and_then(|e| protocol::person::hex_decode(&e.coupon_key));
        let Some(key) = key else {
            return Err(self.refusal(
                "owner_unknown",
                &format!("接種券の自治体 {owner} は連携名簿にありません"),
                &format!("municipality {owner} is not in the federation directory"),
            ));
        };
        let scans = decode_scans(&capture.coupon, &capture.vial)
            .map_err(|e| self.refusal(e.code(), &e.message_ja(), &e.to_string()))?;
        if !matches!(scans.coupon, protocol::coupon::ScannedCoupon::Signed(_)) {
            return Err(self.refusal(
                "unsigned_away_coupon",
                "他の自治体の接種券は署名付きQRコードで読み取ってください",
                "scan another municipality's coupon by its signed QR code",
            ));
        }
        authenticate_coupon(&scans.coupon, |m| (m == owner).then(|| key.clone()))
            .map_err(|e| self.refusal(e.code(), &e.message_ja(), &e.to_string()))
    }

    fn owner_of(&self, capture: &TerminalCapture) -> Result<MunicipalityCode, CaptureError> {
        let scans = decode_scans(&capture.coupon, &capture.vial)?;
        Ok(scans.coupon.code().municipality)
    }

    fn refusal(&self, code: &str, ja: &str, en: &str) -> CaptureState {
        CaptureState::Refused {
            owner: self.municipality,
            code: code.to_owned(),
            message_ja: ja.to_owned(),
            message_en: en.to_owned(),
        }
    }

    /// The state a writer's refusal stands for: a refusal of the capture is final; a
    /// failure of this node (5xx) is not, and the capture is pushed again.
    fn state_for(&self, problem: &Problem) -> CaptureState {
        if problem.status.is_server_error() {
            tracing::error!(code = %problem.code, "a capture could not be stored; the terminal will push it again");
            return CaptureState::Pending;
        }
        CaptureState::Refused {
            owner: self.municipality,
            code: problem.code.clone(),
            message_ja: problem.message_ja.clone(),
            message_en: problem.message_en.clone(),
        }
    }

    /// Records a capture through the writer: of this municipality's coupon, or, with
    /// `transferred_from`, of the coupon's municipality's coupon a handoff carried here (with
    /// the directory that gives its key).
    async fn record(
        &self,
        peer: &str,
        capture: TerminalCapture,
        lot: Option<protocol::catalogue::Lot>,
        transferred_from: Option<(MunicipalityCode, Option<&SignedDirectory>)>,
    ) -> CaptureState {
        let (issuer, key) = match transferred_from {
            None => (self.municipality, Some(self.coupon_public_key.clone())),
            Some((from, directory)) => (
                from,
                directory
                    .and_then(|d| d.directory.primary_of(from))
                    .and_then(|e| protocol::person::hex_decode(&e.coupon_key)),
            ),
        };
        let scans = match decode_scans(&capture.coupon, &capture.vial).and_then(|scans| {
            authenticate_coupon(&scans.coupon, |m| if m == issuer { key.clone() } else { None })
                .map(|()| scans)
        }) {
            Ok(scans) => scans,
            Err(error) => return self.refusal(error.code(), &error.message_ja(), &error.to_string()),
        };
        // A forwarded lot stands only for the vial it was registered for.
        let lot = lot.filter(|l| l.lot == scans.vial.lot && l.gtin == scans.vial.gtin);
        let venue = if capture.venue_municipality == self.municipality {
            capture.venue.clone()
        } else {
            format!("{}/{}", capture.venue_municipality, capture.venue)
        };
        let command = Box::new(CaptureCommand {
            scans,
            vaccinated_on: Some(capture.vaccinated_on),
            venue,
            event_id: Some(capture.event_id.clone()),
            recorded_by: format!("{}@{}", capture.recorded_by, peer),
            captured_at: Some(capture.captured_at),
            forwarded_lot: lot,
            transferred_from: transferred_from.map(|(from, _)| from),
            preloaded: None,
            // The callers pass a moved resident's dose on.
            passed_on_if_moved: true,
        });
        let command = match self.writer.read_ahead(&self.store, command).await {
            Ok(command) => command,
            Err(problem) => return self.state_for(&problem),
        };
        let who =
            Who { actor: format!("peer:{peer}"), role: "terminal".into(), request_id: capture.event_id };
        match self.writer.call(&who, |reply| Command::Capture(command, reply)).await {
            Ok(outcome) => CaptureState::Recorded {
                owner: self.municipality,
                dose_number: outcome.event.dose_number,
                replay: outcome.replay,
            },
            Err(problem) => self.state_for(&problem),
        }
    }

    /// The municipality a resident moved to, when `state` refused their coupon because the
    /// record was handed there.
    fn moved_to(&self, capture: &TerminalCapture, state: &CaptureState) -> Option<MunicipalityCode> {
        let CaptureState::Refused { code, .. } = state else { return None };
        if code != "coupon_transferred" {
            return None;
        }
        self.transferred_to(capture)
    }

    /// Where the resident this municipality issued the capture's coupon to was handed.
    fn transferred_to(&self, capture: &TerminalCapture) -> Option<MunicipalityCode> {
        let scans = decode_scans(&capture.coupon, &capture.vial).ok()?;
        let view = self.store.read().ok()?;
        let resident = view.index(crate::store::IDX_COUPON, scans.coupon.code().number.as_str()).ok()??;
        view.record(&resident).ok()??.transfer.map(|t| t.to)
    }

    /// The municipality this node passed an own coupon's capture on to (its resident had
    /// moved there), while the capture waits in the outbox or its answer waits for `peer`:
    /// a push again goes straight back to the outbox, without the writer refusing it anew.
    fn passed_on(&self, peer: &str, event_id: &str) -> Option<MunicipalityCode> {
        let key = outbox_key(peer, event_id);
        let view = self.store.read().ok()?;
        if let Ok(Some(held)) = view.json::<Outgoing>(FORWARD_OUTBOX, &key) {
            return Some(held.owner);
        }
        // The answer may name this municipality: the resident came back here and the dose
        // was passed on to them here.
        match view.json::<CaptureState>(FORWARD_RESULTS, &key).ok()?? {
            CaptureState::Recorded { owner, .. } | CaptureState::Refused { owner, .. } => Some(owner),
            _ => None,
        }
    }

    /// Whether a handoff carried this coupon here.
    fn carries_coupon_of(&self, capture: &TerminalCapture) -> bool {
        let Ok(scans) = decode_scans(&capture.coupon, &capture.vial) else { return false };
        let code = scans.coupon.code().to_string();
        self.store
            .read()
            .and_then(|view| view.index(crate::store::IDX_HANDOFF_COUPON, &code))
            .is_ok_and(|found| found.is_some())
    }

    /// The resident a handoff brought here with this capture's coupon.
    fn carried_resident(&self, capture: &TerminalCapture) -> Option<protocol::document::ResidentRecord> {
        let scans = decode_scans(&capture.coupon, &capture.vial).ok()?;
        let view = self.store.read().ok()?;
        let resident =
            view.index(crate::store::IDX_HANDOFF_COUPON, &scans.coupon.code().to_string()).ok()??;
        view.record(&resident).ok()?
    }

    /// Whether `from` handed here a resident with this capture's coupon: at their latest
    /// arrival, or an earlier one (they left and came back, and `from` passes on a dose it
    /// had been sent while they lived there).
    fn handed_here_by(&self, capture: &TerminalCapture, from: MunicipalityCode) -> bool {
        let Ok(scans) = decode_scans(&capture.coupon, &capture.vial) else { return false };
        let code = scans.coupon.code().to_string();
        self.store.read().and_then(|view| view.handed_here(&code, from)).unwrap_or(false)
            || self.carried_resident(capture).and_then(|r| r.arrival).is_some_and(|a| a.from == from)
    }

    /// Records a dose against a coupon a handoff carried here (`issuer`'s), or passes it on
    /// if the resident has since moved on again: the coupon then travels a second time.
    async fn record_carried(
        &self,
        peer: &str,
        issuer: MunicipalityCode,
        f: ForwardedCapture,
        directory: Option<&SignedDirectory>,
    ) -> CaptureState {
        // The resident lives here now: record (or answer with the record), even if this capture
        // was passed on from here before they came back: two municipalities that each passed
        // it to the other would otherwise wait for each other for ever.
        let here = self
            .carried_resident(&f.capture)
            .is_some_and(|r| r.transfer.is_none() && r.identity.status == ResidentStatus::Active);
        if here {
            let event_id = f.capture.event_id.clone();
            let state = self.record(peer, f.capture, f.lot, Some((issuer, directory))).await;
            if state.is_final() {
                self.forget_passed_on(peer, &event_id).await;
            }
            return state;
        }
        if let Some(to) = self.passed_on(peer, &f.capture.event_id) {
            return self.queue_forward(peer, to, f.capture, f.lot).await;
        }
        let state = self.record(peer, f.capture.clone(), f.lot.clone(), Some((issuer, directory))).await;
        let moved_on = match &state {
            CaptureState::Refused { code, .. } if code == "resident_not_active" => {
                self.carried_resident(&f.capture).and_then(|r| r.transfer).map(|t| t.to)
            }
            _ => None,
        };
        match moved_on {
            Some(to) => self.queue_forward(peer, to, f.capture, f.lot).await,
            None => state,
        }
    }

    /// Drops what is left of an earlier passing-on of `peer`'s capture (the outbox row, or an
    /// answer not yet handed over), once the dose has been answered here.
    async fn forget_passed_on(&self, peer: &str, event_id: &str) {
        let key = outbox_key(peer, event_id);
        let held = self.store.read().and_then(|view| {
            Ok(view.json::<Outgoing>(FORWARD_OUTBOX, &key)?.is_some()
                || view.json::<CaptureState>(FORWARD_RESULTS, &key)?.is_some())
        });
        if !held.unwrap_or(false) {
            return;
        }
        let who =
            Who { actor: format!("peer:{peer}"), role: "municipal_node".into(), request_id: key.clone() };
        let result = self
            .writer
            .call(&who, |reply| Command::Apply {
                action: "capture.forward.withdrawn".into(),
                subject: format!("capture:{event_id}"),
                op: Box::new(move |txn, _now| {
                    txn.open_table(FORWARD_OUTBOX)?.remove(key.as_str())?;
                    txn.open_table(FORWARD_RESULTS)?.remove(key.as_str())?;
                    Ok(Ok(serde_json::Value::Null))
                }),
                reply,
            })
            .await;
        if let Err(problem) = result {
            tracing::warn!(code = %problem.code, "a capture passed on earlier stays in the outbox");
        }
    }

    /// Stores a capture of another municipality's coupon for forwarding, or answers with
    /// the owner's answer if it has come. Keys are the sender's peer id (a terminal, or the
    /// node that forwarded it here) and the event id. `lot` is the venue municipality's lot
    /// when the capture came from another node; otherwise this node's own is looked up.
    async fn queue_forward(
        &self,
        peer: &str,
        owner: MunicipalityCode,
        capture: TerminalCapture,
        lot: Option<protocol::catalogue::Lot>,
    ) -> CaptureState {
        let key = outbox_key(peer, &capture.event_id);
        // Still waiting for the owner: answered from a read, without a write.
        match self.store.read().and_then(|view| view.json::<Outgoing>(FORWARD_OUTBOX, &key)) {
            Ok(Some(held)) if held.forwarded.capture == capture => return CaptureState::Forwarded { owner },
            Ok(Some(_)) => {
                return self.refusal(
                    "event_id_reused",
                    "この記録IDは別の読み取りで使われています",
                    "this event id names another capture",
                );
            }
            Ok(None) => {}
            Err(error) => {
                tracing::error!(%error, "cannot read the forward outbox");
                return CaptureState::Pending;
            }
        }
        let lot = match lot {
            Some(lot) => Some(lot),
            None => {
                let lot_number =
                    decode_scans(&capture.coupon, &capture.vial).map(|s| s.vial.lot).unwrap_or_default();
                match self.store.read().and_then(|view| view.lot(&lot_number)) {
                    Ok(lot) => lot,
                    Err(error) => {
                        tracing::error!(%error, "cannot read lots");
                        return CaptureState::Pending;
                    }
                }
            }
        };
        let outgoing = Outgoing { owner, forwarded: ForwardedCapture { capture, lot } };
        let who = Who { actor: format!("peer:{peer}"), role: "terminal".into(), request_id: key.clone() };
        let result = self
            .writer
            .call(&who, |reply| Command::Apply {
                action: "capture.forward".into(),
                subject: format!("municipality:{owner}"),
                op: Box::new(move |txn, _now| {
                    // An answer already here: hand it over once, then forget it.
                    let mut results = txn.open_table(FORWARD_RESULTS)?;
                    if let Some(state) = get_json::<CaptureState>(&results, &key)? {
                        results.remove(key.as_str())?;
                        return Ok(Ok(serde_json::to_value(state)?));
                    }
                    drop(results);
                    if txn.open_table(FORWARD_OUTBOX)?.get(key.as_str())?.is_none() {
                        put_json(txn, FORWARD_OUTBOX, &key, &outgoing)?;
                    }
                    Ok(Ok(serde_json::to_value(CaptureState::Forwarded { owner })?))
                }),
                reply,
            })
            .await;
        match result.map(serde_json::from_value::<CaptureState>) {
            Ok(Ok(state)) => state,
            Ok(Err(error)) => {
                tracing::error!(%error, "unreadable forward state");
                CaptureState::Pending
            }
            Err(problem) => self.state_for(&problem),
        }
    }

    /// Captures forwarded by `peer`, the primary node of municipality `from`: its own
    /// venues' captures of this municipality's coupons, and captures of `from`'s own coupons
    /// carried here by a handoff (given at `from`'s venues or passed on by `from`).
    pub async fn forwarded(
        &self,
        peer: &str,
        from: MunicipalityCode,
        captures: Vec<ForwardedCapture>,
        directory: Option<&SignedDirectory>,
    ) -> CaptureResponse {
        let futures = captures.into_iter().map(|f| async move {
            let event_id = f.capture.event_id.clone();
            let mismatch = || {
                self.refusal(
                    "venue_municipality_mismatch",
                    "転送元の自治体と会場の自治体が一致しません",
                    &format!(
                        "a node of {from} forwarded a capture made at a venue of {}",
                        f.capture.venue_municipality
                    ),
                )
            };
            let state = match self.owner_of(&f.capture) {
                _ if from == self.municipality => mismatch(),
                // A coupon of the forwarding municipality, carried here by a handoff: the
                // resident moved here after a terminal checked the coupon — at one of that
                // municipality's venues, or at a third municipality's, which forwarded it to
                // the coupon's municipality, which passed it on.
                Ok(owner) if owner == from && self.carries_coupon_of(&f.capture) => {
                    self.record_carried(peer, owner, f, directory).await
                }
                // The forwarding municipality's own coupon, of a resident whose handoff has
                // not been accepted here yet: not final, so it is forwarded again.
                Ok(owner) if owner == from => CaptureState::Pending,
                // A coupon of a municipality the resident left before `from` (or of this one,
                // if they have come back), passed on by `from`, where they lived in between
                // and which handed them here. Recorded against the latest arrival, or passed
                // on again from there: `from` may have handed them here before they left and
                // came back by way of somewhere else.
                Ok(owner) if self.handed_here_by(&f.capture, from) => {
                    self.record_carried(peer, owner, f, directory).await
                }
                // A third municipality's coupon before `from`'s handoff has been accepted
                // here: not final, so it is forwarded again.
                Ok(owner) if owner != self.municipality => CaptureState::Pending,
                // This municipality's coupon of a resident it handed away, passed back by
                // `from` before their return from there has been accepted here: the same.
                Ok(_)
                    if f.capture.venue_municipality != from && self.transferred_to(&f.capture).is_some() =>
                {
                    CaptureState::Pending
                }
                _ if f.capture.venue_municipality != from => mismatch(),
                // This municipality's own coupon, the venue the forwarding municipality's.
                Ok(_) => {
                    if let Some(to) = self.passed_on(peer, &f.capture.event_id) {
                        return (event_id, self.queue_forward(peer, to, f.capture, f.lot).await);
                    }
                    let state = self.record(peer, f.capture.clone(), f.lot.clone(), None).await;
                    // The resident moved away: pass it on to their new municipality, as for
                    // this municipality's own terminals; the venue's node asks again until
                    // the answer is final.
                    match self.moved_to(&f.capture, &state) {
                        Some(to) => self.queue_forward(peer, to, f.capture, f.lot).await,
                        None => state,
                    }
                }
                Err(error) => self.refusal(error.code(), &error.message_ja(), &error.to_string()),
            };
            (event_id, state)
        });
        CaptureResponse::States { states: libp2p::futures::future::join_all(futures).await }
    }

    /// The outbox, grouped by owner: at most `limit` captures per owner, each with its key.
    /// Reads nothing but the row count when the outbox is empty.
    pub fn outbox(
        &self,
        limit: usize,
    ) -> anyhow::Result<BTreeMap<MunicipalityCode, Vec<(String, ForwardedCapture)>>> {
        let view = self.store.read()?;
        let mut by_owner: BTreeMap<MunicipalityCode, Vec<(String, ForwardedCapture)>> = BTreeMap::new();
        if view.count(FORWARD_OUTBOX)? == 0 {
            return Ok(by_owner);
        }
        for (key, outgoing) in view.all::<Outgoing>(FORWARD_OUTBOX)? {
            let list = by_owner.entry(outgoing.owner).or_default();
            if list.len() < limit {
                list.push((key, outgoing.forwarded));
            }
        }
        Ok(by_owner)
    }

    /// Takes the owner's answers to the captures sent (`sent`: outbox keys by event id):
    /// final ones leave the outbox, with the personal data they carried, and wait without
    /// it for the terminal. Answers about anything not sent are ignored.
    pub async fn answered(
        &self,
        owner_peer: &str,
        sent: HashMap<String, String>,
        states: Vec<(String, CaptureState)>,
    ) -> Result<(), Problem> {
        let finals: Vec<(String, CaptureState)> = states
            .into_iter()
            .filter(|(_, s)| s.is_final())
            .filter_map(|(id, s)| sent.get(&id).map(|key| (key.clone(), s)))
            .collect();
        if finals.is_empty() {
            return Ok(());
        }
        let who = Who {
            actor: format!("peer:{owner_peer}"),
            role: "municipal_node".into(),
            request_id: "-".into(),
        };
        let n = finals.len();
        self.writer
            .call(&who, |reply| Command::Apply {
                action: "capture.forward.answered".into(),
                subject: format!("captures:{n}"),
                op: Box::new(move |txn, _now| {
                    let mut outbox = txn.open_table(FORWARD_OUTBOX)?;
                    let mut results = txn.open_table(FORWARD_RESULTS)?;
                    for (key, state) in &finals {
                        if outbox.remove(key.as_str())?.is_some() {
                            results.insert(key.as_str(), serde_json::to_vec(state)?.as_slice())?;
                        }
                    }
                    Ok(Ok(serde_json::Value::Null))
                }),
                reply,
            })
            .await
            .map(|_| ())
    }
}

/// The key of a forwarded capture at the forwarding node: the terminal and its event id.
fn outbox_key(terminal_peer: &str, event_id: &str) -> String {
    format!("{terminal_peer}/{event_id}")
}

fn refused(code: &str, message: &str) -> CaptureResponse {
    CaptureResponse::Refused { code: code.to_owned(), message: message.to_owned() }
}
