//! The relay on SQLite: the shared relay suite (order, confirmation before delete, lease
//! and take-over, fencing, wake-ups, unreadable rows) on a `SqliteStore`, publishing to the
//! embedded broker, plus what only SQLite has.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use courier_core::transport::BoxFuture;
use courier_core::{ChannelName, Error, ErrorKind, Message, Publisher, Result};
use courier_sqlite::{SqliteBroker, SqliteStore};
use courier_testkit::relay_suite::{OpenTransaction, OutboxFactory};
use std::sync::Arc;

/// One service database file and one broker file in a temporary directory.
struct SqliteFactory {
    store: SqliteStore,
    broker: SqliteBroker,
    dir: tempfile::TempDir,
}

async fn factory() -> Option<SqliteFactory> {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path().join("svc.db")).await.unwrap();
    let broker = SqliteBroker::open(dir.path().join("broker.db"))
        .await
        .unwrap();
    Some(SqliteFactory { store, broker, dir })
}

courier_testkit::relay_tests!(factory());

fn storage(e: sqlx::Error) -> Error {
    Error::new(ErrorKind::Storage, e.to_string())
}

impl OutboxFactory for SqliteFactory {
    type Source = SqliteStore;

    /// The same file opened again, as another relay process would.
    fn source(&self) -> BoxFuture<'_, Result<SqliteStore>> {
        Box::pin(SqliteStore::open(self.dir.path().join("svc.db")))
    }

    fn commit<'a>(&'a self, messages: &'a [Message]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let mut tx = self.store.pool().begin().await.map_err(storage)?;
            self.store.outbox().send_all(&mut tx, messages).await?;
            tx.commit().await.map_err(storage)
        })
    }

    /// SQLite serialises writers: rowid order is commit order.
    fn begin_open<'a>(
        &'a self,
        _messages: &'a [Message],
    ) -> BoxFuture<'a, Result<Option<Box<dyn OpenTransaction>>>> {
        Box::pin(async { Ok(None) })
    }

    fn commit_unreadable<'a>(&'a self, channel: &'a ChannelName) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO courier_outbox (message_id, channel, headers, payload, created_at)
                 VALUES ('not-a-uuid', ?, '{}', x'00', 0)",
            )
            .bind(channel.as_str())
            .execute(self.store.pool())
            .await
            .map_err(storage)?;
            Ok(())
        })
    }

    fn outbox_len(&self) -> BoxFuture<'_, Result<u64>> {
        Box::pin(self.store.outbox_len())
    }

    fn publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(self.broker.clone())
    }

    fn arrived<'a>(&'a self, channel: &'a ChannelName) -> BoxFuture<'a, Result<Vec<Message>>> {
        Box::pin(async move {
            self.broker
                .read_after(channel, 0, 100_000)
                .await?
                .into_iter()
                .map(|(_, m)| m.map_err(|e| Error::new(ErrorKind::Decode, e.reason)))
                .collect()
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_has_partitions() {
    let f = factory().await.unwrap();
    assert!(f.broker.capabilities().partitions);
}
