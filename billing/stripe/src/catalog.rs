//! Our customers, plans and metrics mapped to Stripe objects, with the Stripe ids kept in
//! Postgres (`apexctl stripe catalog`, `apexctl stripe customers`).
//!
//! Every step is idempotent twice over: a mapped row in Postgres is never created again, and
//! each POST carries an idempotency key derived from our own id, so a run that died between
//! Stripe's answer and our commit gets the same object back from Stripe instead of a second
//! one. Stripe forgets idempotency keys after 24 hours, so a re-run also looks for what an
//! earlier run may have created before it creates anything: products and plans have ids of
//! our own (`apex_...`), meters are found by event name, customers by email and our id in
//! their metadata, subscriptions by our id in their metadata.
//!
//! What is mapped:
//! - one billing meter per metric, event name `apex_<metric>`, summing the payload's `value`
//!   for the customer in `stripe_customer_id`;
//! - per plan, a product `apex_plan_<plan>` and a $0 monthly Stripe plan
//!   `apex_<plan>_0_monthly` for its subscriptions (plan ids are accepted wherever Stripe takes
//!   a price id): the base fee, like every charge, is a line of the monthly invoice
//!   ([`crate::invoicing`]);
//! - per customer, a Stripe customer (metadata `apex_customer_id`) and a subscription to the
//!   plan's $0 subscription plan, with the trial end carried over.

use std::collections::HashMap;

use apex_billing::{customers, subscriptions};
use apex_core::model::Metric;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use stripe_billing::billing_meter::{
    CreateBillingMeter, CreateBillingMeterCustomerMapping, CreateBillingMeterCustomerMappingType,
    CreateBillingMeterDefaultAggregation, CreateBillingMeterDefaultAggregationFormula,
    CreateBillingMeterValueSettings, ListBillingMeter,
};
use stripe_billing::plan::{CreatePlan, CreatePlanProduct};
use stripe_billing::subscription::{
    CreateSubscription, CreateSubscriptionItems, CreateSubscriptionTrialEnd, ListSubscription,
};
use stripe_core::customer::{CreateCustomer, ListCustomer};
use stripe_product::product::CreateProduct;

use super::StripeWorkError;
use super::client::{StripeClient, StripeError, StripeObject};

/// The meter event name of a metric.
pub fn event_name(metric: Metric) -> String {
    format!("apex_{}", metric.as_str())
}

/// What `apexctl stripe catalog` did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct CatalogReport {
    /// Meters created or adopted now, by metric.
    pub meters_mapped: Vec<String>,
    /// Plans whose product and subscription plan were mapped now.
    pub plans_mapped: Vec<String>,
    /// Meters and plans that were already mapped.
    pub unchanged: usize,
}

/// Maps every metric to a billing meter and every plan to a product and its $0 subscription plan.
pub async fn sync_catalog(
    pool: &PgPool,
    stripe: &StripeClient,
) -> Result<CatalogReport, StripeWorkError> {
    let mut report = CatalogReport::default();
    let mapped: Vec<String> = sqlx::query_scalar("SELECT metric_type FROM stripe_meters")
        .fetch_all(pool)
        .await?;
    let missing: Vec<Metric> = Metric::ALL
        .into_iter()
        .filter(|m| !mapped.iter().any(|name| name == m.as_str()))
        .collect();
    report.unchanged += Metric::ALL.len() - missing.len();
    if !missing.is_empty() {
        let existing = active_meters(stripe).await?;
        for metric in missing {
            let name = event_name(metric);
            let meter_id = match existing.get(&name) {
                Some(id) => id.clone(),
                None => create_meter(stripe, metric, &name).await?,
            };
            sqlx::query(
                "INSERT INTO stripe_meters (metric_type, event_name, stripe_meter_id)
                 VALUES ($1, $2, $3) ON CONFLICT (metric_type) DO NOTHING",
            )
            .bind(metric.as_str())
            .bind(&name)
            .bind(&meter_id)
            .execute(pool)
            .await?;
            report.meters_mapped.push(metric.as_str().to_owned());
        }
    }

    let plans: Vec<(String, String, Option<i64>)> = sqlx::query_as(
        "SELECT p.id, p.name, sp.monthly_base_cents
         FROM plans p LEFT JOIN stripe_plans sp ON sp.plan_id = p.id ORDER BY p.id",
    )
    .fetch_all(pool)
    .await?;
    for (plan_id, name, mapped_cents) in plans {
        // The subscription's Stripe plan is always $0: the base fee is a line of our monthly
        // invoice (`crate::invoicing`), so Stripe's own subscription invoices never carry money
        // and cannot charge it twice.
        let base_cents = 0i64;
        if mapped_cents == Some(base_cents) {
            report.unchanged += 1;
            continue;
        }
        let product_id = format!("apex_plan_{plan_id}");
        let product = CreateProduct::new(format!("ApexMediation {name}"))
            .id(product_id.clone())
            .metadata(HashMap::from([(
                "apex_plan_id".to_owned(),
                plan_id.clone(),
            )]));
        adopt_existing(
            stripe
                .send::<StripeObject>(&product, Some(&format!("apex_product_{plan_id}")))
                .await,
        )?;
        // Stripe prices are immutable, so a changed amount is a new plan id.
        let stripe_plan_id = format!("apex_{plan_id}_{base_cents}_monthly");
        let base_fee = CreatePlan::new(
            stripe_types::Currency::USD,
            stripe_billing::PlanInterval::Month,
        )
        .id(stripe_plan_id.clone())
        .amount(base_cents)
        .product(CreatePlanProduct::Id(product_id.clone()))
        .nickname(format!(
            "{name} subscription (charges on the monthly invoice)"
        ))
        .metadata(HashMap::from([(
            "apex_plan_id".to_owned(),
            plan_id.clone(),
        )]));
        adopt_existing(
            stripe
                .send::<StripeObject>(&base_fee, Some(&format!("apex_plan_{stripe_plan_id}")))
                .await,
        )?;
        sqlx::query(
            "INSERT INTO stripe_plans (plan_id, stripe_product_id, stripe_plan_id, monthly_base_cents)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (plan_id) DO UPDATE SET stripe_plan_id = EXCLUDED.stripe_plan_id,
                 monthly_base_cents = EXCLUDED.monthly_base_cents, updated_at = now()",
        )
        .bind(&plan_id)
        .bind(&product_id)
        .bind(&stripe_plan_id)
        .bind(base_cents)
        .execute(pool)
        .await?;
        report.plans_mapped.push(plan_id);
    }
    Ok(report)
}

/// An object we create under our own id may exist from an earlier run: that is success.
fn adopt_existing(result: Result<StripeObject, StripeError>) -> Result<(), StripeError> {
    match result {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some("resource_already_exists") => Ok(()),
        Err(e) => Err(e),
    }
}

async fn active_meters(stripe: &StripeClient) -> Result<HashMap<String, String>, StripeError> {
    #[derive(serde::Deserialize)]
    struct Meters {
        data: Vec<Meter>,
    }
    #[derive(serde::Deserialize)]
    struct Meter {
        id: String,
        event_name: String,
    }
    let list = ListBillingMeter::new()
        .status(stripe_billing::BillingMeterStatus::Active)
        .limit(100);
    let meters: Meters = stripe.send(&list, None).await?;
    Ok(meters
        .data
        .into_iter()
        .map(|m| (m.event_name, m.id))
        .collect())
}

async fn create_meter(
    stripe: &StripeClient,
    metric: Metric,
    event_name: &str,
) -> Result<String, StripeError> {
    let meter = CreateBillingMeter::new(
        CreateBillingMeterDefaultAggregation::new(CreateBillingMeterDefaultAggregationFormula::Sum),
        format!("Apex {} ({})", metric.as_str(), metric.storage_unit()),
        event_name,
    )
    .customer_mapping(CreateBillingMeterCustomerMapping::new(
        "stripe_customer_id",
        CreateBillingMeterCustomerMappingType::ById,
    ))
    .value_settings(CreateBillingMeterValueSettings::new("value"));
    let created: StripeObject = stripe
        .send(&meter, Some(&format!("apex_meter_{}", metric.as_str())))
        .await?;
    Ok(created.id)
}

/// What `apexctl stripe customers` did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct CustomersReport {
    /// Customers given a Stripe customer now.
    pub customers_created: usize,
    /// Subscriptions created in Stripe now.
    pub subscriptions_created: usize,
    /// Customers that failed, with the reason; the others went on.
    pub failed: Vec<Failure>,
}

/// One customer the run could not map.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failure {
    /// Our customer id.
    pub customer_id: String,
    /// Why.
    pub error: String,
}

/// Gives every customer (or only `only`) without one a Stripe customer, and every open
/// subscription without one a Stripe subscription to its plan's $0 Stripe plan. Needs the catalogue
/// mapped first. One customer failing does not stop the others.
pub async fn sync_customers(
    pool: &PgPool,
    stripe: &StripeClient,
    only: Option<&str>,
) -> Result<CustomersReport, StripeWorkError> {
    if let Some(id) = only
        && !customers::exists(pool, id).await?
    {
        return Err(StripeWorkError::Invalid(format!("customer {id} not found")));
    }
    let customers = customers::stripe_mappings(pool, only, false).await?;
    let mut report = CustomersReport::default();
    for customer in customers {
        if let Err(error) = map_customer(pool, stripe, &customer, &mut report).await {
            tracing::warn!(customer_id = %customer.id, %error, "cannot map customer to Stripe");
            report.failed.push(Failure {
                customer_id: customer.id,
                error: error.to_string(),
            });
        }
    }
    Ok(report)
}

async fn map_customer(
    pool: &PgPool,
    stripe: &StripeClient,
    customer: &customers::StripeMapping,
    report: &mut CustomersReport,
) -> Result<(), StripeWorkError> {
    let (customer_id, name, email) = (&customer.id, &customer.name, &customer.email);
    let stripe_customer_id = match customer.stripe_customer_id.clone() {
        Some(id) => id,
        None => {
            let adopted = find_by_metadata(
                stripe,
                &ListCustomer::new().email(email).limit(100),
                "apex_customer_id",
                customer_id,
            )
            .await?;
            let create = CreateCustomer::new()
                .name(name)
                .email(email)
                .metadata(HashMap::from([(
                    "apex_customer_id".to_owned(),
                    customer_id.to_owned(),
                )]));
            let created = match adopted {
                Some(id) => StripeObject { id },
                None => {
                    stripe
                        .send(&create, Some(&format!("apex_customer_{customer_id}")))
                        .await?
                }
            };
            customers::set_stripe_customer_id(pool, customer_id, &created.id).await?;
            report.customers_created += 1;
            created.id
        }
    };
    let open: Vec<OpenSubscription> = sqlx::query_as(
        "SELECT s.id, s.status, s.trial_end, sp.stripe_plan_id
         FROM subscriptions s LEFT JOIN stripe_plans sp ON sp.plan_id = s.plan_id
         WHERE s.customer_id = $1 AND s.stripe_subscription_id IS NULL
           AND s.status <> 'canceled'
         ORDER BY s.id",
    )
    .bind(customer_id)
    .fetch_all(pool)
    .await?;
    for OpenSubscription {
        id: subscription_id,
        status,
        trial_end,
        stripe_plan_id,
    } in open
    {
        let Some(stripe_plan_id) = stripe_plan_id else {
            return Err(StripeWorkError::Invalid(
                "its plan is not in Stripe yet: run `apexctl stripe catalog` first".into(),
            ));
        };
        let mut item = CreateSubscriptionItems::new();
        item.plan = Some(stripe_plan_id);
        let mut create = CreateSubscription::new()
            .customer(stripe_customer_id.clone())
            .items(vec![item])
            .metadata(HashMap::from([
                ("apex_customer_id".to_owned(), customer_id.to_owned()),
                (
                    "apex_subscription_id".to_owned(),
                    subscription_id.to_string(),
                ),
            ]));
        if let Some(end) = trial_end.filter(|end| status == "trialing" && *end > Utc::now()) {
            create = create.trial_end(CreateSubscriptionTrialEnd::Timestamp(end.timestamp()));
        }
        let adopted = find_by_metadata(
            stripe,
            &ListSubscription::new()
                .customer(stripe_customer_id.clone())
                .limit(100),
            "apex_subscription_id",
            &subscription_id.to_string(),
        )
        .await?;
        let created = match adopted {
            Some(id) => StripeObject { id },
            None => {
                stripe
                    .send(
                        &create,
                        Some(&format!("apex_subscription_{subscription_id}")),
                    )
                    .await?
            }
        };
        subscriptions::set_stripe_ids(pool, subscription_id, &created.id, &stripe_customer_id)
            .await?;
        report.subscriptions_created += 1;
    }
    Ok(())
}

/// A subscription of ours not yet in Stripe, with its plan's Stripe plan if mapped.
#[derive(sqlx::FromRow)]
struct OpenSubscription {
    id: i64,
    status: String,
    trial_end: Option<DateTime<Utc>>,
    stripe_plan_id: Option<String>,
}

/// The id of the object in `list` whose metadata `key` is `value`: what an earlier run created
/// and could not record.
pub(crate) async fn find_by_metadata(
    stripe: &StripeClient,
    list: &impl stripe_client_core::StripeRequest,
    key: &str,
    value: &str,
) -> Result<Option<String>, StripeError> {
    #[derive(serde::Deserialize)]
    struct Listed {
        data: Vec<Item>,
    }
    #[derive(serde::Deserialize)]
    struct Item {
        id: String,
        #[serde(default)]
        metadata: Option<HashMap<String, String>>,
    }
    let listed: Listed = stripe.send(list, None).await?;
    Ok(listed
        .data
        .into_iter()
        .find(|item| {
            item.metadata
                .as_ref()
                .and_then(|m| m.get(key))
                .is_some_and(|v| v == value)
        })
        .map(|item| item.id))
}

/// One cheap authenticated request (`GET /v1/billing/meters?limit=1`): `Ok` when Stripe
/// accepts the client's key (`apexctl doctor`'s `stripe.api`). The answer's content is not
/// read: only whether Stripe answered, and how.
pub async fn check_access(stripe: &StripeClient) -> Result<(), StripeError> {
    let list = ListBillingMeter::new().limit(1);
    stripe.send::<serde::de::IgnoredAny>(&list, None).await?;
    Ok(())
}

/// How a metric's billing meter stands (`apexctl doctor`'s `stripe.mapping`): what the usage
/// sync needs is a meter mapped in `stripe_meters`, active in Stripe, under the catalogue's
/// event name for the metric ([`event_name`]); Stripe refuses meter events to a meter that is
/// not active.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum MeterState {
    /// No meter mapped in `stripe_meters`: `apexctl stripe catalog` maps it.
    Unmapped,
    /// Not looked up in Stripe ([`mapped_meters`] alone).
    NotChecked,
    /// Active in Stripe with the catalogue's event name.
    Active,
    /// Stripe has no meter with the mapped id (404).
    Missing,
    /// Stripe's `status` is not `active` (a deactivated meter).
    NotActive {
        /// Stripe's `status` (`inactive`).
        status: String,
    },
    /// The meter counts another event name: the sync's events for the metric do not reach it.
    OtherEventName {
        /// Stripe's `event_name` of the meter.
        event_name: String,
    },
}

/// One metric's meter and how it stands.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MeterHealth {
    /// The metric.
    pub metric: Metric,
    /// The mapped Stripe meter (`mtr_...`), if any.
    pub stripe_meter_id: Option<String>,
    /// How it stands.
    pub state: MeterState,
}

/// Every metric (in [`Metric::ALL`]'s order) with its meter mapped in `stripe_meters`, without
/// asking Stripe: each mapped one is [`MeterState::NotChecked`].
pub async fn mapped_meters(db: impl sqlx::PgExecutor<'_>) -> Result<Vec<MeterHealth>, sqlx::Error> {
    let mapped: Vec<(String, String)> =
        sqlx::query_as("SELECT metric_type, stripe_meter_id FROM stripe_meters")
            .fetch_all(db)
            .await?;
    Ok(Metric::ALL
        .into_iter()
        .map(|metric| {
            let id = mapped
                .iter()
                .find(|(m, _)| m == metric.as_str())
                .map(|(_, id)| id.clone());
            MeterHealth {
                metric,
                state: if id.is_some() {
                    MeterState::NotChecked
                } else {
                    MeterState::Unmapped
                },
                stripe_meter_id: id,
            }
        })
        .collect())
}

/// Every metric's meter as [`mapped_meters`] reads it, each mapped one looked up in Stripe
/// (`GET /v1/billing/meters/{id}`, one request a meter). A 404 is [`MeterState::Missing`];
/// any other failure (the key refused, Stripe unreachable) is the error.
pub async fn meter_health(
    pool: &PgPool,
    stripe: &StripeClient,
) -> Result<Vec<MeterHealth>, StripeWorkError> {
    let mut meters = mapped_meters(pool).await?;
    for meter in &mut meters {
        let Some(id) = meter.stripe_meter_id.as_deref() else {
            continue;
        };
        let request = stripe_billing::billing_meter::RetrieveBillingMeter::new(id);
        meter.state = match stripe.send::<RetrievedMeter>(&request, None).await {
            Ok(found) => judge_meter(meter.metric, found),
            Err(StripeError::Api { status: 404, .. }) => MeterState::Missing,
            Err(e) => return Err(e.into()),
        };
    }
    Ok(meters)
}

/// The fields of a billing meter [`meter_health`] reads.
#[derive(Debug, serde::Deserialize)]
struct RetrievedMeter {
    event_name: String,
    status: String,
}

/// A meter Stripe returned, against what the catalogue maps `metric` to.
fn judge_meter(metric: Metric, found: RetrievedMeter) -> MeterState {
    if found.status != "active" {
        MeterState::NotActive {
            status: found.status,
        }
    } else if found.event_name != event_name(metric) {
        MeterState::OtherEventName {
            event_name: found.event_name,
        }
    } else {
        MeterState::Active
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(event_name: &str, status: &str) -> RetrievedMeter {
        RetrievedMeter {
            event_name: event_name.to_owned(),
            status: status.to_owned(),
        }
    }

    #[test]
    fn a_meter_is_healthy_when_active_under_the_metrics_event_name() {
        let metric = Metric::Impressions;
        assert_eq!(
            judge_meter(metric, found("apex_impressions", "active")),
            MeterState::Active
        );
        assert_eq!(
            judge_meter(metric, found("apex_impressions", "inactive")),
            MeterState::NotActive {
                status: "inactive".into()
            }
        );
        assert_eq!(
            judge_meter(metric, found("apex_api_calls", "active")),
            MeterState::OtherEventName {
                event_name: "apex_api_calls".into()
            }
        );
    }
}
