//! What the demo seeds, which orders it places (each with the final state it must reach),
//! and when it places them around the outage.

use std::time::Duration;

/// Consumers in good standing.
pub(crate) const CONSUMERS: [&str; 4] = ["Ann", "Bao", "Chidi", "Dana"];
/// The consumer suspended before any order is placed.
pub(crate) const SUSPENDED_CONSUMER: &str = "Sam (suspended)";

/// A restaurant to seed.
#[derive(Debug)]
pub(crate) struct RestaurantSeed {
    pub(crate) name: &'static str,
    pub(crate) zones: &'static [&'static str],
    /// `(id, name, price)`.
    pub(crate) menu: &'static [(&'static str, &'static str, f64)],
    /// A zone the restaurant does not serve (served by the other one).
    pub(crate) zone_not_served: &'static str,
}

/// The two restaurants. Each one's menu items are absent from the other's menu and each
/// serves a zone the other does not: that is what the rejected orders use.
pub(crate) const RESTAURANTS: [RestaurantSeed; 2] = [
    RestaurantSeed {
        name: "Ajanta",
        zones: &["north", "centre"],
        menu: &[
            ("dal", "Dal makhani", 8.5),
            ("naan", "Garlic naan", 3.0),
            ("biryani", "Chicken biryani", 12.0),
            ("lassi", "Mango lassi", 4.5),
        ],
        zone_not_served: "south",
    },
    RestaurantSeed {
        name: "Bella Napoli",
        zones: &["south", "centre"],
        menu: &[
            ("margherita", "Pizza margherita", 9.0),
            ("diavola", "Pizza diavola", 11.0),
            ("tiramisu", "Tiramisu", 6.0),
            ("spritz", "Spritz", 7.5),
        ],
        zone_not_served: "north",
    },
];

/// Why an order ends the way it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Kind {
    /// Known consumer, items on the menu, zone served: VALIDATED.
    Valid,
    /// Consumer suspended (consumer-service rejects).
    SuspendedConsumer,
    /// Consumer id nobody registered (consumer-service rejects).
    UnknownConsumer,
    /// An item of the other restaurant (restaurant-service rejects; the order service
    /// accepts it at first: its replica may be stale).
    ItemNotOnMenu,
    /// A zone the restaurant does not serve (restaurant-service rejects).
    ZoneNotServed,
}

impl Kind {
    /// The kind of the `i`-th order: a fixed cycle of 20 with 16 valid orders and one of
    /// each rejection, so every stretch of the run (before, during, after the outage) has
    /// both.
    pub(crate) fn of(i: u32) -> Self {
        match i % 20 {
            4 => Self::SuspendedConsumer,
            9 => Self::ItemNotOnMenu,
            13 => Self::UnknownConsumer,
            17 => Self::ZoneNotServed,
            _ => Self::Valid,
        }
    }

    /// The final state the order must reach.
    pub(crate) fn expected(self) -> &'static str {
        match self {
            Self::Valid => "VALIDATED",
            _ => "REJECTED",
        }
    }

    /// In words, for the summary.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Valid => "valid",
            Self::SuspendedConsumer => "suspended consumer",
            Self::UnknownConsumer => "unknown consumer",
            Self::ItemNotOnMenu => "item not on the menu",
            Self::ZoneNotServed => "zone not served",
        }
    }
}

/// The ids the seeding produced.
#[derive(Debug, Clone)]
pub(crate) struct Seeded {
    pub(crate) consumers: Vec<String>,
    pub(crate) suspended: String,
    /// In the order of [`RESTAURANTS`].
    pub(crate) restaurants: Vec<String>,
}

/// One order to place.
#[derive(Debug, Clone)]
pub(crate) struct OrderSpec {
    pub(crate) index: u32,
    pub(crate) kind: Kind,
    /// The `POST /orders` body.
    pub(crate) body: serde_json::Value,
    /// A rejection's reason must name this (the consumer id, the item or the zone).
    pub(crate) reason_names: Option<String>,
}

impl OrderSpec {
    /// The `i`-th order of the run (deterministic).
    pub(crate) fn new(i: u32, seeded: &Seeded) -> Self {
        let kind = Kind::of(i);
        let r = ((i / 2) % 2) as usize;
        let (restaurant, other) = (&RESTAURANTS[r], &RESTAURANTS[1 - r]);
        let n = i as usize;
        let mut consumer = seeded.consumers[n % seeded.consumers.len()].clone();
        let mut zone = restaurant.zones[n % restaurant.zones.len()].to_owned();
        let mut lines: Vec<(String, u32)> = (0..1 + n % 3)
            .map(|k| {
                let item = restaurant.menu[(n + k) % restaurant.menu.len()].0;
                (item.to_owned(), 1 + ((n + k) % 3) as u32)
            })
            .collect();
        let reason_names = match kind {
            Kind::Valid => None,
            Kind::SuspendedConsumer => {
                consumer = seeded.suspended.clone();
                Some(consumer.clone())
            }
            Kind::UnknownConsumer => {
                consumer = format!("no-such-consumer-{i}");
                Some(consumer.clone())
            }
            Kind::ItemNotOnMenu => {
                let foreign = other.menu[n % other.menu.len()].0;
                lines.push((foreign.to_owned(), 1));
                Some(foreign.to_owned())
            }
            Kind::ZoneNotServed => {
                restaurant.zone_not_served.clone_into(&mut zone);
                Some(zone.clone())
            }
        };
        let body = serde_json::json!({
            "consumerId": consumer,
            "restaurantId": seeded.restaurants[r],
            "deliveryZone": zone,
            "lineItems": lines
                .iter()
                .map(|(item, q)| serde_json::json!({ "menuItemId": item, "quantity": q }))
                .collect::<Vec<_>>(),
        });
        Self {
            index: i,
            kind,
            body,
            reason_names,
        }
    }
}

/// When orders are placed: `before` at `rate`, then consumer-service is killed and
/// `during` orders are spread evenly over the outage, then it is restarted and `after`
/// orders follow at `rate`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Schedule {
    pub(crate) before: u32,
    pub(crate) during: u32,
    pub(crate) after: u32,
    /// Orders per second outside the outage.
    pub(crate) rate: f64,
    pub(crate) outage: Duration,
}

impl Schedule {
    /// About a quarter of the orders before the outage. During it, as many as `rate`
    /// allows but at most three quarters of the rest, so some orders also go in after the
    /// restart; when that is fewer than `rate` allows, they are stretched over the whole
    /// outage (a short run still places orders all through it).
    pub(crate) fn new(orders: u32, rate: f64, outage: Duration) -> Self {
        if outage.is_zero() {
            return Self {
                before: orders,
                during: 0,
                after: 0,
                rate,
                outage,
            };
        }
        let before = if orders >= 2 { (orders / 4).max(1) } else { 0 };
        let rest = orders - before;
        let at_rate = (outage.as_secs_f64() * rate).floor().max(1.0) as u32;
        let during = at_rate.min(rest - rest / 4).max(rest.min(1));
        Self {
            before,
            during,
            after: rest - during,
            rate,
            outage,
        }
    }

    /// Seconds between two orders during the outage.
    pub(crate) fn during_spacing(&self) -> Duration {
        if self.during == 0 {
            return Duration::ZERO;
        }
        let even = self.outage.as_secs_f64() / f64::from(self.during);
        Duration::from_secs_f64(even.max(1.0 / self.rate))
    }

    /// Seconds between two orders outside the outage.
    pub(crate) fn spacing(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.rate)
    }

    /// The plan in one line.
    pub(crate) fn describe(&self) -> String {
        if self.outage.is_zero() {
            return format!("{} orders at {}/s, no outage", self.before, self.rate);
        }
        format!(
            "{} orders at {}/s, kill -9 consumer-service, {} orders over its {:.1} s outage \
             ({:.1}/s), restart it, {} more orders at {}/s",
            self.before,
            self.rate,
            self.during,
            self.outage.as_secs_f64(),
            1.0 / self.during_spacing().as_secs_f64().max(1e-9),
            self.after,
            self.rate
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeded() -> Seeded {
        Seeded {
            consumers: vec!["c0".into(), "c1".into()],
            suspended: "s".into(),
            restaurants: vec!["r0".into(), "r1".into()],
        }
    }

    #[test]
    fn every_kind_occurs_in_forty_orders() {
        let kinds: std::collections::BTreeSet<Kind> = (0..40).map(Kind::of).collect();
        assert_eq!(kinds.len(), 5);
        assert_eq!((0..40).filter(|i| Kind::of(*i) == Kind::Valid).count(), 32);
    }

    #[test]
    fn rejected_orders_name_what_is_wrong() {
        let s = seeded();
        let item = OrderSpec::new(9, &s);
        assert_eq!(item.kind, Kind::ItemNotOnMenu);
        let r = if item.body["restaurantId"] == "r0" {
            1
        } else {
            0
        };
        let foreign: Vec<&str> = RESTAURANTS[r].menu.iter().map(|m| m.0).collect();
        assert!(foreign.contains(&item.reason_names.as_deref().unwrap_or_default()));
        let zone = OrderSpec::new(17, &s);
        assert_eq!(
            zone.body["deliveryZone"],
            zone.reason_names.clone().unwrap_or_default()
        );
        assert_eq!(OrderSpec::new(4, &s).body["consumerId"], "s");
        assert!(OrderSpec::new(0, &s).reason_names.is_none());
    }

    #[test]
    fn valid_orders_stay_within_the_restaurant() {
        let s = seeded();
        for i in (0..100).filter(|i| Kind::of(*i) == Kind::Valid) {
            let o = OrderSpec::new(i, &s);
            let r = if o.body["restaurantId"] == "r0" { 0 } else { 1 };
            let zone = o.body["deliveryZone"].as_str().unwrap_or_default();
            assert!(RESTAURANTS[r].zones.contains(&zone));
            for l in o.body["lineItems"].as_array().into_iter().flatten() {
                let id = l["menuItemId"].as_str().unwrap_or_default();
                assert!(RESTAURANTS[r].menu.iter().any(|m| m.0 == id));
            }
        }
    }

    #[test]
    fn schedule_places_orders_during_and_after_the_outage() {
        let s = Schedule::new(40, 40.0, Duration::from_secs(2));
        assert_eq!(s.before + s.during + s.after, 40);
        assert_eq!((s.before, s.during, s.after), (10, 23, 7));
        assert!(s.during_spacing() * (s.during - 1) < Duration::from_secs(2));
        let big = Schedule::new(10_000, 50.0, Duration::from_secs(5));
        assert_eq!(big.during, 250);
        assert_eq!(big.during_spacing(), Duration::from_millis(20));
        let tiny = Schedule::new(1, 50.0, Duration::from_secs(5));
        assert_eq!((tiny.before, tiny.during, tiny.after), (0, 1, 0));
        let none = Schedule::new(7, 50.0, Duration::ZERO);
        assert_eq!((none.before, none.during, none.after), (7, 0, 0));
    }
}
