//! MQTT over WebSockets, as the Azure IoT SDKs speak it with `websockets=True` (for networks
//! that let only port 443 through): TLS, an HTTP upgrade on `/$iothub/websocket` offering the
//! subprotocol `mqtt`, then MQTT packets in binary frames. After the upgrade the connection is
//! an ordinary MQTT connection, with the same handshake, authentication, ACL and sessions as
//! MQTT over TLS: [`WsIo`] turns the frames back into the byte stream that expects.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, warn};

use super::{connection, pending_budget, take_place};
use crate::hub::SharedHub;

/// Where the SDKs ask for the upgrade.
pub const PATH: &str = "/$iothub/websocket";

/// The largest WebSocket message accepted: an MQTT packet may span frames, but no single
/// message needs more than the largest packet the hub takes, with room to spare.
const MAX_MESSAGE: usize = 4 * 1024 * 1024;

/// Accepts TLS connections, upgrades them to WebSockets and serves MQTT on them until
/// `shutdown` flips. Handshakes run in the connection's own task, within the CONNECT
/// deadline, under the same budget of not-yet-connected sockets as the other listeners.
pub async fn serve(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    hub: SharedHub,
    mut shutdown: watch::Receiver<bool>,
    open: tokio::sync::mpsc::Sender<()>,
) {
    let pending = pending_budget(&hub);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Some(place) = take_place(&hub, &pending) else {
                        drop(stream);
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let (hub, acceptor, open) = (hub.clone(), acceptor.clone(), open.clone());
                    tokio::spawn(async move {
                        let _open = open;
                        let deadline = hub.limits.connect_timeout();
                        match tokio::time::timeout(deadline, upgrade(acceptor, stream, peer)).await {
                            Ok(Ok((ws, cert))) => connection(ws, peer, hub, place, cert).await,
                            Ok(Err(reason)) => {
                                hub.metrics
                                    .connection_attempts
                                    .with_label_values(&[reason])
                                    .inc();
                            }
                            Err(_) => debug!(%peer, "TLS or WebSocket handshake timed out"),
                        }
                    });
                }
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// The stream MQTT runs on after the upgrade.
type Upgraded = WsIo<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>;

/// TLS, then the WebSocket upgrade, with the client certificate TLS saw; the reason (a
/// metric label) when either fails.
async fn upgrade(
    acceptor: tokio_rustls::TlsAcceptor,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
) -> Result<(Upgraded, Vec<Vec<u8>>), &'static str> {
    let tls = acceptor.accept(stream).await.map_err(|e| {
        debug!(%peer, error = %e, "TLS handshake failed");
        "tls_error"
    })?;
    let cert = super::client_certificate(&tls);
    let ws = accept(tls).await.map_err(|e| {
        debug!(%peer, error = %e, "WebSocket upgrade refused");
        "websocket_error"
    })?;
    Ok((ws, cert))
}

/// The subprotocol to answer with: `mqtt` offered in any case (the SDKs write `mqtt`, some
/// clients `MQTT`), as offered.
fn mqtt_protocol(request: &Request) -> Option<HeaderValue> {
    request
        .headers()
        .get_all("Sec-WebSocket-Protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find(|p| p.eq_ignore_ascii_case("mqtt"))
        .and_then(|p| HeaderValue::from_str(p).ok())
}

fn refuse(status: StatusCode, why: &str) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(why.to_string()));
    *response.status_mut() = status;
    response
}

/// Runs the server side of the upgrade on an open stream: the path must be [`PATH`] and
/// `mqtt` must be among the offered subprotocols.
pub async fn accept<S>(stream: S) -> Result<WsIo<S>, tokio_tungstenite::tungstenite::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // The callback's error type is tungstenite's HTTP response, as its API requires.
    #[allow(clippy::result_large_err)]
    let check = |request: &Request, mut response: Response| {
        if request.uri().path() != PATH {
            return Err(refuse(
                StatusCode::NOT_FOUND,
                "MQTT over WebSockets is served on /$iothub/websocket",
            ));
        }
        let Some(protocol) = mqtt_protocol(request) else {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                "the WebSocket subprotocol mqtt is required",
            ));
        };
        response
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", protocol);
        Ok(response)
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
        // Each write goes out as it is made: MQTT acknowledgements must not wait in a buffer.
        .write_buffer_size(0);
    let ws = tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(config)).await?;
    Ok(WsIo {
        ws,
        pending: Bytes::new(),
    })
}

/// A WebSocket carrying MQTT, as a byte stream: reads yield the payloads of binary frames in
/// order, each write is sent as one binary frame. Pings are answered by the WebSocket layer;
/// a close frame or the end of the socket reads as end of stream.
pub struct WsIo<S> {
    ws: WebSocketStream<S>,
    /// What is left of the last binary frame read.
    pending: Bytes,
}

fn io_error(e: tokio_tungstenite::tungstenite::Error) -> io::Error {
    io::Error::other(e)
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                None | Some(Ok(Message::Close(_))) => return Poll::Ready(Ok(())),
                Some(Ok(Message::Binary(data))) => self.pending = data,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a text frame where MQTT needs binary frames",
                    )))
                }
                // Pings (answered by the WebSocket layer), pongs, raw frames.
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(Pin::new(&mut self.ws).poll_ready(cx)).map_err(io_error)?;
        Pin::new(&mut self.ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(data)))
            .map_err(io_error)?;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(io_error)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_close(cx).map_err(io_error)
    }
}
