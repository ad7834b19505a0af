//! Bad files: a corrupt database, a missing directory, a bad URL give a clear error
//! naming the file and what to do, never a panic.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use courier_core::ErrorKind;
use courier_sqlite::{SqliteBroker, SqliteStore};

#[tokio::test]
async fn a_file_that_is_not_a_database_is_refused_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("garbage.db");
    std::fs::write(&path, vec![0xAB; 8192]).unwrap();
    let e = SqliteStore::open(&path).await.unwrap_err();
    let text = e.to_string();
    assert!(text.contains("garbage.db"), "{text}");
    assert!(
        !e.is_retryable(),
        "a corrupt file does not heal by retrying: {e:?}"
    );
    let e = SqliteBroker::open(&path).await.unwrap_err();
    assert!(e.to_string().contains("garbage.db"), "{e}");
}

#[tokio::test]
async fn a_missing_directory_says_what_to_create() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope").join("svc.db");
    let e = SqliteStore::open(&path).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(
        e.to_string().contains("does not exist; create it first"),
        "{e}"
    );
}

#[tokio::test]
async fn a_url_without_a_file_is_a_config_error() {
    let e = SqliteBroker::connect("sqlite:").await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(e.to_string().contains("expected sqlite:PATH"), "{e}");
}

#[tokio::test]
async fn reopening_an_existing_store_keeps_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("svc.db");
    {
        let store = SqliteStore::open(&path).await.unwrap();
        let mut tx = store.begin().await.unwrap();
        let m = courier_core::Message::new("x").to(courier_core::ChannelName::new("c").unwrap());
        store.outbox().send(&mut tx, m).await.unwrap();
        tx.commit().await.unwrap();
    }
    let store = SqliteStore::open(&path).await.unwrap();
    assert_eq!(store.outbox_len().await.unwrap(), 1);
    // A transaction dropped without commit rolls back and frees the writer.
    {
        let mut tx = store.begin().await.unwrap();
        let m = courier_core::Message::new("y").to(courier_core::ChannelName::new("c").unwrap());
        store.outbox().send(&mut tx, m).await.unwrap();
    }
    let tx = store.begin().await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(store.outbox_len().await.unwrap(), 1);
}
