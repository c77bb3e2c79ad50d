//! The running node: writer thread plus HTTP server, until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use automerge::ActorId;

use crate::api::{AppState, router};
use crate::config::NodeFiles;
use crate::store::Store;
use crate::writer::{WriterContext, WriterHandle, spawn_writer};

/// A started writer with the state the API needs.
pub struct Started {
    /// API state.
    pub state: AppState,
    /// The writer thread; it ends once every [`WriterHandle`] is dropped.
    pub writer_thread: std::thread::JoinHandle<()>,
    /// Request body limit.
    pub max_body_bytes: usize,
}

/// Starts the writer and builds the API state.
pub fn start(files: NodeFiles, store: Arc<Store>) -> Started {
    let coupon_public_key = files.signing_public_key();
    let NodeFiles { config, catalogue, signing_key, actor, admin_token_sha256, .. } = files;
    let context = WriterContext {
        actor: ActorId::from(actor),
        catalogue: catalogue.clone(),
        campaign_start: config.campaign.start,
        signing_key,
        cache_documents: config.storage.cache_documents,
        group_commit_max: config.storage.group_commit_max,
    };
    let (writer, writer_thread): (WriterHandle, _) = spawn_writer(store.clone(), context);
    let state = AppState {
        store,
        writer,
        municipality: config.municipality,
        coupon_public_key,
        catalogue: Arc::new(catalogue),
        admin_token_sha256,
    };
    Started { state, writer_thread, max_body_bytes: config.http.max_body_bytes }
}

/// Serves the API on `listen` until a shutdown signal; `bound` learns the actual address.
pub async fn serve(
    files: NodeFiles,
    store: Arc<Store>,
    listen: &str,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> anyhow::Result<()> {
    let started = start(files, store);
    serve_started(started, listen, bound).await
}

/// Serves an already started node.
pub async fn serve_started(
    started: Started,
    listen: &str,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> anyhow::Result<()> {
    let Started { state, writer_thread, max_body_bytes } = started;
    let municipality = state.municipality;
    let app = router(state, max_body_bytes);
    let listener =
        tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    let address = listener.local_addr()?;
    tracing::info!(%address, %municipality, "vrs-node listening");
    println!("待受中 / listening on http://{address}");
    if let Some(bound) = bound {
        let _ = bound.send(address);
    }
    axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await?;
    // The router (and with it every writer handle) is gone: the writer drains and stops.
    writer_thread.join().map_err(|_| anyhow::anyhow!("the writer thread panicked"))?;
    tracing::info!("stopped");
    Ok(())
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
