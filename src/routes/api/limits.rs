//! Rate limits of the management API: a token bucket per key (`TOLLGATE_API_RATE_PER_SECOND`,
//! bursts of twice that), per replica. A request over the limit gets 429 with `Retry-After`.
//!
//! A bucket left alone for as long as it takes to fill (two seconds) is full again,
//! just like a new one: it is dropped then. At most `api_rate_max_keys` buckets are kept (a
//! [`BoundedMap`]); past that the bucket used longest ago is dropped, which can only give
//! that key a fresh burst early.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tollgate_core::bounded::BoundedMap;
use tollgate_core::ids::KeyId;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<BoundedMap<KeyId, Bucket>>,
}

impl RateLimiter {
    /// `per_second` for each key, for at most `max_keys` keys at a time.
    pub fn new(per_second: u32, max_keys: usize) -> Self {
        let rate = f64::from(per_second.max(1));
        let burst = rate * 2.0;
        // An untouched bucket is full again after this long: as good as a new one.
        let refill = Duration::from_secs_f64(burst / rate);
        Self { rate, burst, buckets: Mutex::new(BoundedMap::with_ttl(max_keys, refill)) }
    }

    /// Takes one request's token for `key`; when there is none, the whole seconds to wait.
    pub fn check(&self, key: &KeyId) -> Result<(), u64> {
        let Ok(mut buckets) = self.buckets.lock() else { return Ok(()) };
        let now = Instant::now();
        let mut bucket = buckets.get(key).copied().unwrap_or(Bucket { tokens: self.burst, at: now });
        bucket.tokens = (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * self.rate).min(self.burst);
        bucket.at = now;
        let outcome = if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - bucket.tokens) / self.rate).ceil().max(1.0) as u64)
        };
        buckets.insert(key.clone(), bucket);
        outcome
    }

    /// How many buckets are kept (full ones dropped first), and at most.
    pub fn size(&self) -> (usize, usize) {
        self.buckets.lock().map_or((0, 0), |mut b| (b.sweep(), b.capacity()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_waits() {
        let limiter = RateLimiter::new(2, 100);
        let key = KeyId::generate();
        for _ in 0..4 {
            assert!(limiter.check(&key).is_ok());
        }
        assert_eq!(limiter.check(&key), Err(1));
        assert!(limiter.check(&KeyId::generate()).is_ok(), "keys have buckets of their own");
    }

    #[test]
    fn buckets_are_bounded_and_an_evicted_one_starts_full() {
        let limiter = RateLimiter::new(1, 3);
        let keys: Vec<KeyId> = (0..10).map(|_| KeyId::generate()).collect();
        for key in &keys {
            assert!(limiter.check(key).is_ok());
            assert!(limiter.size().0 <= 3);
        }
        assert_eq!(limiter.size(), (3, 3));
        // The first key's bucket was dropped: it has a full burst again.
        assert!(limiter.check(&keys[0]).is_ok());
        assert!(limiter.check(&keys[0]).is_ok());
        assert_eq!(limiter.check(&keys[0]), Err(1));
    }
}
