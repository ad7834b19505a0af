//! `ftgo consumer-service`: consumers; answers `ValidateConsumerInfo`.

use crate::common::{self, ApiError, JsonBody, Service, ServiceArgs, Validate};
use crate::contracts::*;
use crate::openapi::{OpenApi, error_ref};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use courier::sqlite::SqliteStore;
use courier::{Dispatcher, GroupName, HandlerContext, HandlerError, Rejection, ServiceDescription};
use serde::{Deserialize, Serialize};

const NAME: &str = "consumer-service";

/// `POST /consumers`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateConsumer {
    pub(crate) name: String,
}

impl Validate for CreateConsumer {
    fn validate(&self) -> Result<(), ApiError> {
        if self.name.trim().is_empty() || self.name.len() > 200 {
            return Err(ApiError::invalid("name", "expected 1 to 200 characters"));
        }
        Ok(())
    }
}

/// A consumer as `GET /consumers/{id}` shows it.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub(crate) struct ConsumerView {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) suspended: bool,
}

/// `201 {id}`.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
pub(crate) struct Created {
    pub(crate) id: String,
}

async fn create_tables(store: &SqliteStore) -> anyhow::Result<()> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS consumers (id TEXT PRIMARY KEY, name TEXT NOT NULL,
           suspended INTEGER NOT NULL DEFAULT 0)",
    )
    .execute(store.pool())
    .await?;
    Ok(())
}

async fn create(
    State(store): State<SqliteStore>,
    JsonBody(body): JsonBody<CreateConsumer>,
) -> Result<(StatusCode, Json<Created>), ApiError> {
    let id = common::new_id();
    let mut tx = store.begin().await?;
    sqlx::query("INSERT INTO consumers (id, name) VALUES (?, ?)")
        .bind(&id)
        .bind(&body.name)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(Created { id })))
}

async fn find(store: &SqliteStore, id: &str) -> Result<ConsumerView, ApiError> {
    let row =
        sqlx::query_as::<_, (String, i64)>("SELECT name, suspended FROM consumers WHERE id = ?")
            .bind(id)
            .fetch_optional(store.pool())
            .await?;
    match row {
        Some((name, suspended)) => Ok(ConsumerView {
            id: id.to_owned(),
            name,
            suspended: suspended != 0,
        }),
        None => Err(ApiError::not_found(format!("no consumer {id}"))),
    }
}

async fn show(
    State(store): State<SqliteStore>,
    Path(id): Path<String>,
) -> Result<Json<ConsumerView>, ApiError> {
    Ok(Json(find(&store, &id).await?))
}

async fn suspend(
    State(store): State<SqliteStore>,
    Path(id): Path<String>,
) -> Result<Json<ConsumerView>, ApiError> {
    let mut tx = store.begin().await?;
    let n = sqlx::query("UPDATE consumers SET suspended = 1 WHERE id = ?")
        .bind(&id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    tx.commit().await?;
    if n == 0 {
        return Err(ApiError::not_found(format!("no consumer {id}")));
    }
    Ok(Json(find(&store, &id).await?))
}

/// Known and not suspended, or why not.
async fn validate_consumer(
    ctx: HandlerContext<SqliteStore>,
    cmd: ValidateConsumerInfo,
) -> Result<Result<ConsumerValidated, Rejection>, HandlerError> {
    let row = sqlx::query_scalar::<_, i64>("SELECT suspended FROM consumers WHERE id = ?")
        .bind(&cmd.consumer_id)
        .fetch_optional(&mut *ctx.tx().await)
        .await?;
    Ok(match row {
        None => Err(Rejection::new(format!(
            "unknown consumer {}",
            cmd.consumer_id
        ))),
        Some(s) if s != 0 => Err(Rejection::new(format!(
            "consumer {} is suspended",
            cmd.consumer_id
        ))),
        Some(_) => Ok(ConsumerValidated {
            consumer_id: cmd.consumer_id,
        }),
    })
}

fn openapi() -> serde_json::Value {
    let mut api = OpenApi::new("FTGO consumer-service");
    let (create_s, view_s, created_s) = (
        api.schema::<CreateConsumer>(),
        api.schema::<ConsumerView>(),
        api.schema::<Created>(),
    );
    api.op(
        "post",
        "/consumers",
        "Register a consumer",
        Some(create_s),
        &[
            (201, "Created", Some(created_s)),
            (400, "Malformed body", Some(error_ref())),
            (422, "A field is out of range", Some(error_ref())),
        ],
    )
    .op(
        "get",
        "/consumers/{id}",
        "A consumer",
        None,
        &[
            (200, "The consumer", Some(view_s.clone())),
            (404, "No such consumer", Some(error_ref())),
        ],
    )
    .op(
        "post",
        "/consumers/{id}/suspend",
        "Suspend a consumer (later orders are rejected)",
        None,
        &[
            (200, "The consumer", Some(view_s)),
            (404, "No such consumer", Some(error_ref())),
        ],
    );
    api.build()
}

pub(crate) fn description() -> ServiceDescription {
    ServiceDescription::new(NAME)
        .describe("Consumers; validates that a consumer may order.")
        .handles_command::<ValidateConsumerInfo>(NAME)
}

pub(crate) async fn main(args: ServiceArgs) -> anyhow::Result<()> {
    common::init_logging();
    if common::asyncapi_requested(&args, &description())? {
        return Ok(());
    }
    let svc = Service::open(NAME, &args, 8082).await?;
    create_tables(&svc.store).await?;
    let d = Dispatcher::new(svc.store.clone(), GroupName::new(NAME)?).on_command(validate_consumer);
    let subs = vec![
        svc.subscribe(<ValidateConsumerInfo as courier::Command>::CHANNEL)
            .await?,
    ];
    let doc = openapi();
    let app = Router::new()
        .route("/consumers", post(create))
        .route("/consumers/{id}", get(show))
        .route("/consumers/{id}/suspend", post(suspend))
        .route("/health", get(common::health))
        .route("/openapi.json", get(move || async move { Json(doc) }))
        .with_state(svc.store.clone());
    svc.serve(app, d, subs).await
}
