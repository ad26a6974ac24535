//! Requests a second per source address on the enrollment port: a token bucket per address,
//! in a table of bounded size.
//!
//! Enrollment is rare (an agent enrolls once and renews every few weeks), so the allowance is
//! small: a burst of [`BURST`] requests, then one every [`REFILL`]. A client that guesses
//! tokens gets a few dozen tries a minute from each address it has. The table holds at most
//! [`MAX_ADDRESSES`] addresses; when it is full, those whose bucket has refilled are
//! forgotten, and if none has, a new address is refused until one has: the memory stays
//! bounded whatever the number of addresses a flood comes from, at the price of refusing
//! newcomers during such a flood (counted as `rate_limited`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Requests an address may make at once.
pub(crate) const BURST: u32 = 30;
/// One more request allowed after this long.
pub(crate) const REFILL: Duration = Duration::from_secs(2);
/// Addresses tracked at most.
pub(crate) const MAX_ADDRESSES: usize = 10_000;

/// The buckets.
#[derive(Debug)]
pub(crate) struct PerAddress {
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
    burst: u32,
    refill: Duration,
    max_addresses: usize,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Requests left at `at`.
    left: f64,
    at: Instant,
}

impl Bucket {
    fn refilled(self, now: Instant, burst: u32, refill: Duration) -> f64 {
        let gained = now.saturating_duration_since(self.at).as_secs_f64() / refill.as_secs_f64();
        (self.left + gained).min(f64::from(burst))
    }
}

impl Default for PerAddress {
    fn default() -> Self {
        Self::new(BURST, REFILL, MAX_ADDRESSES)
    }
}

impl PerAddress {
    pub(crate) fn new(burst: u32, refill: Duration, max_addresses: usize) -> Self {
        Self {
            buckets: Mutex::new(HashMap::new()),
            burst,
            refill,
            max_addresses,
        }
    }

    /// Whether `address` may make a request at `now` (which then counts).
    pub(crate) fn allow(&self, address: IpAddr, now: Instant) -> bool {
        let address = address.to_canonical();
        let (burst, refill) = (self.burst, self.refill);
        let mut buckets = self.buckets.lock().expect("rate limit table");
        if !buckets.contains_key(&address) && buckets.len() >= self.max_addresses {
            buckets.retain(|_, b| b.refilled(now, burst, refill) < f64::from(burst));
            if buckets.len() >= self.max_addresses {
                return false;
            }
        }
        let bucket = buckets.entry(address).or_insert(Bucket {
            left: f64::from(burst),
            at: now,
        });
        let left = bucket.refilled(now, burst, refill);
        if left < 1.0 {
            return false;
        }
        *bucket = Bucket {
            left: left - 1.0,
            at: now,
        };
        true
    }

    /// Addresses tracked now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.buckets.lock().expect("rate limit table").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn a_burst_then_one_per_refill() {
        let limit = PerAddress::new(3, Duration::from_secs(2), 10);
        let t = Instant::now();
        assert!((0..3).all(|_| limit.allow(ip(1), t)));
        assert!(!limit.allow(ip(1), t));
        assert!(!limit.allow(ip(1), t + Duration::from_secs(1)));
        assert!(limit.allow(ip(1), t + Duration::from_secs(2)));
        assert!(!limit.allow(ip(1), t + Duration::from_secs(2)));
        // Another address has its own bucket.
        assert!(limit.allow(ip(2), t));
        // An IPv4 client seen through an IPv6 socket is the same address.
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert!(!limit.allow(mapped, t + Duration::from_secs(2)));
    }

    #[test]
    fn the_table_stays_bounded_and_forgets_refilled_addresses() {
        let limit = PerAddress::new(2, Duration::from_secs(1), 4);
        let t = Instant::now();
        for i in 0..4 {
            assert!(limit.allow(ip(i), t));
        }
        // Full, nobody refilled yet: a newcomer is refused, and nothing grows.
        assert!(!limit.allow(ip(9), t));
        assert_eq!(limit.len(), 4);
        // Once they have refilled, they are forgotten to make room.
        let later = t + Duration::from_secs(5);
        assert!(limit.allow(ip(9), later));
        assert_eq!(limit.len(), 1);
    }
}
