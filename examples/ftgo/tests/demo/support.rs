//! Runs the three FTGO services as processes of the built `ftgo` binary (port 0, a
//! temporary directory, the embedded broker), killed when dropped, and small REST helpers
//! that wait for conditions with deadlines. Shared by tests/demo and tests/postgres.

use reqwest::StatusCode;
use serde_json::{Value, json};
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `ftgo` binary under test.
pub(crate) const FTGO: &str = env!("CARGO_BIN_EXE_ftgo");

/// How long a condition may take (a loaded 2-core CI machine).
pub(crate) const DEADLINE: Duration = Duration::from_secs(30);

/// One service process; SIGKILL and reaped on drop.
pub(crate) struct Service {
    child: Child,
    pub(crate) url: String,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Service {
    /// Start `ftgo <name> --db <db> --broker <broker> --listen 127.0.0.1:0` (its log in
    /// `<dir>/<name>.log`) and wait for its `listening on ADDR`.
    pub(crate) fn start(name: &str, db: &str, dir: &Path, broker: &str) -> Service {
        let log_path = dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).unwrap();
        let mut child = Command::new(FTGO)
            .arg(name)
            .arg("--db")
            .arg(db)
            .arg("--broker")
            .arg(broker)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.trim().to_owned());
                }
            }
        });
        let mut service = Service {
            child,
            url: String::new(),
        };
        match rx.recv_timeout(DEADLINE) {
            Ok(addr) => service.url = format!("http://{addr}"),
            Err(_) => panic!(
                "{name} did not print `listening on` within {DEADLINE:?}; its log:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            ),
        }
        service
    }
}

/// The three services on one embedded broker in a temporary directory.
pub(crate) struct Ftgo {
    pub(crate) restaurant: Service,
    pub(crate) consumer: Service,
    pub(crate) order: Service,
    pub(crate) dir: PathBuf,
    pub(crate) http: reqwest::Client,
    _tmp: tempfile::TempDir,
}

impl Ftgo {
    /// Each service on its own SQLite file, `<dir>/<name>.db`.
    pub(crate) fn start() -> Ftgo {
        Self::start_with(|dir, name| format!("sqlite:{}", dir.join(format!("{name}.db")).display()))
    }

    /// Each service on the database `db(dir, name)` names.
    pub(crate) fn start_with(db: impl Fn(&Path, &str) -> String) -> Ftgo {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        let broker = format!("sqlite:{}", dir.join("broker.db").display());
        let start = |name| Service::start(name, &db(&dir, name), &dir, &broker);
        let restaurant = start("restaurant-service");
        let consumer = start("consumer-service");
        let order = start("order-service");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .no_proxy()
            .build()
            .unwrap();
        Ftgo {
            restaurant,
            consumer,
            order,
            dir,
            http,
            _tmp: tmp,
        }
    }

    /// POST `body` (JSON) to `url`: the status and the JSON answer (`Null` when not JSON).
    pub(crate) async fn post(&self, url: &str, body: &Value) -> (StatusCode, Value) {
        self.send(self.http.post(url).json(body)).await
    }

    pub(crate) async fn send(&self, req: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub(crate) async fn get(&self, url: &str) -> (StatusCode, Value) {
        self.send(self.http.get(url)).await
    }

    /// A new consumer's id.
    pub(crate) async fn consumer(&self, name: &str) -> String {
        let (status, body) = self
            .post(
                &format!("{}/consumers", self.consumer.url),
                &json!({ "name": name }),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["id"].as_str().unwrap().to_owned()
    }

    /// A suspended consumer's id.
    pub(crate) async fn suspended_consumer(&self, name: &str) -> String {
        let id = self.consumer(name).await;
        let (status, body) = self
            .post(
                &format!("{}/consumers/{id}/suspend", self.consumer.url),
                &json!({}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        id
    }

    /// A restaurant serving `zones` with `menu` items `(id, price)`, once the order
    /// service's replica has it.
    pub(crate) async fn restaurant(&self, zones: &[&str], menu: &[(&str, f64)]) -> String {
        let (status, body) = self
            .post(
                &format!("{}/restaurants", self.restaurant.url),
                &json!({ "name": "Ajanta", "zones": zones, "menu": menu_json(menu) }),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let id = body["id"].as_str().unwrap().to_owned();
        self.until(&format!("{id} in order-service's replica"), || async {
            self.get(&format!("{}/replica/restaurants/{id}", self.order.url))
                .await
                .0
                == StatusCode::OK
        })
        .await;
        id
    }

    /// `POST /orders`, expecting 202 PENDING: the order id.
    pub(crate) async fn order(
        &self,
        consumer: &str,
        restaurant: &str,
        zone: &str,
        items: &[(&str, u32)],
    ) -> String {
        let (status, body) = self
            .post(
                &format!("{}/orders", self.order.url),
                &order_json(consumer, restaurant, zone, items),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        assert_eq!(body["state"], "PENDING", "{body}");
        body["orderId"].as_str().unwrap().to_owned()
    }

    /// The order once VALIDATED or REJECTED.
    pub(crate) async fn final_order(&self, id: &str) -> Value {
        let url = format!("{}/orders/{id}", self.order.url);
        let mut last = Value::Null;
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            let (status, body) = self.get(&url).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            if body["state"] == "VALIDATED" || body["state"] == "REJECTED" {
                return body;
            }
            last = body;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("order {id} not final within {DEADLINE:?}: {last}");
    }

    /// Wait until `condition` holds, polling; panics naming `what` after [`DEADLINE`].
    pub(crate) async fn until<F, Fut>(&self, what: &str, mut condition: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = Instant::now() + DEADLINE;
        while !condition().await {
            assert!(Instant::now() < deadline, "not within {DEADLINE:?}: {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

pub(crate) fn menu_json(menu: &[(&str, f64)]) -> Value {
    menu.iter()
        .map(|(id, price)| json!({ "id": id, "name": format!("the {id}"), "price": price }))
        .collect()
}

pub(crate) fn order_json(
    consumer: &str,
    restaurant: &str,
    zone: &str,
    items: &[(&str, u32)],
) -> Value {
    json!({
        "consumerId": consumer,
        "restaurantId": restaurant,
        "deliveryZone": zone,
        "lineItems": items.iter()
            .map(|(id, q)| json!({ "menuItemId": id, "quantity": q }))
            .collect::<Vec<_>>(),
    })
}

/// The `event: state` data of an order's SSE stream, read until the server ends it.
pub(crate) async fn state_events(f: &Ftgo, id: &str) -> Vec<Value> {
    let mut resp = f
        .http
        .get(format!("{}/orders/{id}/events", f.order.url))
        .timeout(DEADLINE)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    let mut text = String::new();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    text.split("\n\n")
        .filter(|block| block.lines().any(|l| l == "event: state"))
        .filter_map(|block| block.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(|data| serde_json::from_str(data).unwrap())
        .collect()
}
