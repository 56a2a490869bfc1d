//! Rate limits of the management API: a token bucket per key (`TOLLGATE_API_RATE_PER_SECOND`,
//! bursts of twice that), per replica. A request over the limit gets 429 with `Retry-After`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use tollgate_core::ids::KeyId;

struct Bucket {
    tokens: f64,
    at: Instant,
}

pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<KeyId, Bucket>>,
}

impl RateLimiter {
    pub fn new(per_second: u32) -> Self {
        let rate = f64::from(per_second.max(1));
        Self { rate, burst: rate * 2.0, buckets: Mutex::default() }
    }

    /// Takes one request's token for `key`; when there is none, the whole seconds to wait.
    pub fn check(&self, key: &KeyId) -> Result<(), u64> {
        let Ok(mut buckets) = self.buckets.lock() else { return Ok(()) };
        if buckets.len() > 100_000 {
            buckets.clear();
        }
        let now = Instant::now();
        let bucket = buckets.entry(key.clone()).or_insert(Bucket { tokens: self.burst, at: now });
        bucket.tokens = (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * self.rate).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - bucket.tokens) / self.rate).ceil().max(1.0) as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_waits() {
        let limiter = RateLimiter::new(2);
        let key = KeyId::generate();
        for _ in 0..4 {
            assert!(limiter.check(&key).is_ok());
        }
        assert_eq!(limiter.check(&key), Err(1));
        assert!(limiter.check(&KeyId::generate()).is_ok(), "keys have buckets of their own");
    }
}
