//! Open a broker by URL, so a service (or a demo) switches backends with a flag:
//! `sqlite:FILE`, `postgres://…`, `nats://…`, `amqp://…`.

use courier_core::{Error, ErrorKind, Publisher, Result, Subscriber};
use std::fmt;
use std::sync::Arc;

/// A broker opened by URL: publish and subscribe through trait objects.
#[derive(Clone)]
pub struct Broker {
    publisher: Arc<dyn Publisher>,
    subscriber: Arc<dyn Subscriber>,
    url: String,
}

impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Broker").field("url", &self.url).finish()
    }
}

impl Broker {
    /// The broker as a publisher (give it to a [`Relay`](courier_core::Relay)).
    pub fn publisher(&self) -> Arc<dyn Publisher> {
        self.publisher.clone()
    }

    /// The broker as a subscriber.
    pub fn subscriber(&self) -> Arc<dyn Subscriber> {
        self.subscriber.clone()
    }

    /// The URL without its password.
    pub fn url(&self) -> &str {
        &self.url
    }

    #[allow(dead_code)]
    fn of<T: Publisher + Subscriber + Clone + 'static>(t: T, url: &str) -> Self {
        Self {
            publisher: Arc::new(t.clone()),
            subscriber: Arc::new(t),
            url: redact(url),
        }
    }
}

/// Open the broker `url` names. The scheme picks the backend; a backend this build was
/// compiled without (facade features `sqlite`, `postgres`, `nats`, `amqp`) is a
/// configuration error saying which feature to turn on.
///
/// ```no_run
/// # async fn f() -> courier::Result<()> {
/// let broker = courier::connect::broker("sqlite:.courier/broker.db").await?;
/// # Ok(()) }
/// ```
pub async fn broker(url: &str) -> Result<Broker> {
    let scheme = url
        .split_once(':')
        .map(|(s, _)| s.to_ascii_lowercase())
        .unwrap_or_default();
    match scheme.as_str() {
        #[cfg(feature = "sqlite")]
        "sqlite" => Ok(Broker::of(
            courier_sqlite::SqliteBroker::connect(url).await?,
            url,
        )),
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => Ok(Broker::of(
            courier_postgres::PgBroker::connect(url).await?,
            url,
        )),
        #[cfg(feature = "nats")]
        "nats" => Ok(Broker::of(
            courier_nats::NatsTransport::connect(url).await?,
            url,
        )),
        #[cfg(feature = "amqp")]
        "amqp" | "amqps" => Ok(Broker::of(
            courier_amqp::AmqpTransport::connect(url).await?,
            url,
        )),
        // Reached only for the backends this build lacks.
        #[allow(unreachable_patterns)]
        "sqlite" | "postgres" | "postgresql" | "nats" | "amqp" | "amqps" => Err(Error::new(
            ErrorKind::Config,
            format!(
                "broker URL {}: this build has no {scheme} support; enable the courier \
                 feature for it",
                redact(url)
            ),
        )),
        _ => Err(Error::new(
            ErrorKind::Config,
            format!(
                "broker URL {:?}: expected sqlite:FILE, postgres://…, nats://… or amqp://…",
                redact(url)
            ),
        )),
    }
}

/// `url` with its password replaced by `***`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(redact("amqp://guest:guest@h/%2f"), "amqp://guest:***@h/%2f");
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("sqlite:a.db"), "sqlite:a.db");
    }

    #[tokio::test]
    async fn unknown_scheme_is_a_config_error() {
        let e = broker("kafka://x").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.to_string().contains("expected sqlite:FILE"), "{e}");
    }
}
