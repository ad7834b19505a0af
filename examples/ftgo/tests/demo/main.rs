//! `ftgo demo` end to end, and the services' REST behaviour the demo relies on, against
//! real processes of the built binary on loopback.

// Tests: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use reqwest::StatusCode;
use serde_json::{Value, json};
use std::process::Command;
use support::{FTGO, Ftgo, menu_json, order_json, state_events};

#[test]
fn demo_places_orders_through_an_outage_and_reports_json() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(FTGO)
        .args([
            "demo", "--orders", "40", "--outage", "2", "--rate", "40", "--json", "--dir",
        ])
        .arg(tmp.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one JSON object on stdout, got:\n{stdout}");
    let r: Value = serde_json::from_str(lines[0]).unwrap();
    for field in [
        "orders",
        "validated",
        "rejected",
        "pending",
        "failed_requests",
        "post_orders_p99_ms",
        "outage_seconds",
        "post_orders_p99_ms_during_outage",
        "unexpected",
        "seconds",
        "backlog_drain_seconds",
        "broker",
    ] {
        assert!(r.get(field).is_some(), "no {field} in {r}");
    }
    let n = |f: &str| {
        r[f].as_u64()
            .unwrap_or_else(|| panic!("{f} is not a count in {r}"))
    };
    assert_eq!(n("orders"), 40, "{r}");
    assert_eq!(n("failed_requests"), 0, "{r}");
    assert_eq!(n("pending"), 0, "{r}");
    assert_eq!(n("unexpected"), 0, "{r}");
    assert_eq!(n("validated") + n("rejected"), 40, "{r}");
    assert!(n("validated") > 0 && n("rejected") > 0, "{r}");
    assert!(n("orders_during_outage") > 0, "{r}");
    assert!(r["outage_seconds"].as_f64().unwrap() >= 2.0, "{r}");
    assert!(r["post_orders_p99_ms"].as_f64().unwrap() > 0.0, "{r}");
    assert_eq!(r["ok"], true, "{r}");
    // The timeline went to stderr.
    assert!(stderr.contains("kill -9 consumer-service"), "{stderr}");
    assert!(stderr.contains("consumer-service back on"), "{stderr}");
}

#[test]
fn demo_refuses_to_wipe_a_directory_it_did_not_make() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("notes.txt"), "mine").unwrap();
    let out = Command::new(FTGO)
        .args(["demo", "--orders", "1", "--dir"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not made by `ftgo demo`"));
    assert!(tmp.path().join("notes.txt").exists());
}

#[tokio::test]
async fn orders_are_rejected_for_what_is_wrong_with_them() {
    let f = Ftgo::start();
    let ann = f.consumer("Ann").await;
    let sam = f.suspended_consumer("Sam").await;
    let r = f
        .restaurant(&["north"], &[("dal", 8.5), ("naan", 3.0)])
        .await;

    let valid = f.order(&ann, &r, "north", &[("dal", 2)]).await;
    let unknown = f
        .order("no-such-consumer", &r, "north", &[("dal", 1)])
        .await;
    let suspended = f.order(&sam, &r, "north", &[("dal", 1)]).await;
    let not_on_menu = f
        .order(&ann, &r, "north", &[("dal", 1), ("pizza", 1)])
        .await;
    let zone = f.order(&ann, &r, "harbour", &[("dal", 1)]).await;

    let v = f.final_order(&valid).await;
    assert_eq!(v["state"], "VALIDATED", "{v}");
    assert_eq!(v["total"], 17.0, "{v}");
    for (id, names) in [
        (&unknown, "no-such-consumer"),
        (&suspended, "suspended"),
        (&not_on_menu, "pizza"),
        (&zone, "harbour"),
    ] {
        let o = f.final_order(id).await;
        assert_eq!(o["state"], "REJECTED", "{o}");
        let reason = o["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains(names),
            "the reason {reason:?} should name {names}"
        );
    }
}

#[tokio::test]
async fn an_item_dropped_from_the_menu_is_rejected_even_when_the_replica_is_stale() {
    let f = Ftgo::start();
    let ann = f.consumer("Ann").await;
    let r = f
        .restaurant(&["north"], &[("dal", 8.5), ("naan", 3.0)])
        .await;
    let (status, body) = f
        .send(
            f.http
                .put(format!("{}/restaurants/{r}/menu", f.restaurant.url))
                .json(&json!({ "menu": menu_json(&[("dal", 8.5)]) })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // At once: the order service takes it (its replica may still list naan) ...
    let id = f.order(&ann, &r, "north", &[("naan", 1)]).await;
    // ... and the restaurant service, which has the current menu, rejects it.
    let o = f.final_order(&id).await;
    assert_eq!(o["state"], "REJECTED", "{o}");
    assert!(
        o["reason"].as_str().unwrap_or_default().contains("naan"),
        "{o}"
    );
}

#[tokio::test]
async fn a_menu_revision_reaches_the_replica() {
    let f = Ftgo::start();
    let r = f
        .restaurant(&["north"], &[("dal", 8.5), ("naan", 3.0)])
        .await;
    let (status, body) = f
        .send(
            f.http
                .put(format!("{}/restaurants/{r}/menu", f.restaurant.url))
                .json(&json!({ "menu": menu_json(&[("dal", 9.0), ("kulfi", 4.0)]) })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, shown) = f
        .get(&format!("{}/restaurants/{r}", f.restaurant.url))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(shown["menu"].as_array().map(Vec::len), Some(2), "{shown}");
    let url = format!("{}/replica/restaurants/{r}", f.order.url);
    f.until("the revised menu in order-service's replica", || async {
        let (_, replica) = f.get(&url).await;
        let ids: Vec<&str> = replica["menu"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["id"].as_str())
            .collect();
        ids == ["dal", "kulfi"]
    })
    .await;
}

#[tokio::test]
async fn one_idempotency_key_places_one_order() {
    let f = Ftgo::start();
    let ann = f.consumer("Ann").await;
    let r = f.restaurant(&["north"], &[("dal", 8.5)]).await;
    let body = order_json(&ann, &r, "north", &[("dal", 1)]);
    let place = |body: &Value| {
        f.send(
            f.http
                .post(format!("{}/orders", f.order.url))
                .header("Idempotency-Key", "key-1")
                .json(body),
        )
    };
    let (s1, first) = place(&body).await;
    let (s2, second) = place(&body).await;
    assert_eq!(
        (s1, s2),
        (StatusCode::ACCEPTED, StatusCode::ACCEPTED),
        "{first} {second}"
    );
    assert_eq!(first["orderId"], second["orderId"]);

    let other = order_json(&ann, &r, "north", &[("dal", 2)]);
    let (s3, refused) = place(&other).await;
    assert_eq!(s3, StatusCode::UNPROCESSABLE_ENTITY, "{refused}");
    assert_eq!(refused["field"], "Idempotency-Key", "{refused}");
    assert!(refused["error"].is_string(), "{refused}");

    // One row in the order service's own database.
    let db = format!(
        "sqlite:{}?mode=ro",
        f.dir.join("order-service.db").display()
    );
    let pool = sqlx::sqlite::SqlitePool::connect(&db).await.unwrap();
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM orders WHERE consumer_id = ?")
        .bind(&ann)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, 1);
    let id = first["orderId"].as_str().unwrap();
    assert_eq!(f.final_order(id).await["state"], "VALIDATED");
}

#[tokio::test]
async fn the_event_stream_goes_from_pending_to_validated() {
    let f = Ftgo::start();
    let ann = f.consumer("Ann").await;
    let r = f.restaurant(&["north"], &[("dal", 8.5)]).await;
    let id = f.order(&ann, &r, "north", &[("dal", 1)]).await;
    let events = state_events(&f, &id).await;
    let states: Vec<&str> = events
        .iter()
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    assert_eq!(states.len(), 3, "{states:?}");
    assert_eq!(states[0], "PENDING");
    assert!(
        ["CONSUMER_VALIDATED", "ORDER_DETAILS_VALIDATED"].contains(&states[1]),
        "{states:?}"
    );
    assert_eq!(states[2], "VALIDATED");
    assert!(events.iter().all(|e| e["orderId"] == id.as_str()));

    let rejected = f
        .order("no-such-consumer", &r, "north", &[("dal", 1)])
        .await;
    let events = state_events(&f, &rejected).await;
    let last = events.last().unwrap();
    assert_eq!(last["state"], "REJECTED");
    assert!(
        last["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("no-such-consumer")
    );
    assert_eq!(
        events.iter().filter(|e| e["state"] == "REJECTED").count(),
        1
    );
}

#[tokio::test]
async fn bad_input_is_a_4xx_json_error_naming_the_field() {
    let f = Ftgo::start();
    let ann = f.consumer("Ann").await;
    let r = f.restaurant(&["north"], &[("dal", 8.5)]).await;
    let orders = format!("{}/orders", f.order.url);
    let raw = |body: String| {
        f.send(
            f.http
                .post(&orders)
                .header("content-type", "application/json")
                .body(body),
        )
    };
    let with_quantity = |q: i64| {
        let mut o = order_json(&ann, &r, "north", &[("dal", 1)]);
        o["lineItems"][0]["quantity"] = json!(q);
        o
    };
    let mut missing = order_json(&ann, &r, "north", &[("dal", 1)]);
    missing.as_object_mut().unwrap().remove("restaurantId");
    // (what, (status, body) answered, status expected, field expected)
    type Case<'a> = (&'a str, (StatusCode, Value), StatusCode, Option<&'a str>);
    let cases: Vec<Case> = vec![
        (
            "malformed JSON",
            raw("{not json".into()).await,
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            "missing field",
            f.post(&orders, &missing).await,
            StatusCode::BAD_REQUEST,
            Some("restaurantId"),
        ),
        (
            "negative quantity",
            f.post(&orders, &with_quantity(-1)).await,
            StatusCode::BAD_REQUEST,
            Some("lineItems[0].quantity"),
        ),
        (
            "quantity 0",
            f.post(&orders, &with_quantity(0)).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("lineItems[0].quantity"),
        ),
        (
            "unknown restaurant",
            f.post(
                &orders,
                &order_json(&ann, "no-such-restaurant", "north", &[("dal", 1)]),
            )
            .await,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("restaurantId"),
        ),
        (
            "body over 64 KiB",
            raw(format!("{{\"consumerId\": \"{}\"}}", "x".repeat(70 * 1024))).await,
            StatusCode::PAYLOAD_TOO_LARGE,
            None,
        ),
    ];
    for (what, (status, body), expected, field) in cases {
        assert_eq!(status, expected, "{what}: {body}");
        assert!(status.is_client_error(), "{what}: {status}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: {body}"
        );
        match field {
            Some(field) => assert_eq!(body["field"], field, "{what}: {body}"),
            None => assert!(body.get("field").is_none(), "{what}: {body}"),
        }
    }
    // The other services answer bad input the same way, never with a 500.
    let (status, body) = f
        .send(
            f.http
                .post(format!("{}/restaurants", f.restaurant.url))
                .header("content-type", "application/json")
                .body("[1, 2"),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = f
        .post(
            &format!("{}/consumers", f.consumer.url),
            &json!({ "name": "" }),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["field"], "name", "{body}");
}

#[tokio::test]
async fn every_service_serves_its_openapi_document() {
    let f = Ftgo::start();
    for (service, paths) in [
        (
            &f.restaurant,
            &[
                "/restaurants",
                "/restaurants/{id}",
                "/restaurants/{id}/menu",
            ][..],
        ),
        (
            &f.consumer,
            &["/consumers", "/consumers/{id}", "/consumers/{id}/suspend"][..],
        ),
        (
            &f.order,
            &[
                "/orders",
                "/orders/{id}",
                "/orders/{id}/events",
                "/replica/restaurants/{id}",
            ][..],
        ),
    ] {
        let (status, doc) = f.get(&format!("{}/openapi.json", service.url)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(doc["openapi"], "3.1.0", "{doc}");
        for path in paths {
            assert!(
                doc["paths"].get(*path).is_some(),
                "{} has no {path}",
                service.url
            );
        }
        let (status, health) = f.get(&format!("{}/health", service.url)).await;
        assert_eq!(status, StatusCode::OK, "{health}");
    }
}

#[test]
fn order_service_prints_its_asyncapi_document() {
    let out = Command::new(FTGO)
        .args(["order-service", "asyncapi"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8_lossy(&out.stdout);
    assert!(yaml.contains("asyncapi: 3.0.0"), "{yaml}");
    assert!(yaml.contains("ValidateConsumerInfo"), "{yaml}");
}
