//! Seeding through the REST APIs: consumers (one suspended), restaurants with zones and
//! menus, then waiting until the order service's replica has every restaurant.

use super::api::Api;
use super::plan::{CONSUMERS, RESTAURANTS, SUSPENDED_CONSUMER, Seeded};
use std::time::Duration;

/// How long the restaurant events may take to reach the order service's replica.
pub(crate) const REPLICA_DEADLINE: Duration = Duration::from_secs(30);

/// Base URLs of the three services.
#[derive(Debug, Clone)]
pub(crate) struct Urls {
    pub(crate) restaurant: String,
    pub(crate) consumer: String,
    pub(crate) order: String,
}

/// Create the consumers and restaurants and wait for the replica.
pub(crate) async fn seed(api: &Api, urls: &Urls) -> anyhow::Result<Seeded> {
    let mut consumers = Vec::new();
    for name in CONSUMERS {
        consumers.push(api.create_consumer(&urls.consumer, name).await?);
    }
    let suspended = api
        .create_consumer(&urls.consumer, SUSPENDED_CONSUMER)
        .await?;
    api.suspend_consumer(&urls.consumer, &suspended).await?;
    let mut restaurants = Vec::new();
    for r in &RESTAURANTS {
        let body = serde_json::json!({
            "name": r.name,
            "zones": r.zones,
            "menu": r.menu.iter()
                .map(|(id, name, price)| serde_json::json!({ "id": id, "name": name, "price": price }))
                .collect::<Vec<_>>(),
        });
        restaurants.push(api.create_restaurant(&urls.restaurant, &body).await?);
    }
    let deadline = tokio::time::Instant::now() + REPLICA_DEADLINE;
    for (id, r) in restaurants.iter().zip(&RESTAURANTS) {
        while !api.in_replica(&urls.order, id).await {
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "restaurant {} ({id}) did not reach order-service's replica within {} s: \
                     GET {}/replica/restaurants/{id} is still not 200. Restaurant events \
                     travel restaurant-service → broker → order-service; see the services' logs",
                    r.name,
                    REPLICA_DEADLINE.as_secs(),
                    urls.order
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(Seeded {
        consumers,
        suspended,
        restaurants,
    })
}
