//! `ftgo`: the FTGO reference system on Courier. Three services, each its own process
//! with its own database, talking only through Courier messages, and `ftgo demo`, which
//! runs them, places orders, kills one service for a while and proves every order still
//! ends in its expected state.

mod common;
mod consumer;
mod contracts;
mod db;
mod demo;
mod openapi;
mod order;
mod restaurant;

use clap::{Parser, Subcommand};

/// The FTGO food-delivery reference system, built on Courier.
///
/// Start here: `ftgo demo` runs the three services as separate processes on the embedded
/// SQLite default (files under ./.ftgo-demo/), places orders at a steady rate, kills
/// consumer-service for a while (kill -9), keeps placing orders, restarts it, and exits 0
/// only when every order reached its expected state exactly once.
///
/// Each service also runs on its own: `ftgo order-service --listen 127.0.0.1:8083`
/// (defaults: databases under ./.ftgo/, one shared broker file ./.ftgo/broker.db);
/// `--db postgres://…` keeps a service's tables and Courier's in PostgreSQL instead.
/// `ftgo <service> asyncapi` prints the service's AsyncAPI document; each service serves
/// its OpenAPI document at /openapi.json.
#[derive(Debug, Parser)]
#[command(name = "ftgo", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run all three services, place orders through an outage of consumer-service, and
    /// check every order's final state.
    Demo(demo::DemoArgs),
    /// Restaurants, menus and delivery zones; validates order details.
    RestaurantService(common::ServiceArgs),
    /// Consumers; validates that a consumer may order.
    ConsumerService(common::ServiceArgs),
    /// Orders: answers POST /orders at once from local data, finishes through messages.
    OrderService(common::ServiceArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Cmd::Demo(args) => demo::run(args).await,
            Cmd::RestaurantService(args) => restaurant::main(args).await.map(|()| 0),
            Cmd::ConsumerService(args) => consumer::main(args).await.map(|()| 0),
            Cmd::OrderService(args) => order::main(args).await.map(|()| 0),
        }
    });
    match result {
        Ok(code) => std::process::ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
