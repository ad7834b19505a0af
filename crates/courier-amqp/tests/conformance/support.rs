//! The test factory: URL from the environment, fresh transports, clean-up on drop.

use courier_amqp::{AmqpConfig, AmqpTransport};
use courier_core::transport::BoxFuture;
use courier_core::{
    Capabilities, ChannelName, GroupName, Message, Publisher, Receipt, Result, SubscribeOptions,
    Subscriber, Subscription,
};
use courier_testkit::TransportFactory;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The server URL, or `None` (with a printed reason) when the tests should skip.
pub(crate) fn url() -> Option<String> {
    match std::env::var("COURIER_TEST_AMQP_URL") {
        Ok(u) if !u.trim().is_empty() => Some(u),
        _ if std::env::var_os("CI").is_some() => {
            panic!("COURIER_TEST_AMQP_URL must be set in CI")
        }
        _ => {
            eprintln!(
                "skipped: COURIER_TEST_AMQP_URL is not set (e.g. \
                 amqp://guest:guest@127.0.0.1:5672/%2f with RabbitMQ 3.9+ running)"
            );
            None
        }
    }
}

/// Fast rebalancing; streams expire after an hour in case a run is killed before it
/// deletes them.
pub(crate) fn config(url: String) -> AmqpConfig {
    AmqpTransport::builder()
        .url(url)
        .rebalance_interval(Duration::from_millis(100))
        .stream_max_age(Some(Duration::from_secs(3600)))
        .build_config()
}

/// What the tests created, to delete at the end.
#[derive(Default)]
pub(crate) struct Created {
    pub(crate) channels: HashSet<ChannelName>,
    pub(crate) groups: HashSet<(ChannelName, GroupName)>,
}

pub(crate) type Shared = Arc<Mutex<Created>>;

/// Fresh transports on one server; remembers channels and groups to delete them.
pub(crate) struct AmqpFactory {
    pub(crate) config: AmqpConfig,
    pub(crate) transport: AmqpTransport,
    pub(crate) created: Shared,
}

pub(crate) async fn factory() -> Option<AmqpFactory> {
    // `RUST_LOG=courier_amqp=debug` shows claims and hand-overs.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let config = config(url()?);
    let transport = AmqpTransport::connect_with(config.clone())
        .await
        .unwrap_or_else(|e| panic!("connecting to the test server failed: {e}"));
    Some(AmqpFactory {
        config,
        transport,
        created: Arc::default(),
    })
}

/// A transport that writes down the channels and groups it touches.
pub(crate) struct Recording {
    pub(crate) inner: AmqpTransport,
    pub(crate) created: Shared,
}

impl Publisher for Recording {
    fn publish<'a>(&'a self, messages: &'a [Message]) -> BoxFuture<'a, Result<Receipt>> {
        if let Ok(mut c) = self.created.lock() {
            c.channels
                .extend(messages.iter().filter_map(|m| m.channel().ok()));
        }
        self.inner.publish(messages)
    }

    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
}

impl Subscriber for Recording {
    fn subscribe<'a>(&'a self, options: SubscribeOptions) -> BoxFuture<'a, Result<Subscription>> {
        if let Ok(mut c) = self.created.lock() {
            c.channels.insert(options.channel.clone());
            c.groups
                .insert((options.channel.clone(), options.group.clone()));
        }
        self.inner.subscribe(options)
    }
}

impl TransportFactory for AmqpFactory {
    fn publisher(&self) -> BoxFuture<'_, Result<Arc<dyn Publisher>>> {
        Box::pin(async move {
            Ok(Arc::new(Recording {
                inner: self.transport.clone(),
                created: self.created.clone(),
            }) as Arc<dyn Publisher>)
        })
    }

    fn subscriber(&self) -> BoxFuture<'_, Result<Arc<dyn Subscriber>>> {
        Box::pin(async move {
            Ok(Arc::new(Recording {
                inner: AmqpTransport::connect_with(self.config.clone()).await?,
                created: self.created.clone(),
            }) as Arc<dyn Subscriber>)
        })
    }

    fn capabilities(&self) -> Capabilities {
        self.transport.capabilities()
    }

    fn create_channel<'a>(
        &'a self,
        channel: &'a ChannelName,
        partitions: u32,
    ) -> BoxFuture<'a, Result<()>> {
        if let Ok(mut c) = self.created.lock() {
            c.channels.insert(channel.clone());
        }
        Box::pin(self.transport.create_channel(channel, partitions))
    }
}

/// Delete what a test created (groups first, then channels).
pub(crate) async fn cleanup(transport: &AmqpTransport, created: &Created) {
    for (ch, g) in &created.groups {
        if let Err(e) = transport.delete_group(ch, g).await {
            eprintln!("clean-up: deleting group {g} on {ch} failed: {e}");
        }
    }
    for ch in &created.channels {
        if let Err(e) = transport.delete_channel(ch).await {
            eprintln!("clean-up: deleting channel {ch} failed: {e}");
        }
    }
}

impl Drop for AmqpFactory {
    fn drop(&mut self) {
        let created = match self.created.lock() {
            Ok(mut c) => std::mem::take(&mut *c),
            Err(_) => return,
        };
        if created.channels.is_empty() {
            return;
        }
        let config = self.config.clone();
        // Drop cannot await: clean up on a thread with its own runtime and connection.
        let done = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                match AmqpTransport::connect_with(config).await {
                    Ok(t) => cleanup(&t, &created).await,
                    Err(e) => eprintln!("clean-up: cannot connect: {e}"),
                }
            });
        });
        let _ = done.join();
    }
}
