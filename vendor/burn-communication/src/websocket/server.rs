use std::net::SocketAddr;

use crate::{
    base::{CommunicationChannel, CommunicationError, Message, ProtocolServer},
    util::init_logging,
};
use axum::{
    Router,
    extract::{
        State, WebSocketUpgrade,
        ws::{self, WebSocket},
    },
    routing::get,
};
use futures::StreamExt;

/// mmada-rs patch (vendor/PATCHED.md item 6): the address the servers of this process bind
/// to (`None`: `0.0.0.0`, upstream's) and the shared run token every websocket upgrade must
/// present in the `x-mmada-token` header (`None`: no check, upstream's). Set once, before
/// any server starts, with [`set_bind_host`] / [`set_auth_token`].
static BIND_HOST: std::sync::RwLock<Option<String>> = std::sync::RwLock::new(None);
static AUTH_TOKEN: std::sync::RwLock<Option<String>> = std::sync::RwLock::new(None);

/// The header that carries the run token.
pub const TOKEN_HEADER: &str = "x-mmada-token";

/// Bind the servers of this process to `host` (an IP or a name) instead of `0.0.0.0`.
pub fn set_bind_host(host: Option<String>) {
    *BIND_HOST.write().expect("bind host lock") = host;
}

/// Require (servers) and send (clients) the shared run `token`; `None` turns it off.
pub fn set_auth_token(token: Option<String>) {
    *AUTH_TOKEN.write().expect("token lock") = token;
}

/// The token set with [`set_auth_token`].
pub(crate) fn auth_token() -> Option<String> {
    AUTH_TOKEN.read().expect("token lock").clone()
}

#[derive(Clone, Debug)]
pub struct WsServer {
    port: u16,
    router: Router<()>,
}

pub struct WsServerChannel {
    inner: WebSocket,
}

impl WsServer {
    pub fn new(port: u16) -> Self {
        Self {
            port,
            router: Router::new(),
        }
    }
}

impl ProtocolServer for WsServer {
    type Channel = WsServerChannel;
    type Error = WsServerError;

    async fn serve<F>(self, shutdown: F) -> Result<(), Self::Error>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        init_logging();

        let host = BIND_HOST
            .read()
            .expect("bind host lock")
            .clone()
            .unwrap_or_else(|| "0.0.0.0".to_string());
        let address = format!("{host}:{}", self.port);
        log::info!("Starting server {address}");

        let listener = tokio::net::TcpListener::bind(address).await?;

        axum::serve(
            listener,
            self.router
                .into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(shutdown)
        .await?;

        Ok(())
    }

    fn route<C, Fut>(mut self, path: &str, callback: C) -> Self
    where
        C: FnOnce(WsServerChannel) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        // Format path: should start with a /
        let path = if path.starts_with("/") {
            path.to_owned()
        } else {
            format!("/{path}")
        };

        let method = get(
            |ws: WebSocketUpgrade, headers: axum::http::HeaderMap, _: State<()>| async move {
                use axum::response::IntoResponse;
                if let Some(want) = auth_token() {
                    let given = headers
                        .get(TOKEN_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    // constant-time enough for a shared secret compared once per connection
                    let ok = given.len() == want.len()
                        && given
                            .bytes()
                            .zip(want.bytes())
                            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                            == 0;
                    if !ok {
                        log::warn!("refused a peer without the run token");
                        return (
                            axum::http::StatusCode::UNAUTHORIZED,
                            "this run requires its shared token",
                        )
                            .into_response();
                    }
                }
                ws.on_upgrade(async move |socket| {
                    callback(WsServerChannel { inner: socket }).await;
                })
                .into_response()
            },
        );

        self.router = self.router.route(&path, method);

        self
    }
}

impl CommunicationChannel for WsServerChannel {
    type Error = WsServerError;

    async fn send(&mut self, message: Message) -> Result<(), WsServerError> {
        self.inner.send(ws::Message::Binary(message.data)).await?;

        Ok(())
    }

    async fn recv(&mut self) -> Result<Option<Message>, WsServerError> {
        match self.inner.next().await {
            Some(next) => match next {
                Ok(ws::Message::Binary(data)) => Ok(Some(Message { data })),
                Ok(ws::Message::Close(_close_frame)) => Ok(None),
                Err(err) => Err(WsServerError::Axum(err)),
                msg => Err(WsServerError::UnknownMessage(format!("{msg:?}"))),
            },
            None => todo!(),
        }
    }

    async fn close(&mut self) -> Result<(), WsServerError> {
        let reason = "Peer is closing".to_string();

        self.inner
            .send(ws::Message::Close(Some(ws::CloseFrame {
                code: 1000, // code: Normal
                reason: reason.clone().into(),
            })))
            .await?;

        Ok(())
    }
}

#[derive(Debug)]
pub enum WsServerError {
    Io(std::io::Error),
    Axum(axum::Error),
    UnknownMessage(String),
    Other(String),
}

impl CommunicationError for WsServerError {}

impl From<std::io::Error> for WsServerError {
    fn from(err: std::io::Error) -> Self {
        Self::Io(err)
    }
}

impl From<axum::Error> for WsServerError {
    fn from(err: axum::Error) -> Self {
        Self::Axum(err)
    }
}
