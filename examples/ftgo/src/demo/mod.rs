//! `ftgo demo`: runs the three services as separate processes, seeds them, places orders
//! on a steady schedule, kills consumer-service (kill -9) for a while and keeps placing
//! orders, restarts it, and checks that every order reached its expected state exactly
//! once. Exit code 0 only then; 1 when an order did not; 2 when the demo could not run.
//!
//! One file per piece: [`plan`] (what is seeded and ordered, when), [`services`] (the
//! child processes), [`seed`], [`place`] (the schedule), [`track`] (polling and the final
//! checks), [`live`] (shared state), [`view`] (stderr), [`report`] (stdout).

mod api;
mod dir;
mod live;
mod place;
mod plan;
mod report;
mod seed;
mod services;
mod track;
mod view;

use anyhow::Context as _;
use live::{Live, Outage};
use place::{Phase, Placer};
use plan::{OrderSpec, Schedule};
use services::{ServiceProcess, ServiceSpec};
use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use track::Tracker;
use view::View;

/// Options of `ftgo demo`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Exit code: 0 when every order reached its expected state exactly once \
    (checked by GET /orders/{id} and by each order's event stream), 1 when one did not (the \
    summary lists why), 2 when the demo could not run, 130 on Ctrl-C. The services are \
    killed on every exit.\n\nExample: ftgo demo --orders 1000 --rate 100 --outage 10"
)]
pub(crate) struct DemoArgs {
    /// How many orders to place. One in five is meant to be rejected (a suspended or an
    /// unknown consumer, an item not on the restaurant's menu, a zone it does not serve);
    /// the others must end VALIDATED.
    #[arg(long, value_name = "N", default_value_t = 200,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    orders: u32,

    /// How long consumer-service is down, in seconds (0 = no outage). After about a
    /// quarter of the orders it is killed with SIGKILL (kill -9: none of its shutdown code
    /// runs); orders keep coming and are all answered 202 PENDING; then it is restarted on
    /// the same database, broker and address and works off the backlog.
    #[arg(long, value_name = "SECONDS", default_value_t = 5.0, value_parser = outage_seconds)]
    outage: f64,

    /// Orders offered per second, each sent at its slot on a fixed schedule whatever the
    /// earlier answers took. During the outage the orders are spread over its whole
    /// length, more slowly than this when too few are left to fill it at this rate.
    #[arg(long, value_name = "R", default_value_t = 50.0, value_parser = orders_per_second)]
    rate: f64,

    /// Working directory: each service's database (<service>.db), the embedded broker
    /// (broker.db) and each service's log (<service>.log). WIPED at the start of every
    /// run, so each run starts fresh; the files stay afterwards for a look. A non-empty
    /// directory the demo did not make (no .ftgo-demo file inside) is refused, not wiped.
    #[arg(long, value_name = "PATH", default_value = ".ftgo-demo")]
    dir: PathBuf,

    /// The broker all three services use: sqlite:FILE (embedded; the default is
    /// sqlite:<dir>/broker.db), nats://HOST:4222, amqp://USER:PASS@HOST:5672/%2f. Only the
    /// embedded default is wiped with --dir: give a server broker fresh for a clean run.
    #[arg(long, value_name = "URL")]
    broker: Option<String>,

    /// Print one JSON object on stdout (orders, validated, rejected, pending,
    /// failed_requests, post_orders_p99_ms, outage_seconds, ...) instead of the summary
    /// table; progress goes to stderr as plain lines.
    #[arg(long)]
    json: bool,

    /// After the summary, keep the three services running and print their URLs, to try
    /// their REST APIs (GET /openapi.json on each); Ctrl-C stops them.
    #[arg(long)]
    keep: bool,
}

fn outage_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("expected seconds from 0 to 3600, got {s:?}")),
    }
}

fn orders_per_second(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=10_000.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "expected orders per second from 0.1 to 10000, got {s:?}"
        )),
    }
}

/// Run the demo; the exit code: 0 when every order reached its expected state exactly
/// once, 1 when not, 130 on Ctrl-C.
pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<i32> {
    let started = Instant::now();
    let view = Arc::new(View::new(
        started,
        std::io::stderr().is_terminal() && !args.json,
    ));
    // Dropping the demo's future drops the service processes, which kills them.
    let ran = tokio::select! {
        r = demo(&args, started, view.clone()) => r.inspect_err(|_| view.clear())?,
        _ = tokio::signal::ctrl_c() => {
            view.clear();
            view.note("interrupted: stopping the services");
            return Ok(130);
        }
    };
    let (code, services) = ran;
    if args.keep {
        eprintln!("\nthe services keep running (Ctrl-C stops them):");
        for s in &services {
            eprintln!(
                "  {:<19} {}  (log {})",
                s.spec.name,
                s.url(),
                s.spec.log.display()
            );
        }
        let _ = tokio::signal::ctrl_c().await;
    }
    drop(services);
    Ok(code)
}

/// Everything up to the report; returns the exit code and the running services.
async fn demo(
    args: &DemoArgs,
    started: Instant,
    view: Arc<View>,
) -> anyhow::Result<(i32, Vec<ServiceProcess>)> {
    dir::prepare(&args.dir)?;
    let broker = args
        .broker
        .clone()
        .unwrap_or_else(|| format!("sqlite:{}", args.dir.join("broker.db").display()));
    let shown_broker = courier::connect::redact(&broker);
    let spec = |name| ServiceSpec::new(name, &args.dir, &broker);
    let any_port = SocketAddr::from(([127, 0, 0, 1], 0));

    // The first service creates the embedded broker's file; the other two then start
    // side by side.
    let restaurant = ServiceProcess::start(&spec("restaurant-service"), any_port).await?;
    let (consumer_spec, order_spec) = (spec("consumer-service"), spec("order-service"));
    let (consumer, order) = tokio::try_join!(
        ServiceProcess::start(&consumer_spec, any_port),
        ServiceProcess::start(&order_spec, any_port),
    )?;
    for s in [&restaurant, &consumer, &order] {
        view.note(&format!(
            "{} listening on {} (pid {}, log {})",
            s.spec.name,
            s.addr,
            s.pid().unwrap_or_default(),
            s.spec.log.display()
        ));
    }
    view.note(&format!("broker {shown_broker}"));
    let mut services = [restaurant, consumer, order];
    let urls = seed::Urls {
        restaurant: services[0].url(),
        consumer: services[1].url(),
        order: services[2].url(),
    };

    let api = api::Api::new()?;
    let seeded = seed::seed(&api, &urls).await?;
    view.note(&format!(
        "seeded {} consumers (one suspended) and {} restaurants; order-service's replica has them",
        seeded.consumers.len() + 1,
        seeded.restaurants.len()
    ));

    let specs = (0..args.orders)
        .map(|i| OrderSpec::new(i, &seeded))
        .collect();
    let live = Arc::new(Live::new(started, specs)?);
    let schedule = Schedule::new(args.orders, args.rate, Duration::from_secs_f64(args.outage));
    view.note(&format!("plan: {}", schedule.describe()));
    let tracker = Tracker {
        api: api.clone(),
        order_url: urls.order.clone(),
        live: live.clone(),
    };
    let mut background = JoinSet::new();
    view.start(args.orders);
    background.spawn(view.clone().follow(live.clone()));
    background.spawn(tracker.clone().follow());

    let (phases_tx, mut phases) = tokio::sync::mpsc::channel(2);
    let mut placing = JoinSet::new();
    placing.spawn(
        Placer {
            api: api.clone(),
            order_url: urls.order.clone(),
            live: live.clone(),
            schedule,
        }
        .run(phases_tx),
    );
    let mut problems = Vec::new();
    while let Some(phase) = phases.recv().await {
        match phase {
            Phase::Kill(killed) => {
                let c = &mut services[1];
                let pid = c.pid().unwrap_or_default();
                c.kill().await?;
                live.set_outage(Outage::Down {
                    since: Instant::now(),
                });
                let _ = killed.send(());
                let placed = live.snapshot();
                view.note(&format!(
                    "kill -9 consumer-service (pid {pid}) after {} orders; orders keep coming",
                    placed.placed + placed.failed
                ));
            }
            Phase::Restart => {
                let Outage::Down { since } = live.outage() else {
                    continue;
                };
                let old = services[1].addr;
                let back = match ServiceProcess::start(&services[1].spec, old).await {
                    Ok(p) => p,
                    Err(e) => {
                        view.note(&format!(
                            "consumer-service cannot listen on {old} again ({e:#}); trying a new port"
                        ));
                        ServiceProcess::start(&services[1].spec, any_port)
                            .await
                            .context("cannot restart consumer-service")?
                    }
                };
                live.set_outage(Outage::Over {
                    since,
                    until: Instant::now(),
                });
                view.note(&format!(
                    "consumer-service back on {} (pid {}) after {:.1} s down, same database and broker; \
                     {} orders pending",
                    back.addr,
                    back.pid().unwrap_or_default(),
                    since.elapsed().as_secs_f64(),
                    live.pending()
                ));
                services[1] = back;
            }
        }
    }
    while placing.join_next().await.is_some() {}
    let s = live.snapshot();
    view.note(&format!(
        "all {} orders placed ({} failed); waiting until every order is VALIDATED or REJECTED",
        s.total, s.failed
    ));

    let wait = Duration::from_secs(60) + Duration::from_millis(50) * args.orders;
    let waiting_since = Instant::now();
    let stopped = tokio::select! {
        settled = tracker.settle(tokio::time::Instant::now() + wait) => {
            (!settled).then(|| format!("the limit of {} s passed", wait.as_secs()))
        }
        // A service that died will not finish the orders (its exit is reported below).
        () = any_exit(&mut services) => Some("a service exited".to_owned()),
    };
    if let Some(why) = stopped {
        problems.push(format!(
            "stopped waiting {:.0} s after the last order was placed ({why}): {} orders are \
             still not VALIDATED or REJECTED",
            waiting_since.elapsed().as_secs_f64(),
            live.pending()
        ));
    }
    background.shutdown().await;
    view.finish(&live);
    let s = live.snapshot();
    view.note(&format!(
        "validated {}, rejected {}; checking each order's state, reason and event stream",
        s.validated, s.rejected
    ));
    let mut exited = Vec::new();
    for s in &mut services {
        if let Some(status) = s.exited() {
            exited.push(format!(
                "{} exited on its own ({status}).{}",
                s.spec.name,
                services::log_tail(&s.spec.log)
            ));
        }
    }
    // With a service gone the event streams say nothing new: check the states only.
    let verdict = track::verify(&tracker, 16, exited.is_empty()).await;
    problems.splice(0..0, exited);
    let report = report::Report::new(
        &live,
        &verdict,
        problems,
        &shown_broker,
        &args.dir.display().to_string(),
        args.rate,
    );
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table(&live));
    }
    Ok((if report.ok { 0 } else { 1 }, services.into()))
}

/// Returns once one of `services` has exited.
async fn any_exit(services: &mut [ServiceProcess]) {
    loop {
        if services.iter_mut().any(|s| s.exited().is_some()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
