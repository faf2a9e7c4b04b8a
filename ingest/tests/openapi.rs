//! `openapi.yaml` against the server: every documented path is routed (none answers the
//! unknown-path 404), every route the server has is documented, and the checker that every
//! other test runs on its answers refuses what the document does not describe.

mod common;

use common::openapi::check;

const ROUTES: &str = include_str!("../src/routes.rs");

fn documented_paths() -> Vec<String> {
    let spec = include_str!("../../openapi.yaml");
    let paths = spec.split("\npaths:\n").nth(1).expect("a paths section");
    paths
        .lines()
        .filter(|l| l.starts_with("  /") && l.ends_with(':'))
        .map(|l| l.trim().trim_end_matches(':').to_owned())
        .collect()
}

#[test]
fn every_route_of_the_server_is_documented_and_every_documented_path_is_a_route() {
    let documented = documented_paths();
    assert!(documented.len() >= 11, "{documented:?}");
    for path in &documented {
        assert!(
            ROUTES.contains(&format!("\"{path}\"")),
            "{path} is documented but not routed"
        );
    }
    for (at, _) in ROUTES.match_indices("        \"/") {
        let rest = &ROUTES[at + 9..];
        let path = &rest[..rest.find('"').unwrap()];
        assert!(
            documented.iter().any(|d| d == path),
            "{path} is routed but not documented"
        );
    }
}

#[tokio::test]
async fn documented_paths_answer_with_documented_responses() {
    // With an admin token and a webhook secret, so those endpoints exist too.
    let server = common::start_with(
        &[
            ("APEX_ADMIN_TOKEN", "admin-token-for-tests-0123456789"),
            ("STRIPE_WEBHOOK_SECRET", "whsec_test_secret_0123456789"),
        ],
        None,
    )
    .await;
    // Without credentials or bodies each path gives one of its documented errors (checked by
    // the common client); none is the unknown-path 404.
    for path in documented_paths() {
        let get = common::get(server.addr, &path).await;
        let post = common::post(server.addr, &path, &[], b"").await;
        for answer in [get, post] {
            assert!(
                answer.status != 404 || !answer.body.contains("no such endpoint"),
                "{path}: {}",
                answer.body
            );
        }
    }
    let unknown = common::get(server.addr, "/api/nothing-here").await;
    assert_eq!(unknown.status, 404);
}

#[test]
fn the_checker_accepts_a_documented_answer() {
    check(
        "POST",
        "/api/usage/track",
        200,
        Some("application/json"),
        r#"{"success":true,"recorded":{"customer_id":"cus_a","metric_type":"impressions","quantity":1000}}"#,
    );
    check(
        "GET",
        "/metrics",
        200,
        Some("text/plain; version=0.0.4"),
        "# nothing\n",
    );
    check(
        "GET",
        "/nowhere",
        404,
        Some("application/json"),
        r#"{"success":false,"error":{"code":"not_found","message":"no such endpoint"}}"#,
    );
}

#[test]
#[should_panic(expected = "does not match openapi.yaml")]
fn the_checker_refuses_a_body_off_the_schema() {
    check(
        "POST",
        "/api/usage/track",
        200,
        Some("application/json"),
        r#"{"success":true,"recorded":{"customer_id":"cus_a","metric_type":"clicks","quantity":1}}"#,
    );
}

#[test]
#[should_panic(expected = "is not documented")]
fn the_checker_refuses_an_undocumented_status() {
    check(
        "GET",
        "/healthz",
        418,
        Some("application/json"),
        r#"{"success":false,"error":{"code":"teapot","message":"no"}}"#,
    );
}

#[test]
#[should_panic(expected = "not in openapi.yaml")]
fn the_checker_refuses_an_undocumented_path_that_answers() {
    check("GET", "/secret", 200, Some("application/json"), "{}");
}

#[test]
#[should_panic(expected = "does not match openapi.yaml")]
fn the_checker_refuses_an_error_of_another_shape() {
    check(
        "GET",
        "/api/usage/current",
        401,
        Some("application/json"),
        r#"{"error":"unauthorized"}"#,
    );
}
