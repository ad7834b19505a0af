//! `ftgo consumer-service`: consumers; answers `ValidateConsumerInfo`.

use crate::common::{self, ApiError, JsonBody, Opened, Service, ServiceArgs, Validate};
use crate::contracts::*;
use crate::db::{ServiceDb, create_tables, query, query_as, query_scalar};
use crate::openapi::{OpenApi, error_ref};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
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

/// The service's tables (`suspended` is 0 or 1).
const TABLES: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS consumers (id TEXT PRIMARY KEY, name TEXT NOT NULL,
       suspended BIGINT NOT NULL DEFAULT 0)",
];

async fn create<S: ServiceDb>(
    State(store): State<S>,
    JsonBody(body): JsonBody<CreateConsumer>,
) -> Result<(StatusCode, Json<Created>), ApiError> {
    let id = common::new_id();
    let mut tx = store.begin().await?;
    query("INSERT INTO consumers (id, name) VALUES ($1, $2)")
        .bind(&id)
        .bind(&body.name)
        .execute(&mut *tx)
        .await?;
    store.commit(tx).await?;
    Ok((StatusCode::CREATED, Json(Created { id })))
}

async fn find<S: ServiceDb>(store: &S, id: &str) -> Result<ConsumerView, ApiError> {
    let row = query_as::<(String, i64)>("SELECT name, suspended FROM consumers WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut *store.acquire().await?)
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

async fn show<S: ServiceDb>(
    State(store): State<S>,
    Path(id): Path<String>,
) -> Result<Json<ConsumerView>, ApiError> {
    Ok(Json(find(&store, &id).await?))
}

async fn suspend<S: ServiceDb>(
    State(store): State<S>,
    Path(id): Path<String>,
) -> Result<Json<ConsumerView>, ApiError> {
    let mut tx = store.begin().await?;
    let n = query("UPDATE consumers SET suspended = 1 WHERE id = $1")
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    store.commit(tx).await?;
    if n == 0 {
        return Err(ApiError::not_found(format!("no consumer {id}")));
    }
    Ok(Json(find(&store, &id).await?))
}

/// Known and not suspended, or why not.
async fn validate_consumer<S: ServiceDb>(
    ctx: HandlerContext<S>,
    cmd: ValidateConsumerInfo,
) -> Result<Result<ConsumerValidated, Rejection>, HandlerError> {
    let row = query_scalar::<i64>("SELECT suspended FROM consumers WHERE id = $1")
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
    match common::open(NAME, &args, 8082).await? {
        Opened::Sqlite(svc) => run(svc).await,
        Opened::Postgres(svc) => run(svc).await,
    }
}

async fn run<S: ServiceDb>(svc: Service<S>) -> anyhow::Result<()> {
    create_tables(&svc.store, TABLES).await?;
    let d = Dispatcher::new(svc.store.clone(), GroupName::new(NAME)?)
        .on_command(validate_consumer::<S>);
    let subs = vec![
        svc.subscribe(<ValidateConsumerInfo as courier::Command>::CHANNEL)
            .await?,
    ];
    let doc = openapi();
    let app = Router::new()
        .route("/consumers", post(create::<S>))
        .route("/consumers/{id}", get(show::<S>))
        .route("/consumers/{id}/suspend", post(suspend::<S>))
        .route("/health", get(common::health))
        .route("/openapi.json", get(move || async move { Json(doc) }))
        .with_state(svc.store.clone());
    svc.serve(app, d, subs).await
}
