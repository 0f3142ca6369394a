//! A log-linear latency histogram (the HDR histogram's bucket layout): values below 128 are
//! exact, above that each power of two is split in 64 buckets, so a reported percentile is
//! within 1/64 (1.6 %) of the true value. Recording is an index computation and an increment:
//! nothing is allocated after construction.

/// Bits of the linear part.
const SUB_BITS: u32 = 7;
const HALF: usize = 1 << (SUB_BITS - 1);
/// Buckets for every u64 value.
const BUCKETS: usize = (64 - SUB_BITS as usize + 1) * HALF + HALF;

/// A histogram of `u64` values (nanoseconds here).
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
    min: u64,
    sum: u128,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new()
    }
}

fn index(v: u64) -> usize {
    if v < (1 << SUB_BITS) {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros();
    let shift = msb - (SUB_BITS - 1);
    (shift as usize) * HALF + (v >> shift) as usize
}

/// The lowest value and the width of bucket `i`.
fn bucket_range(i: usize) -> (u64, u64) {
    if i < (1 << SUB_BITS) {
        return (i as u64, 1);
    }
    let shift = (i / HALF - 1) as u32;
    let sub = (i % HALF + HALF) as u64;
    (sub << shift, 1u64 << shift)
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Histogram {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            max: 0,
            min: u64::MAX,
            sum: 0,
        }
    }

    /// Records one value.
    pub fn record(&mut self, v: u64) {
        if let Some(c) = self.counts.get_mut(index(v)) {
            *c += 1;
        }
        self.total += 1;
        self.max = self.max.max(v);
        self.min = self.min.min(v);
        self.sum += u128::from(v);
    }

    /// Adds another histogram's values.
    pub fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.total += o.total;
        self.max = self.max.max(o.max);
        self.min = self.min.min(o.min);
        self.sum += o.sum;
    }

    /// Number of values.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// Largest value (0 if empty).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Mean (0 if empty).
    pub fn mean(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.sum as f64 / self.total as f64
        }
    }

    /// The value at percentile `p` (0..=100): the middle of the bucket holding the
    /// ceil(p% * n)-th smallest value, clamped to the recorded min and max. 0 if empty.
    pub fn percentile(&self, p: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((p.clamp(0.0, 100.0) / 100.0) * self.total as f64).ceil() as u64;
        let rank = rank.clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                let (lo, w) = bucket_range(i);
                return (lo + w / 2).clamp(self.min, self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_index_is_monotonic_and_ranges_contain_values() {
        let mut last = 0;
        for v in (0..5000u64).chain([1 << 20, (1 << 40) + 12345, u64::MAX]) {
            let i = index(v);
            assert!(i >= last, "index not monotonic at {v}");
            last = i;
            let (lo, w) = bucket_range(i);
            assert!(lo <= v && v - lo < w, "{v} not in bucket {i} = {lo}+{w}");
            assert!(i < BUCKETS);
        }
    }

    #[test]
    fn test_percentiles_of_uniform_values_within_two_percent() {
        let mut h = Histogram::new();
        for v in 1..=100_000u64 {
            h.record(v);
        }

        let p50 = h.percentile(50.0) as f64;
        let p99 = h.percentile(99.0) as f64;
        let p999 = h.percentile(99.9) as f64;

        assert!((p50 / 50_000.0 - 1.0).abs() < 0.02, "{p50}");
        assert!((p99 / 99_000.0 - 1.0).abs() < 0.02, "{p99}");
        assert!((p999 / 99_900.0 - 1.0).abs() < 0.02, "{p999}");
        assert_eq!(h.max(), 100_000);
        assert_eq!(h.count(), 100_000);
    }

    #[test]
    fn test_merge_adds_counts_and_empty_reports_zero() {
        let mut a = Histogram::new();
        let mut b = Histogram::new();
        a.record(10);
        b.record(1000);

        a.merge(&b);

        assert_eq!(a.count(), 2);
        assert_eq!(a.percentile(100.0), 1000);
        assert_eq!(a.percentile(1.0), 10);
        assert_eq!(Histogram::new().percentile(50.0), 0);
    }
}
