//! The audit log detects tampering: every byte of an export flipped, one at a time, and
//! entries changed, removed, inserted, reordered or cut off inside a store.

use node::audit::{
    AUDIT, AUDIT_CHECKPOINTS, AuditEvent, AuditLog, Checkpoint, GENESIS, verify_anchors, verify_chain,
    verify_export, verify_store,
};
use node::store::Store;
use protocol::municipality::MunicipalityCode;
use protocol::statistics::AnchoredCheckpoint;
use redb::ReadableTable;
use ring::rand::SystemRandom;
use ring::signature::Ed25519KeyPair;
use time::OffsetDateTime;

struct Log {
    dir: std::path::PathBuf,
    store: std::sync::Arc<Store>,
    log: AuditLog,
    municipality: MunicipalityCode,
}

impl Drop for Log {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A log of `n` entries with a checkpoint every 4, the newest one checkpointed.
fn small_log(label: &str, n: u64) -> Log {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
    log_signed_by(label, n, pkcs8.as_ref(), |_, _| {})
}

/// Like [`small_log`], signed with a given key, each event passed through `edit` first.
fn log_signed_by(label: &str, n: u64, pkcs8: &[u8], edit: impl Fn(u64, &mut AuditEvent)) -> Log {
    let dir = std::env::temp_dir().join(format!("vrs-audit-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let store = Store::open(&dir.join("store.redb")).unwrap();
    let municipality = MunicipalityCode::parse("141003").unwrap();
    let log = AuditLog::new(Ed25519KeyPair::from_pkcs8(pkcs8).unwrap(), municipality, 4);
    let start = OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000);
    for i in 0..n {
        let txn = store.begin_write().unwrap();
        let mut event = AuditEvent {
            actor: format!("user:clerk{}", i % 3),
            role: "clerk".into(),
            action: if i % 2 == 0 { "resident.read" } else { "capture" }.into(),
            subject: format!("resident:141003-{i:020x}"),
            outcome: "ok".into(),
            request_id: format!("req-{i}"),
        };
        edit(i, &mut event);
        log.append(&txn, &event, start + time::Duration::seconds(i as i64)).unwrap();
        txn.commit().unwrap();
    }
    let txn = store.begin_write().unwrap();
    log.checkpoint(&txn, start + time::Duration::days(1)).unwrap();
    txn.commit().unwrap();
    Log { dir, store, log, municipality }
}

fn export(log: &Log) -> Vec<u8> {
    let now = OffsetDateTime::now_utc();
    log.log.export(log.store.read().unwrap().txn(), OffsetDateTime::UNIX_EPOCH, now, now).unwrap()
}

#[test]
fn an_intact_log_and_its_export_verify() {
    let log = small_log("intact", 10);
    let report =
        verify_store(log.store.read().unwrap().txn(), log.municipality, &log.log.public_key(), 4).unwrap();
    assert!(report.is_intact(), "{:?}", report.findings);
    assert_eq!((report.entries, report.sealed_through, report.unsealed), (10, 10, 0));
    assert_eq!(report.checkpoints, 3, "checkpoints at 4, 8 and the newest, 10");
    let file = export(&log);
    let report = verify_export(&file, &log.log.public_key());
    assert!(report.is_intact(), "{:?}", report.findings);
    assert_eq!(report.entries, 10);
    // Another node's key does not verify it.
    let other = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
    let other = Ed25519KeyPair::from_pkcs8(other.as_ref()).unwrap();
    let other_key = ring::signature::KeyPair::public_key(&other).as_ref().to_vec();
    assert!(!verify_export(&file, &other_key).is_intact());
}

#[test]
fn every_flipped_byte_of_an_export_is_detected() {
    let log = small_log("flip", 10);
    let file = export(&log);
    let key = log.log.public_key();
    assert!(verify_export(&file, &key).is_intact());
    let mut undetected = Vec::new();
    for position in 0..file.len() {
        for mask in [0x01u8, 0x80] {
            let mut tampered = file.clone();
            tampered[position] ^= mask;
            if verify_export(&tampered, &key).is_intact() {
                undetected.push((position, mask));
            }
        }
    }
    assert!(
        undetected.is_empty(),
        "{} of {} flips went unnoticed: {undetected:?}",
        undetected.len(),
        file.len() * 2
    );
}

#[test]
fn every_flipped_byte_of_an_entry_breaks_the_chain_without_the_seal() {
    // The chain and the checkpoints alone, as `audit verify` checks a store.
    let log = small_log("chain", 10);
    let view = log.store.read().unwrap();
    let entries: Vec<(u64, Vec<u8>)> = view
        .txn()
        .open_table(AUDIT)
        .unwrap()
        .iter()
        .unwrap()
        .map(|row| {
            let (k, v) = row.unwrap();
            (k.value(), v.value().to_vec())
        })
        .collect();
    let checkpoints: Vec<Vec<u8>> = view
        .txn()
        .open_table(AUDIT_CHECKPOINTS)
        .unwrap()
        .iter()
        .unwrap()
        .map(|row| row.unwrap().1.value().to_vec())
        .collect();
    let key = log.log.public_key();
    assert!(verify_chain(log.municipality, &key, 1, GENESIS, &entries, &checkpoints).is_intact());
    for i in 0..entries.len() {
        for position in 0..entries[i].1.len() {
            let mut tampered = entries.clone();
            tampered[i].1[position] ^= 0x01;
            let report = verify_chain(log.municipality, &key, 1, GENESIS, &tampered, &checkpoints);
            assert!(!report.is_intact(), "entry {} byte {position} flipped unnoticed", i + 1);
        }
    }
    for i in 0..checkpoints.len() {
        for position in 0..checkpoints[i].len() {
            let mut tampered = checkpoints.clone();
            tampered[i][position] ^= 0x01;
            let report = verify_chain(log.municipality, &key, 1, GENESIS, &entries, &tampered);
            assert!(!report.is_intact(), "checkpoint #{i} byte {position} flipped unnoticed");
        }
    }
}

fn tamper(log: &Log, change: impl FnOnce(&mut redb::Table<u64, &[u8]>)) -> Vec<String> {
    let txn = log.store.begin_write().unwrap();
    {
        let mut table = txn.open_table(AUDIT).unwrap();
        change(&mut table);
    }
    txn.commit().unwrap();
    let report =
        verify_store(log.store.read().unwrap().txn(), log.municipality, &log.log.public_key(), 4).unwrap();
    report.findings.iter().map(ToString::to_string).collect()
}

fn entry(table: &redb::Table<u64, &[u8]>, seq: u64) -> Vec<u8> {
    table.get(seq).unwrap().unwrap().value().to_vec()
}

#[test]
fn changed_removed_inserted_reordered_and_truncated_entries_are_detected() {
    let changed = small_log("changed", 12);
    let found = tamper(&changed, |t| {
        let text = String::from_utf8(entry(t, 5)).unwrap().replace("\"ok\"", "\"refused:x\"");
        t.insert(5, text.as_bytes()).unwrap();
    });
    assert!(found.iter().any(|f| f.starts_with("entry 6")), "{found:?}");

    let removed = small_log("removed", 12);
    let found = tamper(&removed, |t| {
        t.remove(7).unwrap();
    });
    assert!(found.iter().any(|f| f.starts_with("entry 8")), "{found:?}");

    let inserted = small_log("inserted", 12);
    let found = tamper(&inserted, |t| {
        // Shift 9.. up by one and put a forged entry at 9, with its seq and prev copied.
        for seq in (9..=12).rev() {
            let bytes = entry(t, seq);
            let moved = String::from_utf8(bytes).unwrap().replacen(
                &format!("\"seq\":{seq}"),
                &format!("\"seq\":{}", seq + 1),
                1,
            );
            t.insert(seq + 1, moved.as_bytes()).unwrap();
        }
        let forged = String::from_utf8(entry(t, 10))
            .unwrap()
            .replacen("\"seq\":10", "\"seq\":9", 1)
            .replace("resident:", "resident:9");
        t.insert(9, forged.as_bytes()).unwrap();
    });
    assert!(!found.is_empty(), "an inserted entry went unnoticed");

    let reordered = small_log("reordered", 12);
    let found = tamper(&reordered, |t| {
        let (a, b) = (entry(t, 3), entry(t, 4));
        t.insert(3, b.as_slice()).unwrap();
        t.insert(4, a.as_slice()).unwrap();
    });
    assert!(found.iter().any(|f| f.starts_with("entry 3")), "{found:?}");

    let truncated = small_log("truncated", 12);
    let found = tamper(&truncated, |t| {
        for seq in 9..=12 {
            t.remove(seq).unwrap();
        }
    });
    assert!(found.iter().any(|f| f.contains("checkpoint 12")), "{found:?}");
}

#[test]
fn removed_checkpoints_are_detected() {
    // Someone who rewrites the tail and recomputes the chain must also remove the
    // checkpoints that covered it; the gap gives them away.
    let log = small_log("gap", 12);
    let txn = log.store.begin_write().unwrap();
    {
        let mut checkpoints = txn.open_table(AUDIT_CHECKPOINTS).unwrap();
        checkpoints.remove(8).unwrap();
        checkpoints.remove(12).unwrap();
    }
    txn.commit().unwrap();
    let report =
        verify_store(log.store.read().unwrap().txn(), log.municipality, &log.log.public_key(), 4).unwrap();
    assert!(report.findings.iter().any(|f| f.at == "entries 5–12"), "{:?}", report.findings);
}

/// The checkpoints of a log, as the municipality deposits them at the national node.
fn deposited(log: &Log) -> Vec<AnchoredCheckpoint> {
    let view = log.store.read().unwrap();
    let table = view.txn().open_table(AUDIT_CHECKPOINTS).unwrap();
    table
        .iter()
        .unwrap()
        .map(|row| {
            let checkpoint: Checkpoint = serde_json::from_slice(row.unwrap().1.value()).unwrap();
            AnchoredCheckpoint {
                municipality: log.municipality,
                log_key: String::new(),
                seq: checkpoint.seq,
                hash: checkpoint.hash,
                at: checkpoint.at,
                signature: checkpoint.signature,
            }
        })
        .collect()
}

#[test]
fn a_log_rewritten_and_re_signed_with_the_municipalitys_own_key_differs_from_the_national_copy() {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
    let original = log_signed_by("anchored", 12, pkcs8.as_ref(), |_, _| {});
    let anchors = deposited(&original);
    assert_eq!(anchors.len(), 3, "checkpoints at 4, 8 and 12");
    let key = original.log.public_key();
    let check = |log: &Log| {
        let (findings, n, other) =
            verify_anchors(log.store.read().unwrap().txn(), log.municipality, &key, &anchors).unwrap();
        assert_eq!((n, other), (3, 0));
        findings.iter().map(ToString::to_string).collect::<Vec<_>>()
    };
    assert_eq!(check(&original), Vec::<String>::new(), "the original agrees with its deposit");

    // The municipality rewrites entry 6 (a read of a resident it wants hidden) and signs the
    // whole log again with its own key: the store alone cannot tell.
    let rewritten = log_signed_by("rewritten", 12, pkcs8.as_ref(), |i, event| {
        if i == 5 {
            event.subject = "resident:141003-someone-else".into();
        }
    });
    let local = verify_store(rewritten.store.read().unwrap().txn(), rewritten.municipality, &key, 4).unwrap();
    assert!(local.is_intact(), "re-signed, the rewritten log verifies on its own: {:?}", local.findings);
    // The copy at the national node does: entries 8 and 12 chain through entry 6.
    let findings = check(&rewritten);
    assert_eq!(findings.len(), 2, "{findings:?}");
    assert!(findings.iter().all(|f| f.contains("書き換え")), "{findings:?}");

    // A log cut short after its deposit misses what was deposited.
    let cut = log_signed_by("cut", 8, pkcs8.as_ref(), |_, _| {});
    let findings = check(&cut);
    assert_eq!(findings.len(), 1, "{findings:?}");
    assert!(findings[0].contains("anchor 12") && findings[0].contains("削除"), "{findings:?}");

    // A forged deposit (another key) is reported, not trusted.
    let other = small_log("forged", 12);
    let forged = deposited(&other);
    let (findings, ..) =
        verify_anchors(original.store.read().unwrap().txn(), original.municipality, &key, &forged).unwrap();
    assert_eq!(findings.len(), 3, "{findings:?}");
    // Checkpoints of another log (named by its key) are left aside, not reported.
    let of_other_log: Vec<AnchoredCheckpoint> = forged
        .into_iter()
        .map(|a| AnchoredCheckpoint { log_key: protocol::person::hex_lower(&other.log.public_key()), ..a })
        .collect();
    let (findings, n, other_logs) =
        verify_anchors(original.store.read().unwrap().txn(), original.municipality, &key, &of_other_log)
            .unwrap();
    assert_eq!((findings.len(), n, other_logs), (0, 0, 3));
}
