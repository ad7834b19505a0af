//! `ftgo <service> asyncapi` prints a document the official AsyncAPI parser accepts, for
//! each of the three services, in YAML and in JSON.
//!
//! `COURIER_TEST_ASYNCAPI_PARSER` is the path of `tools/asyncapi-parser/validate.mjs`
//! (after `npm ci --prefix tools/asyncapi-parser`); `.ci/run` sets it. Without it the test
//! skips with a reason, except under `CI`, where it fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

const FTGO: &str = env!("CARGO_BIN_EXE_ftgo");
const SCRIPT_VAR: &str = "COURIER_TEST_ASYNCAPI_PARSER";
const SERVICES: [&str; 3] = ["restaurant-service", "consumer-service", "order-service"];

/// The validator script, or `None` (skip) when it is not configured outside CI.
fn validator() -> Option<PathBuf> {
    match std::env::var_os(SCRIPT_VAR) {
        Some(path) => {
            let path = PathBuf::from(path);
            assert!(
                path.is_file(),
                "{SCRIPT_VAR}={} is not a file; it must be tools/asyncapi-parser/validate.mjs",
                path.display()
            );
            Some(path)
        }
        None if std::env::var_os("CI").is_some() => panic!(
            "{SCRIPT_VAR} is not set, and CI is: set it to the path of \
             tools/asyncapi-parser/validate.mjs (after `npm ci --prefix tools/asyncapi-parser`)"
        ),
        None => {
            eprintln!(
                "skipped: {SCRIPT_VAR} is not set (the path of tools/asyncapi-parser/validate.mjs, \
                 after `npm ci --prefix tools/asyncapi-parser`)"
            );
            None
        }
    }
}

/// What `ftgo <service> asyncapi [extra]` prints; panics with its stderr when it fails.
fn print_document(service: &str, extra: &[&str]) -> String {
    let out = Command::new(FTGO)
        .arg(service)
        .arg("asyncapi")
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ftgo {service} asyncapi {extra:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Run the parser in strict mode (warnings fail too) on `text` saved as `file_name`.
fn assert_valid(script: &Path, file_name: &str, text: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(file_name);
    std::fs::write(&file, text).unwrap();
    let out = Command::new("node")
        .arg(script)
        .arg(&file)
        .arg("--strict")
        .output()
        .expect("cannot run `node`: is Node.js installed and on PATH?");
    assert!(
        out.status.success(),
        "the AsyncAPI parser rejected {file_name} ({}):\n{}{}\n--- document ---\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_service_prints_a_document_the_asyncapi_parser_accepts() {
    let Some(script) = validator() else { return };
    for service in SERVICES {
        let yaml = print_document(service, &[]);
        assert!(yaml.starts_with("asyncapi: 3.0.0"), "{service}: {yaml}");
        assert_valid(&script, &format!("{service}.yaml"), &yaml);
        let json = print_document(service, &["--json"]);
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["asyncapi"], "3.0.0", "{service}: {json}");
        assert_valid(&script, &format!("{service}.json"), &json);
    }
}

#[test]
fn each_document_names_the_messages_of_its_service() {
    let expected: [(&str, &[&str]); 3] = [
        (
            "restaurant-service",
            &["RestaurantCreated", "MenuRevised", "ValidateOrderDetails"],
        ),
        (
            "consumer-service",
            &["ValidateConsumerInfo", "ConsumerValidated"],
        ),
        (
            "order-service",
            &[
                "ValidateConsumerInfo",
                "ValidateOrderDetails",
                "RestaurantCreated",
                "OrderStateChanged",
            ],
        ),
    ];
    for (service, names) in expected {
        let yaml = print_document(service, &[]);
        for name in names {
            assert!(
                yaml.contains(name),
                "{service}'s document lacks {name}:\n{yaml}"
            );
        }
    }
}
