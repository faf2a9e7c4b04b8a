//! The simulation's synthetic customers: a mix the seed makes reproducible (ChaCha8, a fixed
//! algorithm, so a seed gives the same customers on every machine and version). Roles that
//! the timeline must show (every plan, trials, a card that fails and recovers, one that fails
//! until suspension and is paid by hand, every platform-fee band) are dealt first, each to a
//! customer the seed picks; the rest of each customer (its usage growth, jitter, revenue
//! within its band) is drawn from the seed too.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

/// The plans of the catalogue (migration 0002), in band order: every one gets customers.
pub(crate) const PLANS: [&str; 4] = ["starter", "growth", "scale", "enterprise"];

/// How a customer's card behaves when Stripe and our dunning charge it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Card {
    /// Every charge succeeds.
    Good,
    /// Declined (`insufficient_funds`) until the customer puts in a new card after the
    /// first retry failed: the second retry succeeds.
    FailsThenRecovers,
    /// Declined through every retry (the customer is suspended); two days after the
    /// suspension the customer pays the invoice by hand and is reactivated.
    FailsUntilSuspended,
}

/// One synthetic customer.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct SimCustomer {
    /// `sim-01`, ...: the timeline's name for it (ids are random, names are not).
    pub(crate) name: String,
    /// Its plan id.
    pub(crate) plan: &'static str,
    /// A trial of this many days from sign-up, or none.
    pub(crate) trial_days: Option<u32>,
    /// Its card.
    pub(crate) card: Card,
    /// The platform-fee band (index into [`BANDS`]) its mediated revenue falls in.
    pub(crate) revenue_band: usize,
    /// Mediated revenue a month, cents, within that band.
    pub(crate) revenue_cents: u64,
    /// Where its usage ends its first 30 days, in percent of the plan's impression allowance
    /// (60 to 150: most cross 80 %, many 100 %, some the overage threshold; 400 to 450 for
    /// the heavy users, who pass 100 % within twelve days: the first month's invoice bills
    /// their overage).
    pub(crate) target_percent: u64,
    /// Dealt the heavy user's role (see `target_percent`).
    pub(crate) heavy: bool,
    /// The seed of its hourly jitter (a string in JSON: a u64 does not survive a
    /// JavaScript reader's doubles).
    #[serde(serialize_with = "as_text")]
    pub(crate) jitter_seed: u64,
}

fn as_text<S: serde::Serializer>(value: &u64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

/// The platform-fee bands of migration 0002 as (lowest, highest) cents of monthly revenue:
/// Starter to $10,000.00, Growth to $100,000.00, Scale to $500,000.00, Enterprise above.
/// `apexctl plans list` shows them; the fee of a month follows its revenue's band.
/// (Enterprise has no upper bound; the simulation draws up to $1,200,000.00.) The run checks
/// both against the catalogue it migrated ([`check_catalogue`]).
pub(crate) const BANDS: [(u64, u64); 4] = [
    (100_000, 1_000_000),
    (1_000_001, 10_000_000),
    (10_000_001, 50_000_000),
    (50_000_001, 120_000_000),
];

/// A uniform draw from `low..=high` (the modulo's bias is far below what matters here).
fn between(rng: &mut ChaCha8Rng, low: u64, high: u64) -> u64 {
    low + rng.next_u64() % (high - low + 1)
}

/// A seed-shuffled order of `0..n` (Fisher-Yates).
fn shuffled(rng: &mut ChaCha8Rng, n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = between(rng, 0, i as u64) as usize;
        order.swap(i, j);
    }
    order
}

/// `count` customers for `seed`. With at least 10 customers every role is dealt: each plan,
/// each fee band, two trials, two cards that recover and two that end in suspension (with 6
/// to 9, one trial).
pub(crate) fn customers(count: u32, seed: u64) -> Vec<SimCustomer> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = count as usize;
    // Roles go to seat numbers in a seeded order, so which customer plays which changes
    // with the seed while every role is played.
    let seats = shuffled(&mut rng, n);
    let mut rank_of = vec![0; n];
    for (rank, &seat) in seats.iter().enumerate() {
        rank_of[seat] = rank;
    }
    let mut out: Vec<SimCustomer> = (0..n)
        .map(|i| {
            let rank = rank_of[i];
            SimCustomer {
                name: format!("sim-{:02}", i + 1),
                plan: PLANS[rank % PLANS.len()],
                // Trials on a Starter and a Growth customer whose cards are good (a trial's
                // first invoice is still due: the trial changes the Stripe subscription, not
                // our lines).
                trial_days: (rank == 0 || rank == 9).then_some(14),
                card: match rank {
                    // Enterprise (rank 3, 7) has no limits: the failing cards go to limited
                    // plans.
                    1 | 4 => Card::FailsThenRecovers,
                    2 | 5 => Card::FailsUntilSuspended,
                    _ => Card::Good,
                },
                revenue_band: (rank / PLANS.len() + rank) % BANDS.len(),
                revenue_cents: 0,
                target_percent: 0,
                // Usage past the limits, dealt: a Scale and a Starter customer with good cards
                // whose usage crosses every alert threshold and whose first invoice bills
                // overage.
                heavy: rank == 6 || rank == 8,
                jitter_seed: 0,
            }
        })
        .collect();
    for customer in &mut out {
        let (low, high) = BANDS[customer.revenue_band];
        customer.revenue_cents = between(&mut rng, low, high);
        customer.target_percent = between(&mut rng, 60, 150);
        if customer.heavy {
            customer.target_percent = between(&mut rng, 400, 450);
        }
        customer.jitter_seed = rng.next_u64();
    }
    out
}

/// Checks [`PLANS`] and [`BANDS`] against the catalogue the run migrated (`plans`: id,
/// lowest and highest monthly revenue of its fee band, cents): every plan there, in band
/// order, each band within its plan's, and every catalogue plan dealt.
pub(crate) fn check_catalogue(plans: &[(String, i64, Option<i64>)]) -> anyhow::Result<()> {
    let ids: Vec<&str> = plans.iter().map(|(id, _, _)| id.as_str()).collect();
    anyhow::ensure!(
        ids == PLANS,
        "the simulation deals the plans {PLANS:?}, the catalogue holds {ids:?}"
    );
    for ((id, low, high), (min, max)) in plans.iter().zip(BANDS) {
        let fits = *low <= min as i64 && high.is_none_or(|h| max as i64 <= h);
        anyhow::ensure!(
            fits,
            "the simulation's revenue band of {id}, {min} to {max} cents, is outside the \
             catalogue's ({low} to {high:?})"
        );
    }
    Ok(())
}

/// A customer's impressions in hour `hour` (0 = the first simulated hour) against an
/// allowance of `allowance` impressions a month: a rate growing linearly over the month so
/// that its first 30 days total [`SimCustomer::target_percent`] of the allowance, with a
/// seeded ±10 % jitter per hour. Always at least 1 (a record's quantity is never zero).
pub(crate) fn hourly_quantity(customer: &SimCustomer, allowance: u64, hour: u64) -> u64 {
    // Over 720 hours the rate goes from r to 3r: the total is 720 × 2r, so
    // r = allowance × target / 100 / 1440.
    let total = allowance as u128 * customer.target_percent as u128 / 100;
    let growth = 720 + 2 * hour.min(720) as u128;
    let base = total * growth / (1440 * 720);
    let mut jitter = ChaCha8Rng::seed_from_u64(customer.jitter_seed ^ hour);
    let factor = 90 + jitter.next_u64() % 21; // 90 to 110 %
    ((base * factor as u128 / 100) as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_mix_and_every_role() {
        let a = customers(20, 7);
        let b = customers(20, 7);
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        assert_ne!(format!("{a:?}"), format!("{:?}", customers(20, 8)));
        for plan in PLANS {
            assert!(a.iter().any(|c| c.plan == plan), "{plan}");
        }
        for band in 0..BANDS.len() {
            assert!(a.iter().any(|c| c.revenue_band == band), "band {band}");
        }
        for card in [Card::FailsThenRecovers, Card::FailsUntilSuspended] {
            let with: Vec<_> = a.iter().filter(|c| c.card == card).collect();
            assert_eq!(with.len(), 2, "{card:?}");
            assert!(with.iter().all(|c| c.plan != "enterprise"));
        }
        assert_eq!(a.iter().filter(|c| c.trial_days.is_some()).count(), 2);
        let heavy: Vec<_> = a.iter().filter(|c| c.heavy).collect();
        assert_eq!(heavy.len(), 2);
        assert!(heavy.iter().all(|c| c.card == Card::Good
            && c.trial_days.is_none()
            && c.plan != "enterprise"
            && c.target_percent >= 400));
        for c in &a {
            let (low, high) = BANDS[c.revenue_band];
            assert!((low..=high).contains(&c.revenue_cents), "{c:?}");
        }
    }

    #[test]
    fn the_catalogue_must_hold_the_plans_and_bands_dealt() {
        let catalogue = |starter_max: Option<i64>| {
            vec![
                ("starter".to_owned(), 0, starter_max),
                ("growth".to_owned(), 1_000_001, Some(10_000_000)),
                ("scale".to_owned(), 10_000_001, Some(50_000_000)),
                ("enterprise".to_owned(), 50_000_001, None),
            ]
        };
        check_catalogue(&catalogue(Some(1_000_000))).unwrap();
        // A band the catalogue narrowed, a plan it lacks.
        assert!(check_catalogue(&catalogue(Some(500_000))).is_err());
        assert!(check_catalogue(&catalogue(Some(1_000_000))[1..]).is_err());
    }

    #[test]
    fn usage_grows_to_the_target_over_thirty_days() {
        let mut c = customers(1, 1).remove(0);
        c.target_percent = 100;
        let total: u64 = (0..720).map(|h| hourly_quantity(&c, 1_000_000, h)).sum();
        // Within the jitter's ±10 % of the allowance.
        assert!((900_000..=1_100_000).contains(&total), "{total}");
        assert!(hourly_quantity(&c, 1_000_000, 700) > hourly_quantity(&c, 1_000_000, 10));
    }
}
