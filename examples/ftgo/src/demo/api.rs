//! The demo's HTTP client for the three services' REST APIs.

use super::live::Placement;
use anyhow::Context as _;
use serde::Deserialize;
use std::time::{Duration, Instant};

/// Longest wait for one answer.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A reqwest client with a per-request timeout, on loopback without proxies.
#[derive(Debug, Clone)]
pub(crate) struct Api {
    client: reqwest::Client,
}

/// `GET /orders/{id}`, the part the demo reads.
#[derive(Debug, Deserialize)]
struct OrderView {
    state: String,
    #[serde(default)]
    reason: Option<String>,
}

/// The 202 of `POST /orders`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Accepted {
    order_id: String,
    state: String,
}

/// `{id}` of a 201.
#[derive(Debug, Deserialize)]
struct Created {
    id: String,
}

/// One `event: state` of `GET /orders/{id}/events`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct StateEvent {
    pub(crate) state: String,
    #[serde(default)]
    pub(crate) reason: Option<String>,
}

/// The body of an error answer, shortened for a message.
async fn describe(resp: reqwest::Response) -> String {
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    let body: String = body.chars().take(300).collect();
    format!("{status}: {body}")
}

impl Api {
    pub(crate) fn new() -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(2))
            .no_proxy()
            .pool_max_idle_per_host(64)
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Self { client })
    }

    /// POST `body` to `url`, expecting 201 `{id}`.
    async fn create(&self, url: &str, body: &serde_json::Value) -> anyhow::Result<String> {
        let resp = self
            .client
            .post(url)
            .json(body)
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        if resp.status() != reqwest::StatusCode::CREATED {
            anyhow::bail!("POST {url} answered {}", describe(resp).await);
        }
        Ok(resp
            .json::<Created>()
            .await
            .with_context(|| format!("POST {url}: the answer"))?
            .id)
    }

    /// `POST /consumers {name}` → the consumer id.
    pub(crate) async fn create_consumer(&self, base: &str, name: &str) -> anyhow::Result<String> {
        self.create(
            &format!("{base}/consumers"),
            &serde_json::json!({ "name": name }),
        )
        .await
    }

    /// `POST /consumers/{id}/suspend`.
    pub(crate) async fn suspend_consumer(&self, base: &str, id: &str) -> anyhow::Result<()> {
        let url = format!("{base}/consumers/{id}/suspend");
        let resp = self
            .client
            .post(&url)
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        if !resp.status().is_success() {
            anyhow::bail!("POST {url} answered {}", describe(resp).await);
        }
        Ok(())
    }

    /// `POST /restaurants {name, zones, menu}` → the restaurant id.
    pub(crate) async fn create_restaurant(
        &self,
        base: &str,
        body: &serde_json::Value,
    ) -> anyhow::Result<String> {
        self.create(&format!("{base}/restaurants"), body).await
    }

    /// `GET /replica/restaurants/{id}` on the order service is 200.
    pub(crate) async fn in_replica(&self, order_base: &str, id: &str) -> bool {
        let url = format!("{order_base}/replica/restaurants/{id}");
        matches!(self.client.get(url).send().await, Ok(r) if r.status().is_success())
    }

    /// `POST /orders` with `Idempotency-Key: key`: how it went and how long it took. A
    /// failure is anything but 202 PENDING, or no answer within [`REQUEST_TIMEOUT`].
    pub(crate) async fn place_order(
        &self,
        order_base: &str,
        key: &str,
        body: &serde_json::Value,
    ) -> (Placement, Duration) {
        let start = Instant::now();
        let sent = self
            .client
            .post(format!("{order_base}/orders"))
            .header("Idempotency-Key", key)
            .json(body)
            .send()
            .await;
        let placement = match sent {
            Err(e) => Placement::Failed(format!("no answer: {e}")),
            Ok(resp) if resp.status() == reqwest::StatusCode::ACCEPTED => {
                match resp.json::<Accepted>().await {
                    Ok(a) if a.state == "PENDING" => Placement::Accepted {
                        order_id: a.order_id,
                    },
                    Ok(a) => {
                        Placement::Failed(format!("202 with state {} instead of PENDING", a.state))
                    }
                    Err(e) => Placement::Failed(format!("202 with an unreadable body: {e}")),
                }
            }
            Ok(resp) => Placement::Failed(describe(resp).await),
        };
        (placement, start.elapsed())
    }

    /// `GET /orders/{id}` → `(state, reason)`.
    pub(crate) async fn order_state(
        &self,
        order_base: &str,
        id: &str,
    ) -> anyhow::Result<(String, Option<String>)> {
        let url = format!("{order_base}/orders/{id}");
        let resp = self
            .client
            .get(&url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        if !resp.status().is_success() {
            anyhow::bail!("GET {url} answered {}", describe(resp).await);
        }
        let v: OrderView = resp
            .json()
            .await
            .with_context(|| format!("GET {url}: the answer"))?;
        Ok((v.state, v.reason))
    }

    /// Every `event: state` of `GET /orders/{id}/events` until the server ends the stream
    /// (it does after VALIDATED or REJECTED).
    pub(crate) async fn state_events(
        &self,
        order_base: &str,
        id: &str,
    ) -> anyhow::Result<Vec<StateEvent>> {
        let url = format!("{order_base}/orders/{id}/events");
        let mut resp = self
            .client
            .get(&url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        if !resp.status().is_success() {
            anyhow::bail!("GET {url} answered {}", describe(resp).await);
        }
        let mut parser = SseParser::default();
        while let Some(chunk) = resp
            .chunk()
            .await
            .with_context(|| format!("GET {url}: the stream"))?
        {
            parser.push(&chunk);
        }
        parser.finish();
        parser
            .events
            .into_iter()
            .filter(|(event, _)| event == "state")
            .map(|(_, data)| {
                serde_json::from_str::<StateEvent>(&data)
                    .with_context(|| format!("GET {url}: an event that is not a state: {data}"))
            })
            .collect()
    }
}

/// Splits a `text/event-stream` body into `(event, data)` pairs.
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    buf: Vec<u8>,
    pub(crate) events: Vec<(String, String)>,
}

impl SseParser {
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buf.extend(bytes.iter().filter(|b| **b != b'\r'));
        while let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = self.buf.drain(..end + 2).collect();
            self.block(&String::from_utf8_lossy(&block));
        }
    }

    /// The last block, when the stream ended without a blank line.
    pub(crate) fn finish(&mut self) {
        let rest = std::mem::take(&mut self.buf);
        self.block(&String::from_utf8_lossy(&rest));
    }

    fn block(&mut self, block: &str) {
        let (mut event, mut data, mut any) = ("message".to_owned(), Vec::new(), false);
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                event = v.trim_start().to_owned();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push(v.strip_prefix(' ').unwrap_or(v).to_owned());
                any = true;
            }
        }
        if any {
            self.events.push((event, data.join("\n")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_split_across_chunks() {
        let mut p = SseParser::default();
        p.push(b"event: state\nid: 1\ndata: {\"state\":\"PEN");
        p.push(b"DING\"}\n\n: keep-alive\n\nevent: state\r\ndata: {\"state\":\"VALIDATED\"}\r\n");
        p.finish();
        assert_eq!(
            p.events,
            vec![
                ("state".to_owned(), "{\"state\":\"PENDING\"}".to_owned()),
                ("state".to_owned(), "{\"state\":\"VALIDATED\"}".to_owned()),
            ]
        );
    }
}
