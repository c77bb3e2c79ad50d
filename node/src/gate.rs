//! The connection gate: a peer may connect only if it is in the signed directory or is an
//! enrolled terminal. While an administrator has an enrolment token outstanding, an unknown
//! peer may also connect, for one enrolment attempt only (the event loop closes it after
//! its answer or a short deadline, and answers nothing else to it).

use std::collections::HashSet;
use std::convert::Infallible;
use std::fmt;
use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent, THandlerOutEvent,
    ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};

/// Who may connect.
#[derive(Default)]
pub(crate) struct Gate {
    allowed: HashSet<PeerId>,
    enrolment_open: bool,
}

#[derive(Debug)]
struct NotAllowed(PeerId);

impl fmt::Display for NotAllowed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "peer {} is neither in the directory nor an enrolled terminal", self.0)
    }
}

impl std::error::Error for NotAllowed {}

impl Gate {
    /// Replaces the allowed peers.
    pub(crate) fn set_allowed(&mut self, peers: HashSet<PeerId>) {
        self.allowed = peers;
    }

    /// Lets unknown peers in (for enrolment) or not.
    pub(crate) fn set_enrolment_open(&mut self, open: bool) {
        self.enrolment_open = open;
    }

    /// Whether a peer is allowed for everything.
    pub(crate) fn is_allowed(&self, peer: &PeerId) -> bool {
        self.allowed.contains(peer)
    }

    fn enforce(&self, peer: &PeerId, inbound: bool) -> Result<(), ConnectionDenied> {
        if self.allowed.contains(peer) || (inbound && self.enrolment_open) {
            return Ok(());
        }
        Err(ConnectionDenied::new(NotAllowed(*peer)))
    }
}

impl NetworkBehaviour for Gate {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.enforce(&peer, true)?;
        Ok(dummy::ConnectionHandler)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: Option<PeerId>,
        _: &[Multiaddr],
        _: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        if let Some(peer) = peer {
            self.enforce(&peer, false)?;
        }
        Ok(vec![])
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.enforce(&peer, false)?;
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, _: FromSwarm) {}

    fn on_connection_handler_event(&mut self, _: PeerId, _: ConnectionId, event: THandlerOutEvent<Self>) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}
