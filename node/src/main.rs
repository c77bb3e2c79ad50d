//! `vrs-node`: the command line of a municipality's node.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use node::config::{InitOptions, NodeFiles, Role, init_data_dir};
use node::import::{Encoding, ImportOutcome, import_file};
use node::store::Store;
use protocol::municipality::MunicipalityCode;
use time::Date;

// The node allocates and frees many small buffers per capture (documents, JSON, redb pages)
// on several threads; mimalloc does this markedly cheaper than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "vrs-node", version, about = "予防接種記録システム ノード / Vaccination Record System node")]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// ノードを作成 / Create a node: keys, node.toml, catalogue, data directory.
    Init {
        /// Role of the node.
        #[arg(long, value_enum, default_value = "municipal")]
        role: Role,
        /// Municipality code (JIS X 0402, 6 digits), e.g. 141003 for Yokohama.
        #[arg(long)]
        municipality: String,
        /// Data directory.
        #[arg(long, env = "VRS_DATA")]
        data: PathBuf,
        /// Address the API listens on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// First day vaccinations may be recorded for.
        #[arg(long, default_value = "2021-02-17")]
        campaign_start: String,
        /// The federation's person-key secret (64 hex digits); generated if absent.
        #[arg(long)]
        person_key_secret: Option<PathBuf>,
        /// Serve plain HTTP instead of HTTPS (only with a loopback --listen address).
        #[arg(long)]
        plain_http: bool,
        /// HTTPS certificate chain (PEM) to use instead of a self-signed one.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// Private key (PEM) of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Extra host name or address for the self-signed certificate (repeatable).
        #[arg(long)]
        tls_name: Vec<String>,
        /// libp2p listen address of the federation.
        #[arg(long)]
        p2p_listen: Option<String>,
        /// For --role standby: the primary's keys/ directory (coupon key and person-key secret).
        #[arg(long)]
        keys_from: Option<PathBuf>,
        /// For --role terminal: the enrolment token from `vrs-node terminal enrol-token`.
        #[arg(long)]
        enroll: Option<String>,
    },
    /// 会場端末 / Venue terminals: enrolment tokens, enrolled terminals.
    Terminal {
        #[command(subcommand)]
        command: TerminalCommands,
    },
    /// 転出入 / Relocation handoffs: move many residents out from a CSV (node stopped).
    Handoff {
        #[command(subcommand)]
        command: HandoffCommands,
    },
    /// 連携 / Federation: the national directory, joining it, approving members.
    Federation {
        #[command(subcommand)]
        command: FederationCommands,
    },
    /// 統計 / Statistics counters: check them against the documents, or rebuild them.
    Statistics {
        #[command(subcommand)]
        command: StatisticsCommands,
    },
    /// 予備系の昇格 / Make a standby the primary (node stopped); prints the directory request.
    Promote {
        /// Data directory.
        #[arg(long, env = "VRS_DATA")]
        data: PathBuf,
        /// Where to write the directory request for the national administrator.
        #[arg(long)]
        out: PathBuf,
    },
    /// 住民記録の取込 / Import a resident register extract (CSV, UTF-8 or Shift_JIS).
    Import {
        /// Data directory.
        #[arg(long, env = "VRS_DATA")]
        data: PathBuf,
        /// The CSV file.
        file: PathBuf,
        /// Encoding of the file.
        #[arg(long, value_enum, default_value = "auto")]
        encoding: Encoding,
        /// Also issue a dose-1 coupon to each new eligible resident (initial load).
        #[arg(long)]
        issue_coupons: bool,
    },
    /// 接種券 / Coupons: issue, export for printing.
    Coupons {
        #[command(subcommand)]
        command: CouponCommands,
    },
    /// ロット / Vaccine lots.
    Lots {
        #[command(subcommand)]
        command: LotCommands,
    },
    /// デーモン起動 / Run the node's API.
    Run {
        /// Data directory.
        #[arg(long, env = "VRS_DATA")]
        data: PathBuf,
        /// Override the listen address of node.toml.
        #[arg(long)]
        listen: Option<String>,
    },
    /// 全国規模の疎通試験 / Scale smoke test: a national node and every municipality's p2p
    /// identity in one process over the in-memory transport; each joins and reports.
    SmokeFederation {
        /// How many municipalities (all 1,741 by default).
        #[arg(long, default_value_t = 1741)]
        municipalities: usize,
        /// Working directory (a temporary one if absent).
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// デモ / Demo: a node for Yokohama with a generated population, then the API keeps running.
    Demo {
        /// Data directory (a new one under the temp directory if absent).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Residents to generate.
        #[arg(long, default_value_t = 2000)]
        residents: u64,
        /// Address the API listens on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Stop after the scripted scenario instead of serving.
        #[arg(long)]
        exit: bool,
    },
    /// テスト用住民データ生成 / Generate a synthetic resident register extract.
    Generate {
        /// Rows.
        #[arg(long)]
        residents: u64,
        /// Seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        /// Encoding of the output.
        #[arg(long, value_enum, default_value = "shift-jis")]
        encoding: Encoding,
    },
    /// 利用者 / Staff accounts (the daemon must be stopped; while it runs, use the API).
    User {
        #[command(subcommand)]
        command: UserCommands,
    },
    /// APIトークン / Machine credentials for terminals and integrations.
    Token {
        #[command(subcommand)]
        command: TokenCommands,
    },
    /// 監査ログ / Audit log: verify, export.
    Audit {
        #[command(subcommand)]
        command: AuditCommands,
    },
    /// 権限表 / Print the authorization table (route × role) as Markdown.
    AuthzTable,
    /// 件数 / Counts in a node's store.
    Status {
        /// Data directory.
        #[arg(long, env = "VRS_DATA")]
        data: PathBuf,
        /// Also add up the stored size of every document (reads them all).
        #[arg(long)]
        sizes: bool,
    },
}

#[derive(Subcommand)]
enum CouponCommands {
    /// 一括発行 / Issue a coupon to every eligible resident without a valid one.
    Issue {
        /// Data directory.
        #[arg(long, env = "VRS_DATA")]
        data: PathBuf,
        /// Only residents whose next dose is this one.
        #[arg(long)]
        dose: Option<u8>,
    },
    /// 印刷用出力 / Write the print-shop file (coupons.csv and QR images).
    Export {
        /// Data directory.
        #[arg(long, env = "VRS_DATA")]
        data: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Skip the PNG images.
        #[arg(long)]
        no_qr_images: bool,
    },
}

#[derive(Subcommand)]
enum StatisticsCommands {
    /// 照合 / Recount doses and population from the documents and compare with the counters.
    Verify {
        /// Data directory.
        #[arg(long, env = "VRS_DATA")]
        data: PathBuf,
    },
    /// 再集計 / Recount the counters from the documents (node stopped) and report them all again.
    Rebuild {
        /// Data directory.
        #[arg(long, env = "VRS_DATA")]
        data: PathBuf,
    },
    /// 表示 / Print the municipality's figures for a date (JSON), as it reports them.
    Show {
        /// Data directory.
        #[arg(long, env = "VRS_DATA")]
        data: PathBuf,
        /// Vaccination date (YYYY-MM-DD).
        #[arg(long)]
        date: String,
    },
}

#[derive(Subcommand)]
enum FederationCommands {
    /// 国ノード作成 / Create the national node: directory-signing key, libp2p identity, first directory.
    InitNational {
        /// Data directory of the national node.
        #[arg(long)]
        data: PathBuf,
        /// libp2p listen address.
        #[arg(long, default_value = "/ip4/0.0.0.0/tcp/7300")]
        p2p_listen: String,
        /// The address other nodes reach it at (defaults to --p2p-listen).
        #[arg(long)]
        advertise: Option<String>,
        /// The national API's listen address.
        #[arg(long, default_value = "127.0.0.1:8470")]
        http_listen: String,
        /// Serve the API over plain HTTP (loopback addresses only) instead of HTTPS.
        #[arg(long)]
        plain_http: bool,
    },
    /// 国APIトークン発行 / Create an API token for a national user (shown once).
    Token {
        /// Data directory of the national node.
        #[arg(long)]
        data: PathBuf,
        /// Token name, e.g. analyst-tanaka.
        #[arg(long)]
        name: String,
        /// national_admin, national_analyst or prefecture_user.
        #[arg(long)]
        role: node::auth::Role,
        /// The prefecture (1–47) of a prefecture user.
        #[arg(long)]
        prefecture: Option<u8>,
        /// Days until it stops working (none: until revoked).
        #[arg(long)]
        expires_days: Option<i64>,
    },
    /// 参加申請 / Ask to join: records the national node and writes the request for its administrator.
    Join {
        /// Data directory.
        #[arg(long, env = "VRS_DATA")]
        data: PathBuf,
        /// The national node's address, ending in /p2p/<peer id>.
        #[arg(long)]
        national: String,
        /// The national directory key (64 hex digits, or a file holding them).
        #[arg(long)]
        national_key: String,
        /// Where to write the request.
        #[arg(long)]
        out: PathBuf,
    },
    /// 参加承認 / Approve a join request: the national node signs a new directory version.
    Approve {
        /// Data directory of the national node.
        #[arg(long)]
        data: PathBuf,
        /// The request file.
        request: PathBuf,
    },
    /// 名簿表示 / Print the directory this node holds.
    Directory {
        /// Data directory.
        #[arg(long, env = "VRS_DATA")]
        data: PathBuf,
    },
}

#[derive(Subcommand)]
enum UserCommands {
    /// 追加 / Add a user. The password is read from stdin with --password-stdin, else generated and shown once.
    Add {
        /// Data directory.
        #[arg(long, env = "VRS_DATA")]
        data: PathBuf,
        /// Login name.
        username: String,
        /// Role.
        #[arg(long, value_enum)]
        role: node::auth::Role,
        /// Venue a venue operator records for (repeatable).
        #[arg(long)]
        venue: Vec<String>,
        /// Read the password from the first line of stdin.
        #[arg(long)]
        password_stdin: bool,
    },
    /// 停止 / Disable a user (their sessions stop at once).
    Disable {
        /// Data directory.
        #[arg(long, env = "VRS_DATA")]
        data: PathBuf,
        /// Login name.
        username: String,
    },
    /// 再開 / Re-enable a user.
    Enable {
        /// Data directory.
        #[arg(long, env = "VRS_DATA")]
        data: PathBuf,
        /// Login name.
        username: String,
    },
    /// パスワード再設定 / Reset a password (ends every session of the user).
    ResetPassword {
        /// Data directory.
        #[arg(long, env = "VRS_DATA")]
        data: PathBuf,
        /// Login name.
        username: String,
        /// Read the password from the first line of stdin.
        #[arg(long)]
        password_stdin: bool,
    },
    /// 一覧 / List users.
    List {
        /// Data directory.
        #[arg(long, env = "VRS_DATA")]
        data: PathBuf,
    },
}

#[derive(Subcommand)]
enum HandoffCommands {
    /// 転出者一覧の一括処理 / Seal a handoff for every row of a movers CSV (宛名番号, 転出先,
    /// 理由), with a per-row result file. The node must be stopped; the handoffs leave when it
    /// runs.
    MoveOutFile {
        /// Data directory.
        #[arg(long, env = "VRS_DATA")]
        data: PathBuf,
        /// The movers CSV (UTF-8 or Shift_JIS).
        file: PathBuf,
        /// Where to write one result row per mover (CSV).
        #[arg(long)]
        results: PathBuf,
    },
}

#[derive(Subcommand)]
enum TerminalCommands {
    /// 登録トークンの発行 / Issue a one-time enrolment token for a venue terminal (node stopped).
    EnrolToken {
        /// Data directory of the municipal node.
        #[arg(long, env = "VRS_DATA")]
        data: PathBuf,
        /// The venue the terminal will record for.
        #[arg(long)]
        venue: String,
        /// Hours the token stays usable.
        #[arg(long, default_value_t = 24)]
        valid_hours: u32,
    },
    /// 一覧 / List enrolled terminals.
    List {
        /// Data directory.
        #[arg(long, env = "VRS_DATA")]
        data: PathBuf,
    },
    /// 取消 / Revoke a terminal: the node disconnects and refuses it.
    Revoke {
        /// Data directory.
        #[arg(long, env = "VRS_DATA")]
        data: PathBuf,
        /// The terminal's peer id.
        peer_id: String,
    },
}

#[derive(Subcommand)]
enum TokenCommands {
    /// 発行 / Issue a token (shown once).
    Add {
        /// Data directory.
        #[arg(long, env = "VRS_DATA")]
        data: PathBuf,
        /// Token name, e.g. tablet-03.
        name: String,
        /// Role.
        #[arg(long, value_enum)]
        role: node::auth::Role,
        /// Venue (repeatable; venue operators).
        #[arg(long)]
        venue: Vec<String>,
        /// Days until it expires (never, if absent).
        #[arg(long)]
        expires_days: Option<u32>,
    },
    /// 失効 / Revoke a token.
    Revoke {
        /// Data directory.
        #[arg(long, env = "VRS_DATA")]
        data: PathBuf,
        /// Token name.
        name: String,
    },
    /// 一覧 / List tokens.
    List {
        /// Data directory.
        #[arg(long, env = "VRS_DATA")]
        data: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuditCommands {
    /// 検証 / Verify the log in a store (--data) or an exported file (--file with --public-key).
    Verify {
        /// Data directory (the daemon must be stopped); ignored when --file is given.
        #[arg(long, env = "VRS_DATA")]
        data: Option<PathBuf>,
        /// An export made by `audit export`.
        #[arg(long, requires = "public_key")]
        file: Option<PathBuf>,
        /// The node's audit public key: 64 hex digits, or a file holding them (keys/audit-signing.pub).
        #[arg(long)]
        public_key: Option<String>,
        /// The checkpoints deposited at the national node (the JSON of
        /// GET /api/v1/national/anchors/{municipality}), checked against the store's log.
        #[arg(long, conflicts_with = "file")]
        anchors: Option<PathBuf>,
    },
    /// 出力 / Export the entries between two days (JST, inclusive) or RFC 3339 instants, sealed.
    Export {
        /// Data directory (the daemon must be stopped; while it runs, use GET /api/v1/audit/export).
        #[arg(long, env = "VRS_DATA")]
        data: PathBuf,
        /// First day (YYYY-MM-DD).
        #[arg(long)]
        from: String,
        /// Last day (YYYY-MM-DD).
        #[arg(long)]
        to: String,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum LotCommands {
    /// ロット登録 / Register a lot.
    Add {
        /// Data directory.
        #[arg(long, env = "VRS_DATA")]
        data: PathBuf,
        /// Lot number.
        #[arg(long)]
        lot: String,
        /// GTIN-14 of the product.
        #[arg(long)]
        gtin: String,
        /// Expiry date (YYYY-MM-DD).
        #[arg(long)]
        expiry: String,
    },
    /// ロット一覧 / List lots.
    List {
        /// Data directory.
        #[arg(long, env = "VRS_DATA")]
        data: PathBuf,
    },
}

fn smoke_federation(municipalities: usize, data: Option<PathBuf>) -> anyhow::Result<()> {
    let scratch = std::env::temp_dir().join(format!("vrs-smoke-{}", std::process::id()));
    let dir = data.clone().unwrap_or_else(|| scratch.clone());
    let runtime = tokio::runtime::Runtime::new()?;
    let date = node::clock::japan_today();
    let report = runtime.block_on(node::smoke::run(&dir, municipalities, date));
    if data.is_none() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    let report = report?;
    println!(
        "承認 / approved: {} municipalities in {:.1} s; directory of {} entries",
        report.municipalities, report.approve_seconds, report.directory_entries
    );
    println!(
        "参加・報告 / joined and reported: {} of {} in {:.1} s (median {} ms, slowest {} ms from dial to stored report; {} requests made again)",
        report.reported,
        report.municipalities,
        report.exchange_seconds,
        report.median_ms,
        report.max_ms,
        report.retried
    );
    println!(
        "国の集計 / national total for {date}: {} doses; sent {}",
        report.national_total, report.doses_sent
    );
    anyhow::ensure!(
        report.reported == report.municipalities && report.national_total == report.doses_sent,
        "the national node does not hold what every municipality sent"
    );
    println!("ok");
    Ok(())
}

fn main() -> std::process::ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VRS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,libp2p_swarm=warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("エラー / error: {error:#}");
            std::process::ExitCode::from(1)
        }
    }
}

fn parse_date(text: &str) -> anyhow::Result<Date> {
    Date::parse(text, &time::format_description::well_known::Iso8601::DATE)
        .with_context(|| format!("{text:?} is not a date (YYYY-MM-DD)"))
}

fn open(data: &std::path::Path) -> anyhow::Result<(NodeFiles, Arc<Store>)> {
    let files = NodeFiles::load(data)?;
    let store = Store::open(&files.store_path())?;
    Ok((files, store))
}

/// For jobs that touch every document: a larger page cache.
fn open_bulk(data: &std::path::Path) -> anyhow::Result<(NodeFiles, Arc<Store>)> {
    let files = NodeFiles::load(data)?;
    let store = Store::open_with_cache(&files.store_path(), node::store::BULK_CACHE_BYTES)?;
    Ok((files, store))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Commands::Init {
            role,
            municipality,
            data,
            listen,
            campaign_start,
            person_key_secret,
            plain_http,
            tls_cert,
            tls_key,
            tls_name,
            p2p_listen,
            keys_from,
            enroll,
        } => {
            let municipality = MunicipalityCode::parse(&municipality)
                .map_err(|e| anyhow::anyhow!("--municipality {municipality}: {e}"))?;
            if enroll.is_some() != (role == Role::Terminal) {
                anyhow::bail!("--enroll goes with --role terminal, and a terminal needs --enroll TOKEN");
            }
            node::config::refuse_existing_node(&data)?;
            let options = InitOptions {
                role,
                municipality,
                listen,
                campaign_start: parse_date(&campaign_start)?,
                person_key_secret,
                plain_http,
                tls: tls_cert.zip(tls_key),
                tls_names: tls_name,
                p2p_listen,
                keys_from,
                terminal: None,
            };
            let token = match &enroll {
                // A terminal enrols first: nothing is written unless the node accepts it.
                Some(text) => {
                    let (token, config, peer) = node::terminal::init_enrolled(&data, options, text)?;
                    println!(
                        "端末を登録しました / terminal enrolled: 会場 venue {} — peer {peer} — ノード node {}",
                        config.venue, config.node
                    );
                    token
                }
                None => init_data_dir(&data, &options)?,
            };
            let name = protocol::municipality::lookup_municipality(municipality)
                .map(|m| format!("{}{}", m.prefecture, m.name))
                .unwrap_or_default();
            println!("ノードを作成しました / node created: {} {} in {}", municipality, name, data.display());
            if !plain_http {
                println!("HTTPS 証明書 / certificate: {}", data.join("keys/tls-cert.pem").display());
            }
            println!("監査公開鍵 / audit public key: {}", data.join("keys/audit-signing.pub").display());
            println!("管理者トークン（一度だけ表示）/ admin token (shown once):\n{token}");
            Ok(())
        }
        Commands::Import { data, file, encoding, issue_coupons } => {
            node::import::check_input(&file)?;
            let (files, store) = open_bulk(&data)?;
            let issue = issue_coupons.then(|| node::import::IssueOnImport {
                today: node::clock::japan_today(),
                min_age: files.catalogue.min_eligible_age(),
            });
            let subject =
                format!("file:{}", file.file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
            files.audit_cli(&store, "residents.import", &subject, "started")?;
            match import_file(&files, &store, &file, encoding, issue)? {
                ImportOutcome::Applied(report) => {
                    let outcome = format!(
                        "ok:rows={},created={},updated={},reregistered={},coupons={},asked={}",
                        report.rows,
                        report.created,
                        report.updated,
                        report.reregistered,
                        report.coupons_issued,
                        report.asked
                    );
                    files.audit_cli(&store, "residents.import", &subject, &outcome)?;
                    println!(
                        "取込完了 / import done: {} rows — 新規 created {}, 更新 updated {}, 変更なし unchanged {}",
                        report.rows, report.created, report.updated, report.unchanged
                    );
                    if report.reregistered > 0 {
                        println!(
                            "仮の宛名番号を住民票の宛名番号に置き換えました / provisional atena numbers replaced: {}",
                            report.reregistered
                        );
                    }
                    if issue_coupons {
                        println!("接種券発行 / coupons issued: {}", report.coupons_issued);
                    }
                    if report.asked > 0 {
                        println!(
                            "転入者の接種歴を前住所地に求めます（ノード起動後に送信）/ histories asked from previous municipalities (sent once the node runs): {}",
                            report.asked
                        );
                    }
                    Ok(())
                }
                ImportOutcome::Refused(errors) => {
                    files.audit_cli(
                        &store,
                        "residents.import",
                        &subject,
                        &format!("refused:bad_rows={}", errors.len()),
                    )?;
                    for error in errors.iter().take(200) {
                        eprintln!("{error}");
                    }
                    if errors.len() > 200 {
                        eprintln!("… ほか {} 件 / and {} more", errors.len() - 200, errors.len() - 200);
                    }
                    let rows = errors
                        .iter()
                        .map(|error| error.line)
                        .collect::<std::collections::BTreeSet<_>>()
                        .len();
                    anyhow::bail!(
                        "{rows} 行に誤りがあるため何も取り込んでいません / {}: nothing was imported",
                        bad_rows(rows)
                    )
                }
            }
        }
        Commands::Coupons { command: CouponCommands::Issue { data, dose } } => {
            let (files, store) = open_bulk(&data)?;
            files.audit_cli(&store, "coupons.issue", "residents:all", "started")?;
            let report = node::issuance::issue_all(&files, &store, node::clock::japan_today(), dose)?;
            files.audit_cli(
                &store,
                "coupons.issue",
                "residents:all",
                &format!("ok:issued={}", report.issued),
            )?;
            println!(
                "接種券発行 / coupons issued: {} (対象 residents {}, 有効券あり already held {}, 対象外 not eligible {})",
                report.issued, report.residents, report.already_held, report.not_eligible
            );
            Ok(())
        }
        Commands::Coupons { command: CouponCommands::Export { data, out, no_qr_images } } => {
            let (files, store) = open_bulk(&data)?;
            let report = node::issuance::export_print_shop(&files, &store, &out, !no_qr_images)?;
            files.audit_cli(
                &store,
                "coupons.export",
                "residents:all",
                &format!("ok:coupons={}", report.coupons),
            )?;
            println!(
                "印刷用ファイル / print-shop file: {} ({} coupons, {} QR images)",
                out.join("coupons.csv").display(),
                report.coupons,
                report.qr_images
            );
            Ok(())
        }
        Commands::Lots { command: LotCommands::Add { data, lot, gtin, expiry } } => {
            let (files, store) = open(&data)?;
            let lot = node::api::validate_lot(&files.catalogue, &lot, &gtin, &expiry)
                .map_err(|p| anyhow::anyhow!("{}", p.message_ja))?;
            store.put_lots(std::slice::from_ref(&lot))?;
            files.audit_cli(&store, "lot.put", &format!("lot:{}", lot.lot), "ok")?;
            println!(
                "ロットを登録しました / lot registered: {} ({}, expiry {})",
                lot.lot, lot.gtin, lot.expiry
            );
            Ok(())
        }
        Commands::Lots { command: LotCommands::List { data } } => {
            let (_, store) = open(&data)?;
            for lot in store.read()?.lots()? {
                println!("{}\t{}\t{}", lot.lot, lot.gtin, lot.expiry);
            }
            Ok(())
        }
        Commands::Run { data, listen } => {
            if data.join(node::federation::NATIONAL_CONFIG).exists() {
                let runtime = tokio::runtime::Runtime::new()?;
                return runtime.block_on(node::federation::run_national(&data));
            }
            let files = NodeFiles::load(&data)?;
            let cache_bytes = files.config.storage.page_cache_mib.saturating_mul(1024 * 1024);
            let store = Store::open_with_cache(&files.store_path(), cache_bytes)?;
            let listen = listen.unwrap_or_else(|| files.config.http.listen.clone());
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(node::daemon::serve(files, store, &listen, None))
        }
        Commands::SmokeFederation { municipalities, data } => smoke_federation(municipalities, data),
        Commands::Demo { data, residents, listen, exit } => {
            node::demo::run_demo(data, residents, &listen, exit)
        }
        Commands::Generate { residents, seed, out, encoding } => {
            let n = node::demo::write_population(&out, residents, seed, encoding)?;
            println!("{n} 行を書き出しました / wrote {n} rows to {}", out.display());
            Ok(())
        }
        Commands::Federation { command } => run_federation(command),
        Commands::Handoff { command: HandoffCommands::MoveOutFile { data, file, results } } => {
            let (files, store) = open_bulk(&data)?;
            match node::movers::move_out_file(files, store, &file, &results)? {
                node::movers::MoversOutcome::Rejected(errors) => {
                    for error in &errors {
                        eprintln!("{error}");
                    }
                    let rows = errors
                        .iter()
                        .map(|error| error.line)
                        .collect::<std::collections::BTreeSet<_>>()
                        .len();
                    anyhow::bail!(
                        "{rows} 行に誤りがあるため、何も処理していません / {}: nothing was done",
                        bad_rows(rows)
                    )
                }
                node::movers::MoversOutcome::Done(report) => {
                    println!(
                        "転出の引き継ぎ / handoffs sealed: {} of {} rows (refused {}); results in {}",
                        report.sealed,
                        report.rows,
                        report.refused,
                        results.display()
                    );
                    println!("ノードを起動すると全国ノードへ送られます / they leave when the node runs");
                    Ok(())
                }
            }
        }
        Commands::Statistics { command } => run_statistics(command),
        Commands::Promote { data, out } => {
            let request = node::federation::promote(&data)?;
            std::fs::write(&out, serde_json::to_vec_pretty(&request)?)?;
            println!(
                "昇格しました（役割 municipal）/ promoted to primary. 国の管理者に {} を送り承認を受けてください / send {} to the national administrator for approval",
                out.display(),
                out.display()
            );
            Ok(())
        }
        Commands::User { command } => run_user(command),
        Commands::Token { command } => run_token(command),
        Commands::Terminal { command } => run_terminal(command),
        Commands::Audit { command } => run_audit(command),
        Commands::AuthzTable => {
            print!("{}", node::api::authorization_table_markdown());
            Ok(())
        }
        Commands::Status { data, sizes } => {
            let (_, store) = open(&data)?;
            let view = store.read()?;
            println!(
                "住民 residents {} / 接種券 coupons {} / 接種記録 dose events {} / 変更番号 change seq {}",
                view.n_residents()?,
                view.n_coupons()?,
                view.n_dose_events()?,
                view.meta(node::store::META_CHANGE_SEQ)?
            );
            if sizes {
                println!("文書容量 document bytes {}", view.document_bytes()?);
            }
            Ok(())
        }
    }
}

fn read_password(from_stdin: bool) -> anyhow::Result<(String, bool)> {
    if from_stdin {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        let password = line.trim_end_matches(['\r', '\n']).to_owned();
        return Ok((password, false));
    }
    let bytes = node::config::random_bytes(&ring::rand::SystemRandom::new(), 12)?;
    // 16 characters from an unambiguous alphabet (no 0/O, 1/l/I).
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut password = String::new();
    for chunk in bytes.chunks(3) {
        let n = u32::from(chunk[0]) << 16 | u32::from(chunk[1]) << 8 | u32::from(chunk[2]);
        for i in 0..4 {
            password.push(char::from(ALPHABET[((n >> (6 * i)) & 63) as usize % ALPHABET.len()]));
        }
    }
    Ok((password, true))
}

/// Runs `op` in one durable transaction with its audit entry.
fn cli_write<T>(
    files: &NodeFiles,
    store: &Store,
    action: &str,
    subject: &str,
    op: impl FnOnce(&redb::WriteTransaction, time::OffsetDateTime) -> node::auth::Step<T>,
) -> anyhow::Result<T> {
    let audit = files.audit_log()?;
    let now = time::OffsetDateTime::now_utc();
    let txn = store.begin_write()?;
    let result = op(&txn, now)?;
    let outcome = match &result {
        Ok(_) => "ok".to_owned(),
        Err(problem) => format!("refused:{}", problem.code),
    };
    audit.append(&txn, &node::config::cli_event(action, subject, &outcome), now)?;
    audit.checkpoint(&txn, now)?;
    txn.commit()?;
    result.map_err(|p| anyhow::anyhow!("{} / {}", p.message_ja, p.message_en))
}

fn run_user(command: UserCommands) -> anyhow::Result<()> {
    use node::auth;
    match command {
        UserCommands::Add { data, username, role, venue, password_stdin } => {
            let (files, store) = open(&data)?;
            let (password, generated) = read_password(password_stdin)?;
            auth::check_password(&password)
                .map_err(|p| anyhow::anyhow!("{} / {}", p.message_ja, p.message_en))?;
            let password_hash = auth::hash_password(&password)?;
            let municipality = files.config.municipality;
            let new = auth::NewUser { username: username.clone(), role, venues: venue, password_hash };
            let user = cli_write(&files, &store, "user.add", &format!("user:{username}"), |txn, now| {
                auth::add_user(txn, municipality, new, now)
            })?;
            println!(
                "利用者を追加しました / user added: {} ({} / {})",
                user.username,
                user.role.label_ja(),
                user.role.as_str()
            );
            if generated {
                println!("初期パスワード（一度だけ表示）/ initial password (shown once): {password}");
            }
            Ok(())
        }
        UserCommands::Disable { data, username } => set_disabled(&data, &username, true),
        UserCommands::Enable { data, username } => set_disabled(&data, &username, false),
        UserCommands::ResetPassword { data, username, password_stdin } => {
            let (files, store) = open(&data)?;
            let (password, generated) = read_password(password_stdin)?;
            auth::check_password(&password)
                .map_err(|p| anyhow::anyhow!("{} / {}", p.message_ja, p.message_en))?;
            let hash = auth::hash_password(&password)?;
            cli_write(&files, &store, "user.reset_password", &format!("user:{username}"), |txn, now| {
                auth::set_password(txn, &username, hash, now)
            })?;
            println!(
                "パスワードを再設定しました（全セッション終了）/ password reset, sessions ended: {username}"
            );
            if generated {
                println!("新しいパスワード（一度だけ表示）/ new password (shown once): {password}");
            }
            Ok(())
        }
        UserCommands::List { data } => {
            let (_, store) = open(&data)?;
            for user in auth::list_users(store.read()?.txn())? {
                let state = if user.disabled { "停止 disabled" } else { "有効 active" };
                println!("{}\t{}\t{}\t{}", user.username, user.role.as_str(), user.venues.join(","), state);
            }
            Ok(())
        }
    }
}

fn set_disabled(data: &std::path::Path, username: &str, disabled: bool) -> anyhow::Result<()> {
    let (files, store) = open(data)?;
    let action = if disabled { "user.disable" } else { "user.enable" };
    cli_write(&files, &store, action, &format!("user:{username}"), |txn, _| {
        node::auth::set_disabled(txn, username, disabled)
    })?;
    if disabled {
        println!("利用者を停止しました / user disabled: {username}");
    } else {
        println!("利用者を再開しました / user enabled: {username}");
    }
    Ok(())
}

fn run_terminal(command: TerminalCommands) -> anyhow::Result<()> {
    use node::terminals;
    match command {
        TerminalCommands::EnrolToken { data, venue, valid_hours } => {
            let (files, store) = open(&data)?;
            let address = terminals::p2p_address(&files)?;
            let (token, enrolment) =
                cli_write(&files, &store, "terminal.enrol_token", &format!("venue:{venue}"), |txn, now| {
                    if let Err(problem) = node::api::check_id_field("venue", &venue) {
                        return Ok(Err(problem));
                    }
                    Ok(Ok(terminals::add_enrolment(txn, &venue, valid_hours, "cli", &address, now)?))
                })?;
            let until = enrolment
                .expires_at
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            println!(
                "登録トークン（一度だけ表示、{until} まで有効）/ enrolment token (shown once, valid until {until}):"
            );
            println!("{}", token.to_text());
            Ok(())
        }
        TerminalCommands::List { data } => {
            let (_, store) = open(&data)?;
            for (peer, record) in store.read()?.all::<terminals::TerminalRecord>(node::store::TERMINALS)? {
                let state = if record.revoked { "取消 revoked" } else { "有効 active" };
                println!("{peer}\t{}\t{}\t{state}", record.certificate.venue, record.certificate.issued_at);
            }
            Ok(())
        }
        TerminalCommands::Revoke { data, peer_id } => {
            let (files, store) = open(&data)?;
            cli_write(&files, &store, "terminal.revoke", &format!("terminal:{peer_id}"), |txn, _| {
                terminals::revoke(txn, &peer_id)
            })?;
            println!("端末を取り消しました / terminal revoked: {peer_id}");
            Ok(())
        }
    }
}

fn run_token(command: TokenCommands) -> anyhow::Result<()> {
    use node::auth;
    match command {
        TokenCommands::Add { data, name, role, venue, expires_days } => {
            let (files, store) = open(&data)?;
            let municipality = files.config.municipality;
            let (token, record) =
                cli_write(&files, &store, "token.add", &format!("token:{name}"), |txn, now| {
                    let expires = expires_days.map(|days| now + time::Duration::days(i64::from(days)));
                    auth::add_token(txn, municipality, &name, role, venue, expires, now)
                })?;
            println!("トークンを発行しました / token issued: {} ({})", record.name, record.role.as_str());
            println!("トークン（一度だけ表示）/ token (shown once):\n{token}");
            Ok(())
        }
        TokenCommands::Revoke { data, name } => {
            let (files, store) = open(&data)?;
            cli_write(&files, &store, "token.revoke", &format!("token:{name}"), |txn, _| {
                auth::revoke_token(txn, &name)
            })?;
            println!("トークンを失効させました / token revoked: {name}");
            Ok(())
        }
        TokenCommands::List { data } => {
            let (_, store) = open(&data)?;
            for token in auth::list_tokens(store.read()?.txn())? {
                let state = if token.revoked { "失効 revoked" } else { "有効 active" };
                let expires = token.expires_at.map(|t| t.date().to_string()).unwrap_or_else(|| "-".into());
                println!(
                    "{}\t{}\t{}\t{}\t{}",
                    token.name,
                    token.role.as_str(),
                    token.venues.join(","),
                    expires,
                    state
                );
            }
            Ok(())
        }
    }
}

fn public_key_arg(text: &str) -> anyhow::Result<Vec<u8>> {
    let hex = if text.len() == 64 && text.chars().all(|c| c.is_ascii_hexdigit()) {
        text.to_owned()
    } else {
        std::fs::read_to_string(text)
            .with_context(|| format!("cannot read public key file {text}"))?
            .trim()
            .to_owned()
    };
    anyhow::ensure!(hex.len() == 64, "--public-key: 64 hex digits expected (an Ed25519 public key)");
    protocol::person::hex_decode(&hex).context("--public-key: not hex")
}

fn print_report(report: &node::audit::VerifyReport) -> anyhow::Result<()> {
    for finding in &report.findings {
        eprintln!("{finding}");
    }
    println!(
        "記録 entries {} / チェックポイント checkpoints {} / 署名済み signed through {} / 未署名 unsigned {}",
        report.entries, report.checkpoints, report.sealed_through, report.unsealed
    );
    if report.is_intact() {
        println!("監査ログは改ざんされていません / audit log intact");
        Ok(())
    } else {
        anyhow::bail!(
            "監査ログに {} 件の不整合があります / {} problems found in the audit log",
            report.findings.len(),
            report.findings.len()
        )
    }
}

fn run_audit(command: AuditCommands) -> anyhow::Result<()> {
    match command {
        AuditCommands::Verify { data, file, public_key, anchors } => {
            if let Some(file) = file {
                let key = public_key_arg(public_key.as_deref().unwrap_or_default())?;
                let bytes =
                    std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
                return print_report(&node::audit::verify_export(&bytes, &key));
            }
            let Some(data) = data else { anyhow::bail!("give --data DIR or --file FILE --public-key KEY") };
            let (files, store) = open(&data)?;
            let key = match public_key {
                Some(text) => public_key_arg(&text)?,
                None => files.audit_public_key(),
            };
            let mut report = node::audit::verify_store(
                store.read()?.txn(),
                files.config.municipality,
                &key,
                files.config.auth.audit_checkpoint_every,
            )?;
            if let Some(path) = anchors {
                #[derive(serde::Deserialize)]
                struct Deposited {
                    checkpoints: Vec<protocol::statistics::AnchoredCheckpoint>,
                }
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                let deposited: Deposited = serde_json::from_str(&text).with_context(|| {
                    format!("{} is not the national node's list of checkpoints", path.display())
                })?;
                let (findings, n, other) = node::audit::verify_anchors(
                    store.read()?.txn(),
                    files.config.municipality,
                    &key,
                    &deposited.checkpoints,
                )?;
                println!("国に預けたチェックポイント / checkpoints deposited at the national node: {n}");
                if other > 0 {
                    println!(
                        "（他のログ（切替前の本番系など）のもの {other} 件は対象外 / {other} of another log, e.g. the primary before a failover, left aside）"
                    );
                }
                report.findings.extend(findings);
            }
            print_report(&report)
        }
        AuditCommands::Export { data, from, to, out } => {
            let (files, store) = open(&data)?;
            let from_at = node::api::parse_instant("from", &from, false)
                .map_err(|p| anyhow::anyhow!("{}", p.message_en))?;
            let to_at =
                node::api::parse_instant("to", &to, true).map_err(|p| anyhow::anyhow!("{}", p.message_en))?;
            files.audit_cli(&store, "audit.export", &format!("audit:{from}..{to}"), "ok")?;
            let bytes = files.audit_log()?.export(
                store.read()?.txn(),
                from_at,
                to_at,
                time::OffsetDateTime::now_utc(),
            )?;
            std::fs::write(&out, &bytes).with_context(|| format!("cannot write {}", out.display()))?;
            let n = bytes.iter().filter(|b| **b == b'\n').count().saturating_sub(3);
            println!("監査ログを出力しました / audit export written: {} ({n} entries)", out.display());
            Ok(())
        }
    }
}

fn run_statistics(command: StatisticsCommands) -> anyhow::Result<()> {
    match command {
        StatisticsCommands::Verify { data } => {
            let (_, store) = open(&data)?;
            let differences = node::statistics::verify(&store)?;
            for (key, stored, expected) in &differences {
                println!("{key}\tstored {stored}\texpected {expected}");
            }
            if differences.is_empty() {
                println!("統計は記録と一致しています / the counters agree with the documents");
                Ok(())
            } else {
                anyhow::bail!(
                    "{} 件の集計が記録と一致しません / {} counters disagree with the documents",
                    differences.len(),
                    differences.len()
                )
            }
        }
        StatisticsCommands::Rebuild { data } => {
            let (files, store) = open(&data)?;
            let n = node::statistics::rebuild(&store)?;
            files.audit_cli(&store, "statistics.rebuild", &format!("counters:{n}"), "ok")?;
            println!("{n} 件を再集計しました / recounted {n} counters; every date will be reported again");
            Ok(())
        }
        StatisticsCommands::Show { data, date } => {
            let (files, store) = open(&data)?;
            let date = time::Date::parse(&date, &time::format_description::well_known::Iso8601::DATE)
                .with_context(|| format!("--date {date} is not a date (YYYY-MM-DD)"))?;
            let view = store.read()?;
            let doc = node::statistics::daily(view.txn(), files.config.municipality, date, 0, String::new())?;
            println!("{}", serde_json::to_string_pretty(&doc)?);
            Ok(())
        }
    }
}

fn run_federation(command: FederationCommands) -> anyhow::Result<()> {
    use node::federation;
    match command {
        FederationCommands::InitNational { data, p2p_listen, advertise, http_listen, plain_http } => {
            let init = federation::NationalInit {
                p2p_listen: &p2p_listen,
                advertise: advertise.as_deref(),
                http_listen: &http_listen,
                plain_http,
            };
            let (peer, key) = federation::init_national(&data, &init)?;
            println!("国ノードを作成しました / national node created in {}", data.display());
            println!("peer id: {peer}");
            println!("名簿署名公開鍵 / directory key: {key}");
            Ok(())
        }
        FederationCommands::Token { data, name, role, prefecture, expires_days } => {
            let token = federation::add_national_token(&data, &name, role, prefecture, expires_days)?;
            println!("トークン（一度だけ表示） / token (shown once): {token}");
            Ok(())
        }
        FederationCommands::Join { data, national, national_key, out } => {
            let key = public_key_arg(&national_key)?;
            let request = federation::join(&data, &national, &key)?;
            std::fs::write(&out, serde_json::to_vec_pretty(&request)?)?;
            println!(
                "参加申請を書き出しました / join request written: {} (peer {}, {:?})",
                out.display(),
                request.entry.peer_id,
                request.entry.role
            );
            Ok(())
        }
        FederationCommands::Approve { data, request } => {
            let text = std::fs::read_to_string(&request)
                .with_context(|| format!("cannot read {}", request.display()))?;
            let request: protocol::directory::JoinRequest = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a join request", request.display()))?;
            let version = federation::approve(&data, request.clone())?;
            println!(
                "承認しました / approved: {} {:?} {} — 名簿 directory version {version}",
                request.entry.municipality.map(|m| m.to_string()).unwrap_or_default(),
                request.entry.role,
                request.entry.peer_id
            );
            Ok(())
        }
        FederationCommands::Directory { data } => {
            let text = std::fs::read_to_string(data.join("directory.json"))
                .with_context(|| format!("{} holds no directory yet", data.display()))?;
            println!("{text}");
            Ok(())
        }
    }
}

/// "1 bad row", "2 bad rows".
fn bad_rows(rows: usize) -> String {
    match rows {
        1 => "1 bad row".to_owned(),
        n => format!("{n} bad rows"),
    }
}
