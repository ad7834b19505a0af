//! What the three services share: flags, opening the database and the broker, the HTTP
//! server next to the relay and the dispatcher, JSON errors that name the field.

use crate::db::ServiceDb;
use anyhow::Context as _;
use axum::Json;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use courier::postgres::PgStore;
use courier::sqlite::SqliteStore;
use courier::{
    ChannelName, Dispatcher, GroupName, Relay, ServiceDescription, SubscribeOptions, Subscription,
};
use serde::de::DeserializeOwned;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Flags of every service.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct ServiceArgs {
    /// The service's own database: `sqlite:FILE` [default: sqlite:.ftgo/<service>.db] or
    /// `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE`. Courier's tables and the
    /// service's go to the first schema of the search_path, so services sharing one
    /// PostgreSQL database each name their own schema, e.g.
    /// `postgres://postgres@127.0.0.1/ftgo?options=-csearch_path%3Dftgo_order`; the
    /// service creates that schema when it is missing.
    #[arg(long, value_name = "URL")]
    pub(crate) db: Option<String>,
    /// The broker: `sqlite:FILE`, `postgres://…`, `nats://…` or `amqp://…`
    /// [default: sqlite:.ftgo/broker.db, shared by the three services].
    #[arg(long, value_name = "URL")]
    pub(crate) broker: Option<String>,
    /// Where the REST API listens (port 0 picks a free one; the address is printed).
    #[arg(long, value_name = "ADDR")]
    pub(crate) listen: Option<SocketAddr>,
    #[command(subcommand)]
    pub(crate) command: Option<ServiceCommand>,
}

/// What a service can do besides running.
#[derive(Debug, Clone, clap::Subcommand)]
pub(crate) enum ServiceCommand {
    /// Print the service's AsyncAPI 3.0 document (YAML) and exit.
    Asyncapi {
        /// Print JSON instead of YAML.
        #[arg(long)]
        json: bool,
    },
}

/// Print the AsyncAPI document when asked to; `true` when it did (the service exits).
pub(crate) fn asyncapi_requested(
    args: &ServiceArgs,
    description: &ServiceDescription,
) -> anyhow::Result<bool> {
    let Some(ServiceCommand::Asyncapi { json }) = &args.command else {
        return Ok(false);
    };
    let doc = courier_asyncapi::asyncapi(description);
    if *json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print!("{}", courier_asyncapi::to_yaml(&doc)?);
    }
    Ok(true)
}

/// A service opened on the database `--db` names: the service's code is generic over
/// [`ServiceDb`], `main` picks the instance.
pub(crate) enum Opened {
    /// `--db sqlite:FILE`.
    Sqlite(Service<SqliteStore>),
    /// `--db postgres://…`.
    Postgres(Service<PgStore>),
}

/// Open the database and the broker named by the flags (defaults under ./.ftgo/); the
/// REST API listens on `--listen` or 127.0.0.1:`port`.
pub(crate) async fn open(
    name: &'static str,
    args: &ServiceArgs,
    port: u16,
) -> anyhow::Result<Opened> {
    let db = args
        .db
        .clone()
        .unwrap_or_else(|| format!("sqlite:.ftgo/{name}.db"));
    let broker = args
        .broker
        .clone()
        .unwrap_or_else(|| "sqlite:.ftgo/broker.db".to_owned());
    let scheme = db
        .split_once(':')
        .map(|(scheme, _)| scheme.to_ascii_lowercase())
        .unwrap_or_default();
    let postgres = match scheme.as_str() {
        "sqlite" => false,
        "postgres" | "postgresql" => true,
        _ => anyhow::bail!(
            "--db {}: expected sqlite:FILE or postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE",
            courier::connect::redact(&db)
        ),
    };
    for url in [&db, &broker] {
        if let Some(path) = url.strip_prefix("sqlite:")
            && let Some(dir) = PathBuf::from(path).parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create the directory {}", dir.display()))?;
        }
    }
    let listen = args
        .listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], port)));
    Ok(if postgres {
        Opened::Postgres(Service::open(name, &db, &broker, listen).await?)
    } else {
        Opened::Sqlite(Service::open(name, &db, &broker, listen).await?)
    })
}

/// A running service's database and broker.
pub(crate) struct Service<S> {
    pub(crate) name: &'static str,
    pub(crate) store: S,
    pub(crate) broker: courier::connect::Broker,
    listen: SocketAddr,
}

impl<S: ServiceDb> Service<S> {
    async fn open(
        name: &'static str,
        db: &str,
        broker: &str,
        listen: SocketAddr,
    ) -> anyhow::Result<Self> {
        let store = S::open(db).await?;
        let broker = courier::connect::broker(broker).await.with_context(|| {
            format!(
                "cannot open the broker {}",
                courier::connect::redact(broker)
            )
        })?;
        Ok(Self {
            name,
            store,
            broker,
            listen,
        })
    }

    /// Join consumer group `<service>` on `channel`.
    pub(crate) async fn subscribe(&self, channel: &str) -> anyhow::Result<Subscription> {
        let options = SubscribeOptions::new(ChannelName::new(channel)?, GroupName::new(self.name)?);
        self.broker
            .subscriber()
            .subscribe(options)
            .await
            .with_context(|| format!("cannot subscribe to {channel}"))
    }

    /// Serve `app` next to the relay and `dispatcher` (on `subscriptions`) until Ctrl-C
    /// or SIGTERM. Prints `listening on ADDR` once everything runs.
    pub(crate) async fn serve(
        self,
        app: axum::Router,
        dispatcher: Dispatcher<S>,
        subscriptions: Vec<Subscription>,
    ) -> anyhow::Result<()> {
        let listener = tokio::net::TcpListener::bind(self.listen)
            .await
            .with_context(|| format!("cannot listen on {}", self.listen))?;
        let addr = listener.local_addr()?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let relay =
            tokio::spawn(Relay::new(self.store.clone(), self.broker.publisher()).run(stopped()));
        let dispatch = tokio::spawn(dispatcher.run(Subscription::merge(subscriptions), stopped()));
        println!("listening on {addr}");
        tracing::info!(service = self.name, %addr, broker = self.broker.url(), "started");
        let server = axum::serve(listener, app).with_graceful_shutdown(stopped());
        tokio::select! {
            r = server => r.context("the HTTP server failed")?,
            () = shutdown_signal() => {}
        }
        let _ = stop_tx.send(true);
        relay.await?.context("the relay failed")?;
        dispatch.await?.context("the dispatcher failed")?;
        Ok(())
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// Logs to stderr; `RUST_LOG` overrides the default `warn`.
pub(crate) fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("warn,lapin=off,pgwire_replication=off")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// An API error: a status and a JSON body `{"error": "...", "field": "..."}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    error: String,
    field: Option<String>,
}

impl ApiError {
    /// 422: `field` is wrong.
    pub(crate) fn invalid(field: impl Into<String>, error: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            error: error.into(),
            field: Some(field.into()),
        }
    }

    /// 404.
    pub(crate) fn not_found(what: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            error: what.into(),
            field: None,
        }
    }

    /// 503: the service's own database failed (retry later).
    pub(crate) fn unavailable(e: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %e, "request failed");
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            error: format!("the service cannot take this now, retry later: {e}"),
            field: None,
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        Self::unavailable(e)
    }
}

impl From<courier::Error> for ApiError {
    fn from(e: courier::Error) -> Self {
        Self::unavailable(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({ "error": self.error });
        if let Some(f) = self.field {
            body["field"] = serde_json::Value::String(f);
        }
        (self.status, Json(body)).into_response()
    }
}

/// Largest request body accepted.
pub(crate) const MAX_BODY: usize = 64 * 1024;

/// Checks a request body beyond its JSON shape.
pub(crate) trait Validate {
    /// `Err(ApiError::invalid(field, why))` when a value is out of range.
    fn validate(&self) -> Result<(), ApiError>;
}

/// A JSON request body: too large → 413, not JSON or wrong shape → 400 naming the field
/// (`lineItems[0].quantity`), out of range → 422 naming the field.
#[derive(Debug)]
pub(crate) struct JsonBody<T>(pub(crate) T);

impl<S: Send + Sync, T: DeserializeOwned + Validate> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let bytes = axum::body::to_bytes(req.into_body(), MAX_BODY)
            .await
            .map_err(|_| ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                error: format!("the request body is larger than {MAX_BODY} bytes"),
                field: None,
            })?;
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        let value: T = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            // serde names a missing or unknown field in its message, not in the path.
            let named = ["missing field `", "unknown field `"].iter().find_map(|p| {
                let rest = inner.split_once(p)?.1;
                Some(rest.split_once('`')?.0.to_owned())
            });
            let field = match (path.as_str(), named) {
                (".", Some(name)) => Some(name),
                // `?`: a syntax error, before any field was reached.
                (".", None) | ("?", None) => None,
                (_, Some(name)) => Some(format!("{path}.{name}")),
                (_, None) => Some(path),
            };
            ApiError {
                status: StatusCode::BAD_REQUEST,
                error: format!("invalid JSON body: {inner}"),
                field,
            }
        })?;
        value.validate()?;
        Ok(Self(value))
    }
}

/// Parse a price in currency units (`12.5`) into cents, naming `field` when it is wrong.
pub(crate) fn cents(field: &str, price: f64) -> Result<i64, ApiError> {
    if !price.is_finite() || !(0.0..=1_000_000.0).contains(&price) {
        return Err(ApiError::invalid(
            field,
            format!("expected a price between 0 and 1000000, got {price}"),
        ));
    }
    Ok((price * 100.0).round() as i64)
}

/// Cents as currency units.
pub(crate) fn units(cents: i64) -> f64 {
    cents as f64 / 100.0
}

/// A new id (UUIDv7, time-ordered).
pub(crate) fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// `GET /health`.
pub(crate) async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}
