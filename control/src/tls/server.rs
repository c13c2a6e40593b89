//! The server side of one management-plane connection, under the
//! server's [`Limits`](super::Limits): the TLS handshake within its
//! deadline, then requests one after the other until the client closes,
//! goes idle, or breaks a limit. A client without a certificate sends one
//! request (a join) of at most `join_frame` bytes; a member keeps its
//! connection for as many requests as it likes.

use super::limits::{Gate, Ticket};
use super::{Creds, Handler};
use crate::pki::Peer;
use crate::rpc::{FrameError, Request, read_frame, write_frame};
use std::net::IpAddr;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout, timeout_at};

/// Accepts on `listener` for ever: each connection admitted by `gate`
/// gets a task of its own (with the credentials current then); one over a
/// cap is reset at once.
pub(super) async fn accept_loop(listener: TcpListener, creds: Arc<Creds>, handler: Handler, gate: Arc<Gate>) {
    loop {
        match listener.accept().await {
            Ok((tcp, from)) => match gate.admit(from.ip()) {
                Some(ticket) => {
                    let (acceptor, handler, gate) = (creds.acceptor(), handler.clone(), gate.clone());
                    tokio::spawn(connection(tcp, from.ip(), acceptor, handler, gate, ticket));
                }
                None => {
                    // A reset: no TIME_WAIT kept for it here.
                    let _ = tcp.set_zero_linger();
                }
            },
            Err(_) => {
                // Out of descriptors (or another passing failure): the
                // connection stays in the backlog; wait, and go on serving.
                gate.count(|c| c.accept_errors += 1);
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// One connection, from the handshake to its close.
async fn connection(
    tcp: TcpStream,
    ip: IpAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    handler: Handler,
    gate: Arc<Gate>,
    ticket: Ticket,
) {
    let _ticket = ticket;
    let l = &gate.limits;
    let _ = tcp.set_nodelay(true);
    let mut s = match timeout(l.handshake, acceptor.accept(tcp)).await {
        Err(_) => return gate.count(|c| c.handshake_timeouts += 1),
        // A certificate the CA did not sign, or not TLS at all.
        Ok(Err(_)) => return gate.count(|c| c.handshake_failed += 1),
        Ok(Ok(s)) => s,
    };
    // The handshake verified the chain and the dates; what the certificate
    // says (name, role, key) is read once per connection, and each request
    // is authorized against it and the state by the handler.
    let peer = s.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| Peer::from_cert(c).ok());
    let member = peer.is_some();
    if member {
        gate.learn_member(ip);
    }
    let limit = if member { l.request_frame } else { l.join_frame };
    loop {
        // The first byte of the next request: a member may wait `idle`
        // for it; without a certificate, the whole request (the only one)
        // must come within `request` of the handshake.
        let start = Instant::now();
        let mut first = [0u8; 1];
        match timeout_at(start + if member { l.idle } else { l.request }, s.read(&mut first)).await {
            Err(_) if member => {
                gate.count(|c| c.idle_closed += 1);
                break;
            }
            Err(_) => {
                gate.count(|c| c.request_timeouts += 1);
                break;
            }
            Ok(Ok(0) | Err(_)) => break, // the client closed
            Ok(Ok(_)) => {}
        }
        let deadline = if member { Instant::now() + l.request } else { start + l.request };
        let mut rest = (&first[..]).chain(&mut s);
        let req = match timeout_at(deadline, read_frame::<_, Request>(&mut rest, limit)).await {
            Err(_) => {
                gate.count(|c| c.request_timeouts += 1);
                break;
            }
            Ok(Err(FrameError::TooLarge { .. })) => {
                gate.count(|c| c.too_large += 1);
                break;
            }
            Ok(Err(FrameError::Json(_))) => {
                gate.count(|c| c.bad_frames += 1);
                break;
            }
            Ok(Err(FrameError::Io(_))) => break,
            Ok(Ok(req)) => req,
        };
        // A certificate that expired while its connection was open: closed
        // (the client's next handshake shows the certificate again).
        if peer.as_ref().is_some_and(|p| p.expired(std::time::SystemTime::now())) {
            gate.count(|c| c.expired_closed += 1);
            break;
        }
        let resp = handler(req, peer.clone()).await;
        match timeout(l.write, write_frame(&mut s, &resp)).await {
            Err(_) => {
                gate.count(|c| c.write_timeouts += 1);
                break;
            }
            Ok(Err(_)) => break,
            Ok(Ok(())) => gate.count(|c| c.requests += 1),
        }
        if !member {
            break;
        }
    }
    let _ = timeout(l.write, s.shutdown()).await;
}
