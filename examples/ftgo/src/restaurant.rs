//! `ftgo restaurant-service`: restaurants, menus and delivery zones. Publishes
//! `RestaurantCreated` / `MenuRevised`; answers `ValidateOrderDetails`.

use crate::common::{self, ApiError, JsonBody, Opened, Service, ServiceArgs, Validate};
use crate::contracts::*;
use crate::db::{Conn, ServiceDb, create_tables, query, query_as};
use crate::openapi::{OpenApi, error_ref};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use courier::{Dispatcher, GroupName, HandlerContext, HandlerError, Rejection, ServiceDescription};
use serde::{Deserialize, Serialize};
use sqlx::AssertSqlSafe;
use std::collections::HashSet;

const NAME: &str = "restaurant-service";

/// A menu item in the REST API (price in currency units).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct MenuItemBody {
    /// Unique within the restaurant.
    pub(crate) id: String,
    pub(crate) name: String,
    /// Price, e.g. 12.5.
    pub(crate) price: f64,
}

/// `POST /restaurants`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(crate) struct CreateRestaurant {
    pub(crate) name: String,
    /// Delivery zones served.
    pub(crate) zones: Vec<String>,
    pub(crate) menu: Vec<MenuItemBody>,
}

/// `PUT /restaurants/{id}/menu`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub(crate) struct ReviseMenu {
    pub(crate) menu: Vec<MenuItemBody>,
}

/// A restaurant as `GET /restaurants/{id}` shows it.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub(crate) struct RestaurantView {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) zones: Vec<String>,
    pub(crate) menu: Vec<MenuItemBody>,
}

/// `201 {id}`.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub(crate) struct Created {
    pub(crate) id: String,
}

fn text(field: &str, value: &str) -> Result<(), ApiError> {
    if value.trim().is_empty() || value.len() > 200 {
        return Err(ApiError::invalid(field, "expected 1 to 200 characters"));
    }
    Ok(())
}

fn validate_menu(menu: &[MenuItemBody]) -> Result<(), ApiError> {
    if menu.is_empty() || menu.len() > 500 {
        return Err(ApiError::invalid("menu", "expected 1 to 500 items"));
    }
    let mut ids = HashSet::new();
    for (i, item) in menu.iter().enumerate() {
        text(&format!("menu[{i}].id"), &item.id)?;
        text(&format!("menu[{i}].name"), &item.name)?;
        common::cents(&format!("menu[{i}].price"), item.price)?;
        if !ids.insert(item.id.as_str()) {
            return Err(ApiError::invalid(
                format!("menu[{i}].id"),
                format!("duplicate menu item id {:?}", item.id),
            ));
        }
    }
    Ok(())
}

impl Validate for CreateRestaurant {
    fn validate(&self) -> Result<(), ApiError> {
        text("name", &self.name)?;
        if self.zones.is_empty() || self.zones.len() > 100 {
            return Err(ApiError::invalid(
                "zones",
                "expected 1 to 100 delivery zones",
            ));
        }
        for (i, z) in self.zones.iter().enumerate() {
            text(&format!("zones[{i}]"), z)?;
        }
        validate_menu(&self.menu)
    }
}

impl Validate for ReviseMenu {
    fn validate(&self) -> Result<(), ApiError> {
        validate_menu(&self.menu)
    }
}

fn to_items(menu: &[MenuItemBody]) -> Vec<MenuItem> {
    menu.iter()
        .map(|m| MenuItem {
            id: m.id.clone(),
            name: m.name.clone(),
            price_cents: (m.price * 100.0).round() as i64,
        })
        .collect()
}

/// The service's tables (`zones` is a JSON array; `ordinal` keeps the menu's order).
const TABLES: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS restaurants (id TEXT PRIMARY KEY, name TEXT NOT NULL, zones TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS menu_items (restaurant_id TEXT NOT NULL, id TEXT NOT NULL,
       name TEXT NOT NULL, price_cents BIGINT NOT NULL, ordinal BIGINT NOT NULL,
       PRIMARY KEY (restaurant_id, id))",
];

/// Replace `restaurant`'s rows in `table` (`menu_items` here, `replica_menu` in the order
/// service's replica: the same columns) with `menu`, keeping its order. `table` is one of
/// those two names, never input.
pub(crate) async fn write_menu<C: Conn + ?Sized>(
    conn: &mut C,
    table: &'static str,
    restaurant: &str,
    menu: &[MenuItem],
) -> Result<(), sqlx::Error> {
    query(AssertSqlSafe(format!(
        "DELETE FROM {table} WHERE restaurant_id = $1"
    )))
    .bind(restaurant)
    .execute(&mut *conn)
    .await?;
    let insert = format!(
        "INSERT INTO {table} (restaurant_id, id, name, price_cents, ordinal)
         VALUES ($1, $2, $3, $4, $5)"
    );
    for (ordinal, m) in (0i64..).zip(menu) {
        query(AssertSqlSafe(insert.clone()))
            .bind(restaurant)
            .bind(&m.id)
            .bind(&m.name)
            .bind(m.price_cents)
            .bind(ordinal)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// The restaurant's zones and menu, if it exists.
async fn load<C: Conn + ?Sized>(
    conn: &mut C,
    id: &str,
) -> Result<Option<(String, Vec<String>, Vec<MenuItem>)>, sqlx::Error> {
    let Some((name, zones)) =
        query_as::<(String, String)>("SELECT name, zones FROM restaurants WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?
    else {
        return Ok(None);
    };
    let menu = query_as::<(String, String, i64)>(
        "SELECT id, name, price_cents FROM menu_items WHERE restaurant_id = $1 ORDER BY ordinal",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(|(id, name, price_cents)| MenuItem {
        id,
        name,
        price_cents,
    })
    .collect();
    Ok(Some((
        name,
        serde_json::from_str(&zones).unwrap_or_default(),
        menu,
    )))
}

async fn create<S: ServiceDb>(
    State(store): State<S>,
    JsonBody(body): JsonBody<CreateRestaurant>,
) -> Result<(StatusCode, Json<Created>), ApiError> {
    let id = common::new_id();
    let menu = to_items(&body.menu);
    let mut tx = store.begin().await?;
    query("INSERT INTO restaurants (id, name, zones) VALUES ($1, $2, $3)")
        .bind(&id)
        .bind(&body.name)
        .bind(serde_json::to_string(&body.zones).unwrap_or_default())
        .execute(&mut *tx)
        .await?;
    write_menu(&mut *tx, "menu_items", &id, &menu).await?;
    store
        .publish_event(
            &mut tx,
            &RestaurantCreated {
                restaurant_id: id.clone(),
                name: body.name,
                zones: body.zones,
                menu,
            },
        )
        .await?;
    store.commit(tx).await?;
    Ok((StatusCode::CREATED, Json(Created { id })))
}

async fn revise_menu<S: ServiceDb>(
    State(store): State<S>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ReviseMenu>,
) -> Result<Json<RestaurantView>, ApiError> {
    let menu = to_items(&body.menu);
    let mut tx = store.begin().await?;
    let Some((name, zones, _)) = load(&mut *tx, &id).await? else {
        return Err(ApiError::not_found(format!("no restaurant {id}")));
    };
    write_menu(&mut *tx, "menu_items", &id, &menu).await?;
    store
        .publish_event(
            &mut tx,
            &MenuRevised {
                restaurant_id: id.clone(),
                menu,
            },
        )
        .await?;
    store.commit(tx).await?;
    Ok(Json(RestaurantView {
        id,
        name,
        zones,
        menu: body.menu,
    }))
}

async fn show<S: ServiceDb>(
    State(store): State<S>,
    Path(id): Path<String>,
) -> Result<Json<RestaurantView>, ApiError> {
    let mut conn = store.acquire().await?;
    let Some((name, zones, menu)) = load(&mut *conn, &id).await? else {
        return Err(ApiError::not_found(format!("no restaurant {id}")));
    };
    Ok(Json(RestaurantView {
        id,
        name,
        zones,
        menu: menu
            .into_iter()
            .map(|m| MenuItemBody {
                id: m.id,
                name: m.name,
                price: common::units(m.price_cents),
            })
            .collect(),
    }))
}

/// Every item on the current menu and the zone served, or the reason why not.
async fn validate_order<S: ServiceDb>(
    ctx: HandlerContext<S>,
    cmd: ValidateOrderDetails,
) -> Result<Result<OrderDetailsValidated, Rejection>, HandlerError> {
    let found = load(&mut *ctx.tx().await, &cmd.restaurant_id).await?;
    let Some((name, zones, menu)) = found else {
        return Ok(Err(Rejection::new(format!(
            "unknown restaurant {}",
            cmd.restaurant_id
        ))));
    };
    if !zones.contains(&cmd.delivery_zone) {
        return Ok(Err(Rejection::new(format!(
            "{name} does not deliver to zone {}",
            cmd.delivery_zone
        ))));
    }
    let mut total = 0i64;
    for line in &cmd.line_items {
        let Some(item) = menu.iter().find(|m| m.id == line.menu_item_id) else {
            return Ok(Err(Rejection::new(format!(
                "menu item {} is not on the menu of {name}",
                line.menu_item_id
            ))));
        };
        total += item.price_cents * i64::from(line.quantity);
    }
    Ok(Ok(OrderDetailsValidated {
        order_id: cmd.order_id,
        total_cents: total,
    }))
}

fn openapi() -> serde_json::Value {
    let mut api = OpenApi::new("FTGO restaurant-service");
    let (create_s, revise_s, view_s, created_s) = (
        api.schema::<CreateRestaurant>(),
        api.schema::<ReviseMenu>(),
        api.schema::<RestaurantView>(),
        api.schema::<Created>(),
    );
    api.op(
        "post",
        "/restaurants",
        "Create a restaurant (publishes RestaurantCreated)",
        Some(create_s),
        &[
            (201, "Created", Some(created_s)),
            (400, "Malformed body", Some(error_ref())),
            (422, "A field is out of range", Some(error_ref())),
        ],
    )
    .op(
        "put",
        "/restaurants/{id}/menu",
        "Replace the menu (publishes MenuRevised)",
        Some(revise_s),
        &[
            (200, "The restaurant", Some(view_s.clone())),
            (404, "No such restaurant", Some(error_ref())),
            (422, "A field is out of range", Some(error_ref())),
        ],
    )
    .op(
        "get",
        "/restaurants/{id}",
        "A restaurant",
        None,
        &[
            (200, "The restaurant", Some(view_s)),
            (404, "No such restaurant", Some(error_ref())),
        ],
    );
    api.build()
}

fn dispatcher<S: ServiceDb>(store: S) -> anyhow::Result<Dispatcher<S>> {
    Ok(Dispatcher::new(store, GroupName::new(NAME)?).on_command(validate_order::<S>))
}

pub(crate) fn description() -> ServiceDescription {
    ServiceDescription::new(NAME)
        .describe("Restaurants, menus and delivery zones; validates order details.")
        .publishes::<RestaurantCreated>()
        .publishes::<MenuRevised>()
        .handles_command::<ValidateOrderDetails>(NAME)
}

pub(crate) async fn main(args: ServiceArgs) -> anyhow::Result<()> {
    common::init_logging();
    if common::asyncapi_requested(&args, &description())? {
        return Ok(());
    }
    match common::open(NAME, &args, 8081).await? {
        Opened::Sqlite(svc) => run(svc).await,
        Opened::Postgres(svc) => run(svc).await,
    }
}

async fn run<S: ServiceDb>(svc: Service<S>) -> anyhow::Result<()> {
    create_tables(&svc.store, TABLES).await?;
    let d = dispatcher(svc.store.clone())?;
    let subs = vec![
        svc.subscribe(<ValidateOrderDetails as courier::Command>::CHANNEL)
            .await?,
    ];
    let doc = openapi();
    let app = Router::new()
        .route("/restaurants", post(create::<S>))
        .route("/restaurants/{id}", get(show::<S>))
        .route("/restaurants/{id}/menu", put(revise_menu::<S>))
        .route("/health", get(common::health))
        .route("/openapi.json", get(move || async move { Json(doc) }))
        .with_state(svc.store.clone());
    svc.serve(app, d, subs).await
}
