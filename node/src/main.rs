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
    /// 件数 / Counts in a node's store.
    Status {
        /// Data directory.
        #[arg(long, env = "VRS_DATA")]
        data: PathBuf,
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

fn main() -> std::process::ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VRS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
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
        Commands::Init { role, municipality, data, listen, campaign_start, person_key_secret } => {
            let municipality = MunicipalityCode::parse(&municipality)
                .map_err(|e| anyhow::anyhow!("--municipality {municipality}: {e}"))?;
            let options = InitOptions {
                role,
                municipality,
                listen,
                campaign_start: parse_date(&campaign_start)?,
                person_key_secret,
            };
            let token = init_data_dir(&data, &options)?;
            let name = protocol::municipality::lookup_municipality(municipality)
                .map(|m| format!("{}{}", m.prefecture, m.name))
                .unwrap_or_default();
            println!("ノードを作成しました / node created: {} {} in {}", municipality, name, data.display());
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
            match import_file(&files, &store, &file, encoding, issue)? {
                ImportOutcome::Applied(report) => {
                    println!(
                        "取込完了 / import done: {} rows — 新規 created {}, 更新 updated {}, 変更なし unchanged {}",
                        report.rows, report.created, report.updated, report.unchanged
                    );
                    if issue_coupons {
                        println!("接種券発行 / coupons issued: {}", report.coupons_issued);
                    }
                    Ok(())
                }
                ImportOutcome::Refused(errors) => {
                    for error in errors.iter().take(200) {
                        eprintln!("{error}");
                    }
                    if errors.len() > 200 {
                        eprintln!("… ほか {} 件 / and {} more", errors.len() - 200, errors.len() - 200);
                    }
                    anyhow::bail!(
                        "{} 件の誤りがあるため何も取り込んでいません / {} bad rows: nothing was imported",
                        errors.len(),
                        errors.len()
                    )
                }
            }
        }
        Commands::Coupons { command: CouponCommands::Issue { data, dose } } => {
            let (files, store) = open_bulk(&data)?;
            let report = node::issuance::issue_all(&files, &store, node::clock::japan_today(), dose)?;
            println!(
                "接種券発行 / coupons issued: {} (対象 residents {}, 有効券あり already held {}, 対象外 not eligible {})",
                report.issued, report.residents, report.already_held, report.not_eligible
            );
            Ok(())
        }
        Commands::Coupons { command: CouponCommands::Export { data, out, no_qr_images } } => {
            let (files, store) = open_bulk(&data)?;
            let report = node::issuance::export_print_shop(&files, &store, &out, !no_qr_images)?;
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
            let files = NodeFiles::load(&data)?;
            let cache_bytes = files.config.storage.page_cache_mib.saturating_mul(1024 * 1024);
            let store = Store::open_with_cache(&files.store_path(), cache_bytes)?;
            let listen = listen.unwrap_or_else(|| files.config.http.listen.clone());
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(node::daemon::serve(files, store, &listen, None))
        }
        Commands::Demo { data, residents, listen, exit } => {
            node::demo::run_demo(data, residents, &listen, exit)
        }
        Commands::Generate { residents, seed, out, encoding } => {
            let n = node::demo::write_population(&out, residents, seed, encoding)?;
            println!("{n} 行を書き出しました / wrote {n} rows to {}", out.display());
            Ok(())
        }
        Commands::Status { data } => {
            let (_, store) = open(&data)?;
            let view = store.read()?;
            println!(
                "住民 residents {} / 接種券 coupons {} / 接種記録 dose events {} / 変更番号 change seq {}",
                view.n_residents()?,
                view.n_coupons()?,
                view.n_dose_events()?,
                view.meta(node::store::META_CHANGE_SEQ)?
            );
            Ok(())
        }
    }
}
