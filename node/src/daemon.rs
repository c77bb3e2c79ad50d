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
}

/// Starts the writer and builds the API state.
pub fn start(files: NodeFiles, store: Arc<Store>) -> anyhow::Result<Started> {
    let coupon_public_key = files.signing_public_key();
    let writer_audit = files.audit_log()?;
    let api_audit = Arc::new(files.audit_log()?);
    let https = !files.config.http.plain_http;
    let NodeFiles { config, catalogue, signing_key, actor, .. } = files;
    let context = WriterContext {
        actor: ActorId::from(actor),
        catalogue: catalogue.clone(),
        campaign_start: config.campaign.start,
        signing_key,
        cache_documents: config.storage.cache_documents,
        group_commit_max: config.storage.group_commit_max,
        audit: writer_audit,
    };
    let (writer, writer_thread): (WriterHandle, _) = spawn_writer(store.clone(), context);
    let state = AppState {
        store,
        writer,
        municipality: config.municipality,
        coupon_public_key,
        catalogue: Arc::new(catalogue),
        audit: api_audit,
        login_limiter: Arc::new(RateLimiter::new(config.auth.login_per_minute)),
        public_limiter: Arc::new(RateLimiter::new(config.auth.public_per_minute)),
        policy: Arc::new(config.auth.clone()),
        https,
    };
    Ok(Started { state, writer_thread, max_body_bytes: config.http.max_body_bytes, tls: None })
}

/// Serves the API on `listen` until a shutdown signal; `bound` learns the actual address.
pub async fn serve(
    files: NodeFiles,
    store: Arc<Store>,
    listen: &str,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> anyhow::Result<()> {
    files.config.http.check_listen(listen)?;
    let tls = if files.config.http.plain_http {
        None
    } else {
        let http = &files.config.http;
        Some(crate::tls::load_server_config(&files.path_of(&http.tls_cert), &files.path_of(&http.tls_key))?)
    };
    let mut started = start(files, store)?;
    started.tls = tls;
    serve_started(started, listen, bound).await
}

/// Serves an already started node.
pub async fn serve_started(
    started: Started,
    listen: &str,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> anyhow::Result<()> {
    let Started { state, writer_thread, max_body_bytes, tls } = started;
    let municipality = state.municipality;
    let ticker = tokio::spawn(checkpoint_ticker(state.writer.clone()));
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

async fn shutdown_signal() {
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
