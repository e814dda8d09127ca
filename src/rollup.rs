//! Latency histograms for the rollups that the dashboards read
//! (sql/rollups.sql): a fixed log scale, 4 buckets per power of two from
//! 2^-10 ms (about 1 µs) to 2^22 ms (70 minutes), so a percentile read from
//! it is within 9% of the exact value whatever the range it covers.
//!
//! A histogram is stored sparse, as a sorted bigint[] whose elements are
//! `bucket << 40 | count`: a minute of spans usually fills a few buckets only.
use pgrx::prelude::*;

const PER_OCTAVE: f64 = 4.0;
const OFFSET: i32 = 40;
const BUCKETS: i32 = 128;
const COUNT_BITS: u32 = 40;
const COUNT_MASK: i64 = (1 << COUNT_BITS) - 1;

/// The bucket of a duration in milliseconds.
#[pg_extern(immutable, strict, parallel_safe)]
fn _fraiseql_latency_bucket(ms: f64) -> i32 {
    bucket(ms)
}

fn bucket(ms: f64) -> i32 {
    if ms.is_nan() || ms <= 0.0 {
        return 0;
    }
    ((ms.log2() * PER_OCTAVE).floor() as i64 + OFFSET as i64).clamp(0, (BUCKETS - 1) as i64) as i32
}

/// The value a bucket stands for: the geometric middle of its bounds.
fn bucket_value(b: i32) -> f64 {
    2f64.powf((b - OFFSET) as f64 / PER_OCTAVE + 0.5 / PER_OCTAVE)
}

fn decode(h: &[i64]) -> impl Iterator<Item = (i32, i64)> + '_ {
    h.iter().map(|e| ((e >> COUNT_BITS) as i32, e & COUNT_MASK))
}

fn merge(a: &[i64], b: &[i64]) -> Vec<i64> {
    let mut counts = [0i64; BUCKETS as usize];
    for (i, c) in decode(a).chain(decode(b)) {
        counts[i.clamp(0, BUCKETS - 1) as usize] += c;
    }
    counts
        .iter()
        .enumerate()
        .filter(|(_, c)| **c > 0)
        .map(|(i, c)| ((i as i64) << COUNT_BITS) | c.min(&COUNT_MASK))
        .collect()
}

/// One histogram from (bucket, count) pairs, as the rollup's GROUP BY makes them.
#[pg_extern(immutable, parallel_safe)]
fn _fraiseql_hist_from(buckets: Vec<i32>, counts: Vec<i64>) -> Vec<i64> {
    let pairs: Vec<i64> = buckets
        .iter()
        .zip(counts.iter())
        .map(|(b, c)| ((*b as i64) << COUNT_BITS) | (c & COUNT_MASK))
        .collect();
    merge(&pairs, &[])
}

/// The sum of two histograms (NULL is empty): the state function of
/// fraiseql_hist_merge_agg().
#[pg_extern(immutable, parallel_safe)]
fn _fraiseql_hist_merge(a: Option<Vec<i64>>, b: Option<Vec<i64>>) -> Option<Vec<i64>> {
    match (a, b) {
        (None, None) => None,
        (Some(a), None) => Some(a),
        (None, Some(b)) => Some(merge(&b, &[])),
        (Some(a), Some(b)) => Some(merge(&a, &b)),
    }
}

/// The q-quantile (0..1) of a histogram; NULL when it is empty.
#[pg_extern(immutable, strict, parallel_safe)]
fn fraiseql_hist_quantile(hist: Vec<i64>, q: f64) -> Option<f64> {
    quantile(&hist, q)
}

fn quantile(hist: &[i64], q: f64) -> Option<f64> {
    let total: i64 = decode(hist).map(|(_, c)| c).sum();
    if total == 0 {
        return None;
    }
    // the rank of the wanted value, 1-based, as percentile_disc counts
    let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as i64).max(1);
    let mut seen = 0;
    for (b, c) in decode(hist) {
        seen += c;
        if seen >= rank {
            return Some(bucket_value(b));
        }
    }
    decode(hist).last().map(|(b, _)| bucket_value(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(values: &[f64]) -> Vec<i64> {
        let mut h = Vec::new();
        for v in values {
            h = merge(&h, &[((bucket(*v) as i64) << COUNT_BITS) | 1]);
        }
        h
    }

    #[test]
    fn quantiles_are_within_the_bucket_error() {
        let values: Vec<f64> = (1..=10_000).map(|i| i as f64 * 0.37).collect();
        let h = hist(&values);
        for q in [0.5, 0.95, 0.99] {
            let exact = values[(q * values.len() as f64).ceil() as usize - 1];
            let got = quantile(&h, q).unwrap();
            assert!(
                (got / exact - 1.0).abs() < 0.095,
                "q={q} exact={exact} got={got}"
            );
        }
    }

    #[test]
    fn merging_adds_counts() {
        let a = hist(&[1.0, 2.0, 2.0, 500.0]);
        let b = hist(&[2.0, 0.001, 1e9]);
        let m = merge(&a, &b);
        let total: i64 = decode(&m).map(|(_, c)| c).sum();
        assert_eq!(total, 7);
        assert!(decode(&m)
            .map(|(b, _)| b)
            .collect::<Vec<_>>()
            .windows(2)
            .all(|w| w[0] < w[1]));
        assert_eq!(bucket(0.0), 0);
        assert_eq!(bucket(f64::NAN), 0);
        assert_eq!(bucket(1e12), BUCKETS - 1);
        assert_eq!(quantile(&[], 0.5), None);
    }
}
