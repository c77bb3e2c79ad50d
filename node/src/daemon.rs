//! The running node: writer thread plus HTTP server, until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use automerge::ActorId;

use crate::api::{AppState, router};
use crate::auth::RateLimiter;
use crate::config::NodeFiles;
use crate::store::Store;
use crate::tls::{PeerAddr, TlsListener};
use crate::writer::{Command, Who, WriterContext, WriterHandle, spawn_writer};

/// A started writer with the state the API needs.
pub struct Started {
    /// API state.
    pub state: AppState,
    /// The writer thread; it ends once every [`WriterHandle`] is dropped.
    pub writer_thread: std::thread::JoinHandle<()>,
    /// Request body limit.
    pub max_body_bytes: usize,
    /// HTTPS configuration; `None` serves plain HTTP.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The p2p service, if the node is in a federation (it holds a writer handle).
    pub p2p: Option<tokio::task::JoinHandle<()>>,
}

/// Starts the writer and builds the API state.
pub fn start(files: NodeFiles, store: Arc<Store>) -> anyhow::Result<Started> {
    let coupon_public_key = files.signing_public_key();
    let writer_audit = files.audit_log()?;
    let api_audit = Arc::new(files.audit_log()?);
    let https = !files.config.http.plain_http;
    let terminal = match (&files.config.role, &files.config.terminal) {
        (crate::config::Role::Terminal, Some(t)) => {
            Some(crate::terminal::TerminalRuntime::open(store.clone(), files.config.municipality, &t.venue)?)
        }
        (crate::config::Role::Terminal, None) => anyhow::bail!("node.toml of a terminal lacks [terminal]"),
        _ => None,
    };
    // A municipal node prints its own coupons at the desk (a standby or terminal does not).
    let coupon_signer = if files.config.role == crate::config::Role::Municipal {
        Some(Arc::new(files.coupon_key()?))
    } else {
        None
    };
    let NodeFiles { config, catalogue, signing_key, actor, .. } = files;
    let context = WriterContext {
        actor: ActorId::from(actor),
        catalogue: catalogue.clone(),
        campaign_start: config.campaign.start,
        signing_key,
        cache_documents: config.storage.cache_documents,
        group_commit_max: config.storage.group_commit_max,
        audit: writer_audit,
        read_only: config.role == crate::config::Role::Standby,
    };
    let (writer, writer_thread): (WriterHandle, _) = spawn_writer(store.clone(), context);
    let state = AppState {
        store,
        writer,
        municipality: config.municipality,
        coupon_public_key,
        coupon_signer,
        catalogue: Arc::new(catalogue),
        audit: api_audit,
        login_limiter: Arc::new(RateLimiter::new(config.auth.login_per_minute)),
        public_limiter: Arc::new(RateLimiter::new(config.auth.public_per_minute)),
        policy: Arc::new(config.auth.clone()),
        https,
        terminal,
        p2p_address: None,
        handoffs: None,
    };
    Ok(Started { state, writer_thread, max_body_bytes: config.http.max_body_bytes, tls: None, p2p: None })
}

/// Serves the API on `listen` until a shutdown signal; `bound` learns the actual address.
pub async fn serve(
    files: NodeFiles,
    store: Arc<Store>,
    listen: &str,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> anyhow::Result<()> {
    files.config.http.check_listen(listen)?;
    let p2p = p2p_options(&files, &store)?;
    let tls = if files.config.http.plain_http {
        None
    } else {
        let http = &files.config.http;
        Some(crate::tls::load_server_config(&files.path_of(&http.tls_cert), &files.path_of(&http.tls_key))?)
    };
    let terminal_sync = match (&files.config.terminal, files.config.role) {
        (Some(t), crate::config::Role::Terminal) => Some((
            crate::terminal::identity(&files.dir)?,
            t.node
                .parse::<libp2p::Multiaddr>()
                .with_context(|| format!("[terminal] node {} is not a multiaddr", t.node))?,
        )),
        _ => None,
    };
    let service = capture_service(&files, &store)?;
    let reporter_key = reporter_key(&files)?;
    let handoff_parts = handoff_parts(&files)?;
    let audit_public_key = files.audit_public_key();
    if files.config.role == crate::config::Role::Municipal
        && store.read()?.meta(crate::store::META_STATS_COUNTED)? == 0
    {
        // A store from before the counters existed: count its documents once.
        let n = crate::statistics::rebuild(&store)?;
        files.audit_cli(&store, "statistics.rebuild", &format!("counters:{n}"), "ok")?;
        tracing::info!(counters = n, "statistics counted from the documents");
    }
    let address = crate::terminals::p2p_address(&files).ok();
    let mut started = start(files, store)?;
    started.tls = tls;
    if let (Some((keypair, node)), Some(runtime)) = (terminal_sync, started.state.terminal.clone()) {
        let writer = started.state.writer.clone();
        started.p2p = Some(tokio::spawn(async move {
            if let Err(error) = crate::terminal::run_sync(runtime, writer, keypair, node).await {
                tracing::error!(error = format!("{error:#}"), "the terminal sync stopped");
            }
        }));
    }
    if let Some(mut options) = p2p {
        if service.is_some() {
            started.state.p2p_address = address;
        }
        options.writer = Some(started.state.writer.clone());
        options.captures = service.map(|make| Arc::new(make(started.state.writer.clone())));
        if let Some(key) = reporter_key {
            let writer = started.state.writer.clone();
            let reporter = crate::statistics::Reporter::new(
                started.state.store.clone(),
                writer,
                key,
                started.state.municipality,
                &audit_public_key,
            )?;
            options.reporter = Some(Arc::new(reporter));
        }
        if let Some((secret, encryption_secret, auto_accept, directory)) = handoff_parts {
            let handoffs = Arc::new(crate::handoff::HandoffService::new(
                started.state.store.clone(),
                started.state.writer.clone(),
                started.state.municipality,
                protocol::person::PersonKeySecret::new(&secret),
                encryption_secret,
                auto_accept,
                directory,
            ));
            started.state.handoffs = Some(handoffs.clone());
            options.handoffs = Some(handoffs);
        }
        started.p2p = Some(tokio::spawn(async move {
            if let Err(error) = crate::p2p::run(options, None).await {
                tracing::error!(error = format!("{error:#}"), "the p2p service stopped");
            }
        }));
    }
    serve_started(started, listen, bound).await
}

/// The key a municipal primary in a federation signs its statistics with (its coupon key,
/// which the directory publishes); `None` for other nodes.
fn reporter_key(files: &NodeFiles) -> anyhow::Result<Option<ring::signature::Ed25519KeyPair>> {
    if files.config.role != crate::config::Role::Municipal || files.config.p2p.national.is_none() {
        return Ok(None);
    }
    Ok(Some(files.coupon_key()?))
}

type HandoffParts = ([u8; 32], [u8; 32], bool, Option<protocol::directory::SignedDirectory>);

/// What the relocation service of a municipal primary in a federation needs: the person-key
/// secret, the node's X25519 secret, the acceptance policy and the directory held.
fn handoff_parts(files: &NodeFiles) -> anyhow::Result<Option<HandoffParts>> {
    let (crate::config::Role::Municipal, Some(key)) = (files.config.role, &files.config.p2p.national_key)
    else {
        return Ok(None);
    };
    let national_key = protocol::person::hex_decode(key).context("[p2p] national_key is not hex")?;
    let directory = crate::p2p::load_directory(&files.dir.join("directory.json"), &national_key)?;
    Ok(Some((
        crate::config::read_secret32(&files.dir, "keys/person-key.secret")?,
        crate::config::read_secret32(&files.dir, "keys/encryption.key")?,
        files.config.handoff.accept == crate::config::HandoffAccept::Auto,
        directory,
    )))
}

/// Whether a municipal node has terminals or enrolment tokens (its p2p service then runs
/// even outside a federation).
fn has_terminals(store: &Store) -> anyhow::Result<bool> {
    let view = store.read()?;
    Ok(view.count(crate::store::TERMINALS)? + view.count(crate::store::ENROLMENTS)? > 0)
}

/// What a municipal primary needs to serve terminals and forwarded captures, once its
/// writer exists.
type MakeService = Box<dyn FnOnce(WriterHandle) -> crate::terminals::CaptureService + Send>;

fn capture_service(files: &NodeFiles, store: &Arc<Store>) -> anyhow::Result<Option<MakeService>> {
    if files.config.role != crate::config::Role::Municipal {
        return Ok(None);
    }
    let signing_key = files.coupon_key()?;
    let store = store.clone();
    let municipality = files.config.municipality;
    let coupon_public_key = files.signing_public_key();
    let catalogue = files.catalogue.clone();
    let campaign_start = files.config.campaign.start;
    let national_key = files.config.p2p.national_key.clone().unwrap_or_default();
    Ok(Some(Box::new(move |writer| crate::terminals::CaptureService {
        store,
        writer,
        municipality,
        signing_key: Arc::new(signing_key),
        coupon_public_key,
        catalogue,
        campaign_start,
        national_key,
    })))
}

/// The p2p service's options, when the node has joined a federation (`[p2p] national`) or,
/// for a municipal primary, has terminals.
fn p2p_options(files: &NodeFiles, store: &Arc<Store>) -> anyhow::Result<Option<crate::p2p::P2pOptions>> {
    let p2p = &files.config.p2p;
    let role = match files.config.role {
        crate::config::Role::Standby => protocol::directory::NodeRole::Standby,
        crate::config::Role::Municipal => protocol::directory::NodeRole::Municipal,
        _ => return Ok(None),
    };
    let (national, national_key) = match (&p2p.national, &p2p.national_key) {
        (Some(national), Some(key)) => (
            Some(national.parse().with_context(|| format!("[p2p] national {national} is not a multiaddr"))?),
            protocol::person::hex_decode(key).context("[p2p] national_key is not hex")?,
        ),
        // Outside a federation a primary serves terminals when it has some, or when the
        // operator gave it an address they can dial.
        _ if role == protocol::directory::NodeRole::Municipal
            && (has_terminals(store)? || crate::terminals::p2p_address(files).is_ok()) =>
        {
            (None, Vec::new())
        }
        _ => return Ok(None),
    };
    Ok(Some(crate::p2p::P2pOptions {
        keypair: crate::p2p::load_or_create_identity(&files.dir.join("keys/p2p-identity.key"))?,
        listen: p2p
            .listen
            .parse()
            .with_context(|| format!("[p2p] listen {} is not a multiaddr", p2p.listen))?,
        national,
        national_key,
        directory_path: files.dir.join("directory.json"),
        role,
        municipality: Some(files.config.municipality),
        store: Some(store.clone()),
        writer: None,
        captures: None,
        reporter: None,
        national_store: None,
        handoffs: None,
    }))
}

/// Serves an already started node.
pub async fn serve_started(
    started: Started,
    listen: &str,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> anyhow::Result<()> {
    let Started { state, writer_thread, max_body_bytes, tls, p2p } = started;
    let municipality = state.municipality;
    let ticker = tokio::spawn(checkpoint_ticker(state.writer.clone()));
    let last_word = state.writer.clone();
    let app = router(state, max_body_bytes).into_make_service_with_connect_info::<PeerAddr>();
    let listener =
        tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    let address = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(%address, %municipality, scheme, "vrs-node listening");
    println!("待受中 / listening on {scheme}://{address}");
    if let Some(bound) = bound {
        let _ = bound.send(address);
    }
    match tls {
        Some(config) => {
            let listener = TlsListener::new(listener, config)?;
            axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await?;
        }
        None => axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await?,
    }
    ticker.abort();
    let _ = ticker.await;
    if let Some(p2p) = p2p {
        // Its writer handle must go before the writer can drain and stop.
        p2p.abort();
        let _ = p2p.await;
    }
    // Sign the newest audit entries before stopping, so none are left unsigned.
    let who = Who { actor: "node".into(), role: "-".into(), request_id: "-".into() };
    if let Err(problem) = last_word.call(&who, Command::Checkpoint).await {
        tracing::warn!(code = %problem.code, "final audit checkpoint failed");
    }
    drop(last_word);
    // The router (and with it every writer handle) is gone: the writer drains and stops.
    writer_thread.join().map_err(|_| anyhow::anyhow!("the writer thread panicked"))?;
    tracing::info!("stopped");
    Ok(())
}

/// Signs an audit checkpoint every minute when entries were added since the last one, so
/// the newest entries are never long unsigned.
async fn checkpoint_ticker(writer: WriterHandle) {
    let who = Who { actor: "node".into(), role: "-".into(), request_id: "-".into() };
    let mut interval = tokio::time::interval(std::time::Duration::from_secs(60));
    interval.tick().await;
    loop {
        interval.tick().await;
        if let Err(problem) = writer.call(&who, Command::Checkpoint).await {
            tracing::warn!(code = %problem.code, "audit checkpoint failed");
        }
    }
}

/// Resolves at SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = interrupt => {}
        _ = terminate => {}
    }
}
