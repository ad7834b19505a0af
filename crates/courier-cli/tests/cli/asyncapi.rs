//! `courier asyncapi` and `courier contract check`, on the built binary.

use super::{Env, success};
use courier::core::describe::ServiceDescription;
use courier::{Contract, MessageKind};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Output;

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/cli/fixtures")
        .join(name)
        .display()
        .to_string()
}

fn yaml(text: &str) -> Value {
    serde_yaml_ng::from_str(text).unwrap_or_else(|e| panic!("not YAML ({e}):\n{text}"))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn asyncapi_with_no_setup_prints_the_bench_document_as_yaml() {
    let env = Env::new();
    let doc = yaml(&env.ok(&["asyncapi"]));
    assert_eq!(doc["asyncapi"], "3.0.0");
    assert_eq!(doc["info"]["title"], "courier-bench");
    assert_eq!(doc["channels"]["bench"]["address"], "bench");
    assert_eq!(doc["operations"]["send_bench_Ping_v1"]["action"], "send");
    assert_eq!(
        doc["operations"]["receive_bench_Ping_v1"]["action"],
        "receive"
    );
    let ping = &doc["components"]["messages"]["bench_Ping_v1"];
    assert_eq!(ping["name"], "bench.Ping");
    assert_eq!(ping["payload"]["properties"]["n"]["type"], "integer");
}

#[test]
fn asyncapi_help_says_where_the_description_comes_from() {
    let env = Env::new();
    let help = env.ok(&["asyncapi", "--help"]);
    for needle in [
        "AsyncAPI 3.0",
        "ServiceDescription::to_json()",
        "courier_asyncapi::asyncapi(&description)",
        "dispatcher.description(",
        "Examples:",
    ] {
        assert!(
            help.contains(needle),
            "asyncapi --help lacks {needle:?}:\n{help}"
        );
    }
    assert!(
        env.ok(&["contract", "check", "--help"])
            .contains("Examples:")
    );
}

#[derive(serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
struct OrderPlaced {
    order_id: String,
    note: Option<String>,
}
impl Contract for OrderPlaced {
    const TYPE: &'static str = "order.OrderPlaced";
    const KIND: MessageKind = MessageKind::Event;
}

#[test]
fn asyncapi_from_a_description_file_and_stdin_and_the_contract_holds() {
    let env = Env::new();
    let description = ServiceDescription::new("order-service")
        .version("1.4.0")
        .sends::<OrderPlaced>("order");
    let from = env.dir.path().join("order-service.json");
    std::fs::write(&from, description.to_json()).unwrap();
    let out_file = env.dir.path().join("asyncapi.json");
    let quiet = env.ok(&[
        "asyncapi",
        "--from",
        from.to_str().unwrap(),
        "--format",
        "json",
        "--output",
        out_file.to_str().unwrap(),
    ]);
    assert_eq!(quiet, "", "--output writes nothing to stdout");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&out_file).unwrap()).unwrap();
    assert_eq!(doc["info"]["version"], "1.4.0");
    assert_eq!(
        doc["components"]["messages"]["order_OrderPlaced_v1"]["name"],
        "order.OrderPlaced"
    );

    let args = ["asyncapi", "--from", "-"];
    let from_stdin = success(env.run_with_stdin(&args, &description.to_json()), &args);
    assert_eq!(yaml(&from_stdin), doc);

    let path = out_file.to_str().unwrap();
    assert_eq!(env.ok(&["contract", "check", path, path]), "compatible\n");
}

#[test]
fn asyncapi_names_a_missing_or_wrong_description() {
    let env = Env::new();
    let err = env.fail(&["asyncapi", "--from", "nope.json"]);
    assert!(err.contains("nope.json"), "{err}");
    std::fs::write(env.dir.path().join("bad.json"), "{\"x\": 1}").unwrap();
    let err = env.fail(&["asyncapi", "--from", "bad.json"]);
    assert!(
        err.contains("bad.json is not a service description"),
        "{err}"
    );
}

#[test]
fn contract_check_passes_compatible_changes() {
    let env = Env::new();
    let out = env.run(&[
        "contract",
        "check",
        &fixture("orders-v1.yaml"),
        &fixture("orders-v1.1-compatible.json"),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "compatible\n");
}

#[test]
fn contract_check_fails_with_one_line_per_breaking_change() {
    let env = Env::new();
    let out = env.run(&[
        "contract",
        "check",
        &fixture("orders-v1.yaml"),
        &fixture("orders-breaking.yaml"),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).lines().collect::<Vec<_>>(),
        [
            "order.OrderCancelled v1: message type removed (NEW has no later major version of it)",
            "order.OrderPlaced v1: field order_id: required field removed",
            "order.OrderPlaced v1: field status: enum value \"paid\" removed",
            "order.OrderPlaced v1: field total_cents: type changed from integer to string",
        ]
    );
    assert_eq!(stderr(&out), "", "no `error:` line for breaking changes");
}

#[test]
fn contract_check_takes_a_major_bump_as_a_note() {
    let env = Env::new();
    let out = env.run(&[
        "contract",
        "check",
        &fixture("orders-v1.yaml"),
        &fixture("orders-v2.yaml"),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout(&out), "compatible\n");
    assert!(
        stderr(&out).contains("note: order.OrderPlaced v1 replaced by v2"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn contract_check_exits_2_naming_an_unreadable_document() {
    let env = Env::new();
    let old = fixture("orders-v1.yaml");
    let out = env.run(&["contract", "check", &old, "missing.yaml"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot read missing.yaml"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stdout(&out), "");

    std::fs::write(
        env.dir.path().join("old.yaml"),
        "asyncapi: 2.6.0\ninfo: {}\n",
    )
    .unwrap();
    let out = env.run(&["contract", "check", "old.yaml", &old]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("old.yaml is not an AsyncAPI 3 document"),
        "{}",
        stderr(&out)
    );

    std::fs::write(env.dir.path().join("junk.yaml"), "a: [unclosed\n").unwrap();
    let out = env.run(&["contract", "check", &old, "junk.yaml"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("junk.yaml"), "{}", stderr(&out));
}
