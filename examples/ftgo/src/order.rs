//! `ftgo order-service`: answers `POST /orders` at once from local data (a replica of
//! restaurants and menus built from restaurant events), writes the order and both
//! validation commands in ONE transaction, and finishes through the replies.
//!
//! Decision: the replica prices the order (the 202's `total`), but only the restaurant
//! service rejects items and zones. A replica is eventually consistent: an item the
//! restaurant has just added may not have reached it, and rejecting on it would refuse a
//! valid order. An unknown restaurant is refused at once (422): nothing can be priced.
//! The final total is the restaurant's (`OrderDetailsValidated.total_cents`).

use crate::common::{self, ApiError, JsonBody, Opened, Service, ServiceArgs, Validate};
use crate::contracts::*;
use crate::db::{Conn, ServiceDb, create_tables, query, query_as, query_scalar};
use crate::openapi::{OpenApi, error_ref};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::{get, post};
use axum::{Json, Router};
use courier::{
    ChannelName, CommandReply, Correlation, Dispatcher, GroupName, HandlerContext, HandlerError,
    Outcome, ServiceDescription,
};
use serde::{Deserialize, Serialize};
use std::time::Duration;

const NAME: &str = "order-service";
/// How long the order service waits for each validation before rejecting the order.
const VALIDATION_DEADLINE: Duration = Duration::from_secs(600);

/// `POST /orders`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct PlaceOrder {
    pub(crate) consumer_id: String,
    pub(crate) restaurant_id: String,
    pub(crate) delivery_zone: String,
    pub(crate) line_items: Vec<LineItemBody>,
}

/// One line of `POST /orders`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct LineItemBody {
    pub(crate) menu_item_id: String,
    /// 1 to 1000.
    pub(crate) quantity: u32,
}

impl Validate for PlaceOrder {
    fn validate(&self) -> Result<(), ApiError> {
        for (field, v) in [
            ("consumerId", &self.consumer_id),
            ("restaurantId", &self.restaurant_id),
            ("deliveryZone", &self.delivery_zone),
        ] {
            if v.trim().is_empty() || v.len() > 200 {
                return Err(ApiError::invalid(field, "expected 1 to 200 characters"));
            }
        }
        if self.line_items.is_empty() || self.line_items.len() > 100 {
            return Err(ApiError::invalid(
                "lineItems",
                "expected 1 to 100 line items",
            ));
        }
        for (i, l) in self.line_items.iter().enumerate() {
            if l.menu_item_id.trim().is_empty() || l.menu_item_id.len() > 200 {
                return Err(ApiError::invalid(
                    format!("lineItems[{i}].menuItemId"),
                    "expected 1 to 200 characters",
                ));
            }
            if l.quantity == 0 || l.quantity > 1000 {
                return Err(ApiError::invalid(
                    format!("lineItems[{i}].quantity"),
                    format!("expected 1 to 1000, got {}", l.quantity),
                ));
            }
        }
        Ok(())
    }
}

/// `202` answer of `POST /orders`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct OrderAccepted {
    pub(crate) order_id: String,
    pub(crate) state: String,
    /// Priced from the replica of the restaurant's menu.
    pub(crate) total: f64,
}

/// An order as `GET /orders/{id}` shows it.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct OrderView {
    pub(crate) order_id: String,
    /// PENDING, CONSUMER_VALIDATED, ORDER_DETAILS_VALIDATED, VALIDATED or REJECTED.
    pub(crate) state: String,
    pub(crate) total: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
    pub(crate) consumer_id: String,
    pub(crate) restaurant_id: String,
    pub(crate) delivery_zone: String,
    pub(crate) line_items: Vec<LineItemBody>,
}

/// One state change, as `GET /orders/{id}/events` streams it.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StateEvent {
    pub(crate) order_id: String,
    pub(crate) state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
}

/// The replica of a restaurant, `GET /replica/restaurants/{id}`.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub(crate) struct ReplicaView {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) zones: Vec<String>,
    pub(crate) menu: Vec<MenuItem>,
}

/// The service's tables (`zones` and `line_items` are JSON arrays; `ordinal` keeps the
/// menu's order; `consumer_ok` and `details_ok` are 0 or 1).
const TABLES: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS replica_restaurants (id TEXT PRIMARY KEY, name TEXT NOT NULL, zones TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS replica_menu (restaurant_id TEXT NOT NULL, id TEXT NOT NULL,
       name TEXT NOT NULL, price_cents BIGINT NOT NULL, ordinal BIGINT NOT NULL,
       PRIMARY KEY (restaurant_id, id))",
    "CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, consumer_id TEXT NOT NULL,
       restaurant_id TEXT NOT NULL, delivery_zone TEXT NOT NULL, line_items TEXT NOT NULL,
       total_cents BIGINT NOT NULL, state TEXT NOT NULL, reason TEXT,
       consumer_ok BIGINT NOT NULL DEFAULT 0, details_ok BIGINT NOT NULL DEFAULT 0,
       created_at_ms BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS order_history (seq {auto_id},
       order_id TEXT NOT NULL, state TEXT NOT NULL, reason TEXT, at_ms BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS order_history_by_order ON order_history (order_id, seq)",
    "CREATE TABLE IF NOT EXISTS idempotency (key TEXT PRIMARY KEY, request TEXT NOT NULL,
       response TEXT NOT NULL)",
];

#[derive(Clone)]
struct AppState<S> {
    store: S,
    replies: ChannelName,
}

async fn place<S: ServiceDb>(
    State(app): State<AppState<S>>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<PlaceOrder>,
) -> Result<(StatusCode, Json<OrderAccepted>), ApiError> {
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => match v.to_str() {
            Ok(k) if !k.trim().is_empty() && k.len() <= 200 => Some(k.to_owned()),
            _ => {
                return Err(ApiError::invalid(
                    "Idempotency-Key",
                    "expected 1 to 200 visible ASCII characters",
                ));
            }
        },
    };
    let request = serde_json::to_string(&body).unwrap_or_default();
    let store = &app.store;
    let mut tx = store.begin().await?;
    if let Some(key) = &key {
        let seen = query_as::<(String, String)>(
            "SELECT request, response FROM idempotency WHERE key = $1",
        )
        .bind(key)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((first_request, response)) = seen {
            if first_request != request {
                return Err(ApiError::invalid(
                    "Idempotency-Key",
                    "this key was used for a different order; use a new key per order",
                ));
            }
            let first: OrderAccepted = serde_json::from_str(&response)
                .map_err(|e| ApiError::unavailable(format!("stored answer unreadable: {e}")))?;
            return Ok((StatusCode::ACCEPTED, Json(first)));
        }
    }
    // Price from the replica; only an unknown restaurant is refused here.
    let known = query_scalar::<String>("SELECT name FROM replica_restaurants WHERE id = $1")
        .bind(&body.restaurant_id)
        .fetch_optional(&mut *tx)
        .await?;
    if known.is_none() {
        return Err(ApiError::invalid(
            "restaurantId",
            format!(
                "unknown restaurant {} (not in this service's replica of restaurant events)",
                body.restaurant_id
            ),
        ));
    }
    let mut total = 0i64;
    for l in &body.line_items {
        let price = query_scalar::<i64>(
            "SELECT price_cents FROM replica_menu WHERE restaurant_id = $1 AND id = $2",
        )
        .bind(&body.restaurant_id)
        .bind(&l.menu_item_id)
        .fetch_optional(&mut *tx)
        .await?;
        total += price.unwrap_or(0) * i64::from(l.quantity);
    }
    let order_id = common::new_id();
    let line_items: Vec<LineItem> = body
        .line_items
        .iter()
        .map(|l| LineItem {
            menu_item_id: l.menu_item_id.clone(),
            quantity: l.quantity,
        })
        .collect();
    query(
        "INSERT INTO orders (id, consumer_id, restaurant_id, delivery_zone, line_items,
           total_cents, state, created_at_ms) VALUES ($1, $2, $3, $4, $5, $6, 'PENDING', $7)",
    )
    .bind(&order_id)
    .bind(&body.consumer_id)
    .bind(&body.restaurant_id)
    .bind(&body.delivery_zone)
    .bind(serde_json::to_string(&body.line_items).unwrap_or_default())
    .bind(total)
    .bind(courier::now_ms() as i64)
    .execute(&mut *tx)
    .await?;
    history(&mut *tx, &order_id, "PENDING", None).await?;
    let correlation = || -> Result<Correlation, ApiError> {
        Ok(Correlation::new()
            .data(&order_id)?
            .deadline_in(VALIDATION_DEADLINE)
            .key(order_id.clone()))
    };
    store
        .send_command(
            &mut tx,
            &app.replies,
            &ValidateConsumerInfo {
                order_id: order_id.clone(),
                consumer_id: body.consumer_id.clone(),
            },
            correlation()?,
        )
        .await?;
    store
        .send_command(
            &mut tx,
            &app.replies,
            &ValidateOrderDetails {
                order_id: order_id.clone(),
                restaurant_id: body.restaurant_id.clone(),
                delivery_zone: body.delivery_zone.clone(),
                line_items,
            },
            correlation()?,
        )
        .await?;
    store
        .publish_event(
            &mut tx,
            &OrderStateChanged {
                order_id: order_id.clone(),
                state: "PENDING".into(),
                reason: None,
            },
        )
        .await?;
    let accepted = OrderAccepted {
        order_id,
        state: "PENDING".into(),
        total: common::units(total),
    };
    if let Some(key) = &key {
        query("INSERT INTO idempotency (key, request, response) VALUES ($1, $2, $3)")
            .bind(key)
            .bind(&request)
            .bind(serde_json::to_string(&accepted).unwrap_or_default())
            .execute(&mut *tx)
            .await?;
    }
    store.commit(tx).await?;
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}

async fn history<C: Conn + ?Sized>(
    conn: &mut C,
    order_id: &str,
    state: &str,
    reason: Option<&str>,
) -> Result<(), sqlx::Error> {
    query("INSERT INTO order_history (order_id, state, reason, at_ms) VALUES ($1, $2, $3, $4)")
        .bind(order_id)
        .bind(state)
        .bind(reason)
        .bind(courier::now_ms() as i64)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

async fn load<S: ServiceDb>(store: &S, id: &str) -> Result<OrderView, ApiError> {
    let row = query_as::<(String, i64, Option<String>, String, String, String, String)>(
        "SELECT state, total_cents, reason, consumer_id, restaurant_id, delivery_zone, line_items
         FROM orders WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(&mut *store.acquire().await?)
    .await?;
    let Some((state, total, reason, consumer_id, restaurant_id, delivery_zone, items)) = row else {
        return Err(ApiError::not_found(format!("no order {id}")));
    };
    Ok(OrderView {
        order_id: id.to_owned(),
        state,
        total: common::units(total),
        reason,
        consumer_id,
        restaurant_id,
        delivery_zone,
        line_items: serde_json::from_str(&items).unwrap_or_default(),
    })
}

async fn show<S: ServiceDb>(
    State(app): State<AppState<S>>,
    Path(id): Path<String>,
) -> Result<Json<OrderView>, ApiError> {
    Ok(Json(load(&app.store, &id).await?))
}

fn terminal(state: &str) -> bool {
    state == "VALIDATED" || state == "REJECTED"
}

/// Server-sent events: every state the order went through, then each new one, until it
/// is VALIDATED or REJECTED.
async fn events<S: ServiceDb>(
    State(app): State<AppState<S>>,
    Path(id): Path<String>,
) -> Result<Sse<impl futures::Stream<Item = Result<Event, std::convert::Infallible>>>, ApiError> {
    load(&app.store, &id).await?;
    let store = app.store.clone();
    let stream = futures::stream::unfold(
        (store, id, 0i64, Vec::<Event>::new(), false),
        |(store, id, mut after, mut queued, mut done)| async move {
            loop {
                if let Some(ev) = queued.pop() {
                    return Some((Ok(ev), (store, id, after, queued, done)));
                }
                if done {
                    return None;
                }
                let rows = history_since(&store, &id, after).await.unwrap_or_default();
                for (seq, state, reason) in rows {
                    after = seq;
                    done |= terminal(&state);
                    let data = serde_json::to_string(&StateEvent {
                        order_id: id.clone(),
                        state,
                        reason,
                    })
                    .unwrap_or_default();
                    queued.insert(
                        0,
                        Event::default()
                            .event("state")
                            .id(seq.to_string())
                            .data(data),
                    );
                }
                if queued.is_empty() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// The order's states after `seq`, oldest first: `(seq, state, reason)`.
async fn history_since<S: ServiceDb>(
    store: &S,
    order_id: &str,
    seq: i64,
) -> Result<Vec<(i64, String, Option<String>)>, sqlx::Error> {
    query_as(
        "SELECT seq, state, reason FROM order_history WHERE order_id = $1 AND seq > $2 ORDER BY seq",
    )
    .bind(order_id)
    .bind(seq)
    .fetch_all(&mut *store.acquire().await?)
    .await
}

async fn replica<S: ServiceDb>(
    State(app): State<AppState<S>>,
    Path(id): Path<String>,
) -> Result<Json<ReplicaView>, ApiError> {
    let mut conn = app.store.acquire().await?;
    let row =
        query_as::<(String, String)>("SELECT name, zones FROM replica_restaurants WHERE id = $1")
            .bind(&id)
            .fetch_optional(&mut *conn)
            .await?;
    let Some((name, zones)) = row else {
        return Err(ApiError::not_found(format!(
            "restaurant {id} is not in the replica (yet)"
        )));
    };
    let menu = query_as::<(String, String, i64)>(
        "SELECT id, name, price_cents FROM replica_menu WHERE restaurant_id = $1 ORDER BY ordinal",
    )
    .bind(&id)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|(id, name, price_cents)| MenuItem {
        id,
        name,
        price_cents,
    })
    .collect();
    Ok(Json(ReplicaView {
        id,
        name,
        zones: serde_json::from_str(&zones).unwrap_or_default(),
        menu,
    }))
}

// ---- the replica, from restaurant events --------------------------------------------

async fn on_restaurant_created<S: ServiceDb>(
    ctx: HandlerContext<S>,
    e: RestaurantCreated,
) -> Result<(), HandlerError> {
    let mut conn = ctx.tx().await;
    query(
        "INSERT INTO replica_restaurants (id, name, zones) VALUES ($1, $2, $3)
         ON CONFLICT (id) DO UPDATE SET name = excluded.name, zones = excluded.zones",
    )
    .bind(&e.restaurant_id)
    .bind(&e.name)
    .bind(serde_json::to_string(&e.zones).unwrap_or_default())
    .execute(&mut *conn)
    .await?;
    crate::restaurant::write_menu(&mut *conn, "replica_menu", &e.restaurant_id, &e.menu).await?;
    Ok(())
}

async fn on_menu_revised<S: ServiceDb>(
    ctx: HandlerContext<S>,
    e: MenuRevised,
) -> Result<(), HandlerError> {
    crate::restaurant::write_menu(
        &mut *ctx.tx().await,
        "replica_menu",
        &e.restaurant_id,
        &e.menu,
    )
    .await?;
    Ok(())
}

// ---- the saga's replies --------------------------------------------------------------

/// Which validation a reply answers.
#[derive(Clone, Copy)]
enum Check {
    Consumer,
    Details,
}

/// Move the order on after one validation's outcome (in the reply's transaction).
async fn advance<S: ServiceDb>(
    ctx: &HandlerContext<S>,
    order_id: &str,
    check: Check,
    outcome: Result<Option<i64>, String>,
) -> Result<(), HandlerError> {
    let mut conn = ctx.tx().await;
    let row = query_as::<(String, i64, i64)>(
        "SELECT state, consumer_ok, details_ok FROM orders WHERE id = $1",
    )
    .bind(order_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((state, consumer_ok, details_ok)) = row else {
        return Err(HandlerError::permanent(format!(
            "a reply for order {order_id}, which does not exist"
        )));
    };
    if terminal(&state) {
        return Ok(()); // already rejected by the other validation
    }
    let (mut c, mut d) = (consumer_ok != 0, details_ok != 0);
    let (next, reason) = match outcome {
        Err(reason) => ("REJECTED", Some(reason)),
        Ok(total) => {
            match check {
                Check::Consumer => c = true,
                Check::Details => d = true,
            }
            if let Some(total) = total {
                query("UPDATE orders SET total_cents = $1 WHERE id = $2")
                    .bind(total)
                    .bind(order_id)
                    .execute(&mut *conn)
                    .await?;
            }
            let next = match (c, d) {
                (true, true) => "VALIDATED",
                (true, false) => "CONSUMER_VALIDATED",
                _ => "ORDER_DETAILS_VALIDATED",
            };
            (next, None)
        }
    };
    // Only from the state read above: when another transaction moved the order on since
    // (PostgreSQL runs them side by side: a second instance, the deadline timer), no row
    // matches and the reply is handled again, from the new state.
    let changed = query(
        "UPDATE orders SET state = $1, reason = $2, consumer_ok = $3, details_ok = $4
         WHERE id = $5 AND state = $6 AND consumer_ok = $7 AND details_ok = $8",
    )
    .bind(next)
    .bind(&reason)
    .bind(i64::from(c))
    .bind(i64::from(d))
    .bind(order_id)
    .bind(&state)
    .bind(consumer_ok)
    .bind(details_ok)
    .execute(&mut *conn)
    .await?;
    if changed == 0 {
        return Err(HandlerError::transient(format!(
            "order {order_id} changed while a reply was handled; retrying"
        )));
    }
    history(&mut *conn, order_id, next, reason.as_deref()).await?;
    drop(conn);
    ctx.publish_event(&OrderStateChanged {
        order_id: order_id.to_owned(),
        state: next.to_owned(),
        reason,
    })?;
    Ok(())
}

fn timed_out(who: &str) -> String {
    format!(
        "{who} did not answer within {} s",
        VALIDATION_DEADLINE.as_secs()
    )
}

async fn on_consumer_reply<S: ServiceDb>(
    ctx: HandlerContext<S>,
    r: CommandReply<ValidateConsumerInfo>,
) -> Result<(), HandlerError> {
    let order_id: String = r.data()?;
    let outcome = match r.outcome {
        Outcome::Replied(_) => Ok(None),
        Outcome::Failed(f) => Err(f.reason),
        Outcome::TimedOut => Err(timed_out("consumer-service")),
    };
    advance(&ctx, &order_id, Check::Consumer, outcome).await
}

async fn on_details_reply<S: ServiceDb>(
    ctx: HandlerContext<S>,
    r: CommandReply<ValidateOrderDetails>,
) -> Result<(), HandlerError> {
    let order_id: String = r.data()?;
    let outcome = match r.outcome {
        Outcome::Replied(v) => Ok(Some(v.total_cents)),
        Outcome::Failed(f) => Err(f.reason),
        Outcome::TimedOut => Err(timed_out("restaurant-service")),
    };
    advance(&ctx, &order_id, Check::Details, outcome).await
}

fn openapi() -> serde_json::Value {
    let mut api = OpenApi::new("FTGO order-service");
    let (place_s, accepted_s, view_s, replica_s) = (
        api.schema::<PlaceOrder>(),
        api.schema::<OrderAccepted>(),
        api.schema::<OrderView>(),
        api.schema::<ReplicaView>(),
    );
    api.op("post", "/orders", "Place an order: answered at once (PENDING), validated through messages. \
            Send an Idempotency-Key header to make retries safe.", Some(place_s),
        &[(202, "Accepted, PENDING", Some(accepted_s)), (400, "Malformed body", Some(error_ref())),
          (413, "Body too large", Some(error_ref())), (422, "A field is out of range or the restaurant is unknown", Some(error_ref()))])
        .op("get", "/orders/{id}", "An order and its state", None,
        &[(200, "The order", Some(view_s)), (404, "No such order", Some(error_ref()))])
        .op("get", "/orders/{id}/events", "Server-sent events (event: state) with each state of the order until VALIDATED or REJECTED", None,
        &[(200, "text/event-stream", None), (404, "No such order", Some(error_ref()))])
        .op("get", "/replica/restaurants/{id}", "This service's replica of a restaurant (built from restaurant events)", None,
        &[(200, "The replica", Some(replica_s)), (404, "Not (yet) in the replica", Some(error_ref()))]);
    api.build()
}

pub(crate) fn description() -> ServiceDescription {
    ServiceDescription::new(NAME)
        .describe(
            "Orders: answers POST /orders at once from local data, finishes through messages.",
        )
        .sends_command::<ValidateConsumerInfo>()
        .sends_command::<ValidateOrderDetails>()
        .receives_replies::<ValidateConsumerInfo>(ORDER_REPLIES, NAME)
        .receives_replies::<ValidateOrderDetails>(ORDER_REPLIES, NAME)
        .publishes::<OrderStateChanged>()
        .subscribes::<RestaurantCreated>(NAME)
        .subscribes::<MenuRevised>(NAME)
}

pub(crate) async fn main(args: ServiceArgs) -> anyhow::Result<()> {
    common::init_logging();
    if common::asyncapi_requested(&args, &description())? {
        return Ok(());
    }
    match common::open(NAME, &args, 8083).await? {
        Opened::Sqlite(svc) => run(svc).await,
        Opened::Postgres(svc) => run(svc).await,
    }
}

async fn run<S: ServiceDb>(svc: Service<S>) -> anyhow::Result<()> {
    create_tables(&svc.store, TABLES).await?;
    let replies = ChannelName::new(ORDER_REPLIES)?;
    let d = Dispatcher::new(svc.store.clone(), GroupName::new(NAME)?)
        .replies_to(replies.clone())
        .on_reply(on_consumer_reply::<S>)
        .on_reply(on_details_reply::<S>)
        .on_event(on_restaurant_created::<S>)
        .on_event(on_menu_revised::<S>);
    let subs = vec![
        svc.subscribe(ORDER_REPLIES).await?,
        svc.subscribe(<RestaurantCreated as courier::DomainEvent>::AGGREGATE)
            .await?,
    ];
    let doc = openapi();
    let state = AppState {
        store: svc.store.clone(),
        replies,
    };
    let app = Router::new()
        .route("/orders", post(place::<S>))
        .route("/orders/{id}", get(show::<S>))
        .route("/orders/{id}/events", get(events::<S>))
        .route("/replica/restaurants/{id}", get(replica::<S>))
        .route("/health", get(common::health))
        .route("/openapi.json", get(move || async move { Json(doc) }))
        .with_state(state);
    svc.serve(app, d, subs).await
}
