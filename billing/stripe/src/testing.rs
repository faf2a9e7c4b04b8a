//! Integration-test support (feature `test-support`): starts `scripts/stripe-standin.py`
//! (localstripe plus the marked test double for billing meters, meter events, invoices and
//! invoice items with their payment and webhooks, customers' cards, idempotency keys and fault
//! injection) on a free loopback port, one process per test, and reads what it recorded. Used
//! by this crate's tests, `apexctl`'s and the edge's webhook tests.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};

use apex_billing::customers::{NewCustomer, create_customer};
use apex_billing::pricing::Period;
use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgPool;

use crate::client::StripeClient;
use crate::reconcile::{self, Checks, Report, Verdict};

/// A running stand-in; killed on drop.
pub struct StripeStandIn {
    child: Child,
    port: u16,
}

/// `scripts/stripe-standin.py`.
const STANDIN_SCRIPT: &str = include_str!("../../../scripts/stripe-standin.py");

/// The secret key tests use; the stand-in accepts any key.
pub const TEST_KEY: &str = "sk_test_apex_standin";

/// A customer's default card as the stand-in charges it on `POST /v1/invoices/{id}/pay`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CardOutcome {
    /// Charges succeed, as every customer's do until a test says otherwise.
    Succeed,
    /// Charges are declined with this Stripe decline code (`insufficient_funds`,
    /// `generic_decline`, `expired_card`, ...): the pay answers 402 `card_error` with
    /// Stripe's code and message for it.
    Decline(&'static str),
}

impl StripeStandIn {
    /// Starts a stand-in. Panics (never skips) when its Python is missing: run
    /// `scripts/stack.sh up` (or `scripts/test.sh`), which installs it.
    pub fn start() -> Self {
        let python = std::env::var("APEX_STRIPE_STANDIN_PYTHON")
            .unwrap_or_else(|_| "/var/cache/apex/tools/localstripe-1.15.10/bin/python".to_owned());
        assert!(
            std::path::Path::new(&python).exists(),
            "{python} is missing: run scripts/stack.sh up, which installs the Stripe stand-in"
        );
        // The script is compiled in and fed on stdin, not read from a path: the build folder
        // is shared between clones, and a path baked in at build time can name another one.
        let mut child = Command::new(python)
            .args(["-", "--port", "0"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("cannot start the Stripe stand-in");
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(STANDIN_SCRIPT.as_bytes())
            .expect("cannot hand the stand-in its script");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .expect("cannot read the stand-in's address");
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the stand-in did not print its port: {line:?}"));
        Self { child, port }
    }

    /// The base URL to give the client (`STRIPE_API_BASE`).
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Answers the next `count` requests to `path` with `status` (and `Retry-After`); with
    /// `after`, the request is carried out first and its answer lost.
    pub fn inject_fault(
        &self,
        path: &str,
        status: u16,
        count: u32,
        retry_after: Option<u32>,
        after: bool,
    ) {
        let fault = serde_json::json!({
            "path": path, "status": status, "count": count,
            "retry_after": retry_after, "after": after,
        });
        self.call("POST", "/_config/test/faults", Some(&fault.to_string()));
    }

    /// As [`Self::inject_fault`], for requests of `method` only (a POST to `/v1/invoices`, not
    /// the GET that lists them).
    pub fn inject_fault_on(
        &self,
        method: &str,
        path: &str,
        status: u16,
        count: u32,
        retry_after: Option<u32>,
        after: bool,
    ) {
        let fault = serde_json::json!({
            "method": method, "path": path, "status": status, "count": count,
            "retry_after": retry_after, "after": after,
        });
        self.call("POST", "/_config/test/faults", Some(&fault.to_string()));
    }

    /// Meter events the stand-in accepted, in order.
    pub fn meter_events(&self) -> Vec<serde_json::Value> {
        self.list("/_config/test/meter_events")
    }

    /// Meter events in the stand-in as (identifier, event name, value).
    pub fn events(&self) -> Vec<(String, String, u64)> {
        self.meter_events()
            .iter()
            .map(|e| {
                (
                    e["identifier"].as_str().unwrap().to_owned(),
                    e["event_name"].as_str().unwrap().to_owned(),
                    e["payload"]["value"].as_str().unwrap().parse().unwrap(),
                )
            })
            .collect()
    }

    /// Every API request it received: method, path, idempotency_key, status, at.
    pub fn requests(&self) -> Vec<serde_json::Value> {
        self.list("/_config/test/requests")
    }

    /// `GET /v1/<object>s` through localstripe, as a list of objects.
    pub fn objects(&self, plural: &str) -> Vec<serde_json::Value> {
        self.list(&format!("/v1/{plural}?limit=100"))
    }

    /// Has localstripe deliver its events to `url`, signed with `secret` by its own code, and the
    /// test double its invoice events (`invoice.finalized`, `.voided`, `.marked_uncollectible`,
    /// `.payment_failed`, `.payment_succeeded`, `.paid`), signed the same way. Deliveries are
    /// asynchronous and never retried; see [`Self::webhooks_sent`].
    pub fn deliver_webhooks_to(&self, url: &str, secret: &str) {
        let config = serde_json::json!({"url": url, "secret": secret});
        self.call("POST", "/_config/webhooks/apex", Some(&config.to_string()));
    }

    /// `DELETE /v1/<path>` through localstripe (cancels a subscription, for one).
    pub fn delete(&self, path: &str) {
        self.call("DELETE", &format!("/v1/{path}"), None);
    }

    /// POSTs a JSON body to `path` (localstripe reads JSON as well as forms).
    pub fn post_json(&self, path: &str, body: &serde_json::Value) {
        self.call("POST", path, Some(&body.to_string()));
    }

    /// Forgets every idempotency key, as Stripe does after 24 hours.
    pub fn forget_idempotency_keys(&self) {
        self.call("POST", "/_config/test/forget_keys", Some("{}"));
    }

    /// Carries out the next request to `path`, then holds its answer for `seconds`.
    pub fn delay_answer(&self, path: &str, seconds: f64) {
        let fault = serde_json::json!({
            "path": path, "delay": seconds, "count": 1, "after": true,
        });
        self.call("POST", "/_config/test/faults", Some(&fault.to_string()));
    }

    /// Every invoice the test double holds (not localstripe's own subscription invoices), oldest
    /// first, each as `GET /v1/invoices/{id}` shows it.
    pub fn invoices(&self) -> Vec<serde_json::Value> {
        self.list("/_config/test/invoices")
    }

    /// `GET /v1/invoices/{id}`: the invoice with its current status, amounts and first 10 lines.
    pub fn invoice(&self, id: &str) -> serde_json::Value {
        self.json("GET", &format!("/v1/invoices/{id}"))
    }

    /// A successful payment attempt of Stripe's own on an open or uncollectible invoice,
    /// whatever the customer's card: `attempt_count` goes up and it becomes `paid`, with
    /// `amount_paid` its `amount_due`. Sends `invoice.payment_succeeded` then `invoice.paid`
    /// (asynchronously, to the endpoint of [`Self::deliver_webhooks_to`]). Returns the invoice.
    pub fn pay_invoice(&self, id: &str) -> serde_json::Value {
        self.json("POST", &format!("/_config/test/invoices/{id}/pay"))
    }

    /// A failed payment attempt of Stripe's own on an open invoice: `attempt_count` goes up, it
    /// stays `open` and Stripe's next attempt moves a day on (when Stripe collects it). Sends
    /// `invoice.payment_failed` (asynchronously, to the endpoint of
    /// [`Self::deliver_webhooks_to`]). Returns the invoice.
    pub fn fail_invoice_payment(&self, id: &str) -> serde_json::Value {
        self.json("POST", &format!("/_config/test/invoices/{id}/fail_payment"))
    }

    /// The customer changes its default card: from now on `POST /v1/invoices/{id}/pay` on its
    /// invoices succeeds or is declined as `outcome` says (until its default payment method in
    /// localstripe changes again).
    pub fn set_card(&self, customer: &str, outcome: CardOutcome) {
        let body = match outcome {
            CardOutcome::Succeed => serde_json::json!({"outcome": "succeed"}),
            CardOutcome::Decline(code) => {
                serde_json::json!({"outcome": "decline", "decline_code": code})
            }
        };
        self.call(
            "POST",
            &format!("/_config/test/customers/{customer}/card"),
            Some(&body.to_string()),
        );
    }

    /// Every invoice event the test double made, in order: `id`, `type`, `invoice`, `status`
    /// (the endpoint's HTTP status, null until delivered or when none answered) and `delivery`
    /// (`pending`, `sent`, `failed`, `no_endpoint`). Delivery is asynchronous: a test waits
    /// for it by polling this with an async sleep in between, never a blocking one, which would
    /// stall a receiver on the test's own runtime.
    pub fn webhooks_sent(&self) -> Vec<serde_json::Value> {
        self.list("/_config/test/webhooks_sent")
    }

    fn json(&self, method: &str, path: &str) -> serde_json::Value {
        let body = if method == "POST" { Some("{}") } else { None };
        serde_json::from_str(&self.call(method, path, body)).expect("stand-in JSON")
    }

    fn list(&self, path: &str) -> Vec<serde_json::Value> {
        let body = self.call("GET", path, None);
        let value: serde_json::Value = serde_json::from_str(&body).expect("stand-in JSON");
        value["data"].as_array().cloned().unwrap_or_default()
    }

    fn call(&self, method: &str, path: &str, json: Option<&str>) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("stand-in down");
        let body = json.unwrap_or("");
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TEST_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
        assert!(head.starts_with("HTTP/1.1 2"), "{method} {path}: {head}");
        body.to_owned()
    }
}

impl Drop for StripeStandIn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Signs up a Starter customer named `name`; returns its id.
pub async fn signup(pool: &PgPool, name: &str) -> String {
    let new = NewCustomer {
        name: name.into(),
        email: "billing@studio.example".into(),
        plan_id: "starter".into(),
        trial_days: None,
    };
    create_customer(&mut pool.acquire().await.unwrap(), &new, Utc::now())
        .await
        .unwrap()
        .customer
        .id
}

/// The UTC day `days` before `now`.
pub fn day_ago(now: DateTime<Utc>, days: i64) -> NaiveDate {
    now.date_naive() - chrono::Duration::days(days)
}

/// Adds `quantity` to a customer's hourly rollup at `day` 10:00 UTC, as the pipeline does.
pub async fn add_usage(pool: &PgPool, customer: &str, metric: &str, day: NaiveDate, quantity: i64) {
    let hour = day.and_hms_opt(10, 0, 0).unwrap().and_utc();
    sqlx::query(
        "INSERT INTO usage_records (customer_id, metric_type, recorded_at, quantity)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (customer_id, metric_type, recorded_at)
         DO UPDATE SET quantity = usage_records.quantity + EXCLUDED.quantity",
    )
    .bind(customer)
    .bind(metric)
    .bind(hour)
    .bind(quantity)
    .execute(pool)
    .await
    .unwrap();
}

/// Reconciles `period` (of `customer` only, if given) at the run's time `now` against Stripe
/// through `stripe`, making the `checks` ([`reconcile::reconcile_with`]); the report. Panics
/// on an error.
pub async fn reconcile_report(
    pool: &PgPool,
    stores: &apex_core::stores::StoreConfig,
    stripe: &StripeClient,
    period: Period,
    customer: Option<&str>,
    now: DateTime<Utc>,
    checks: Checks,
) -> Report {
    let request = reconcile::Request {
        period,
        customer: customer.map(str::to_owned),
        now,
        settled: false,
    };
    reconcile::reconcile_with(pool, stores, Some(stripe), &request, checks)
        .await
        .unwrap()
}

/// How many of the `report`'s pairs of `check` are `ok`.
pub fn ok_pairs(report: &Report, check: &str) -> usize {
    report
        .pairs
        .iter()
        .filter(|p| p.check == check && p.verdict == Verdict::Ok)
        .count()
}
