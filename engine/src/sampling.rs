//! Choosing the next token from logits: greedy, temperature, top-k, top-p,
//! min-p, repetition/presence/frequency penalties, seeded draws, and
//! log-probabilities with top alternatives.
//!
//! Filters apply in llama.cpp's order: penalties, top-k, top-p, min-p,
//! temperature, then the draw. Log-probabilities always describe the model's
//! raw distribution (log-softmax of the unmodified logits), as the OpenAI API
//! reports them.

use serde::{Deserialize, Serialize};

/// A sampling parameter outside its allowed range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field} = {value} is out of range: {allowed}")]
pub struct SamplingError {
    pub field: &'static str,
    pub value: String,
    pub allowed: &'static str,
}

/// How to pick tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 is greedy.
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1 disables.
    pub top_p: f32,
    /// 0 disables.
    pub min_p: f32,
    /// 1 disables; > 1 discourages tokens already in the window.
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// How many trailing context tokens the penalties look at.
    pub penalty_window: usize,
    pub seed: Option<u64>,
    /// Alternatives to report per token (0 = none).
    pub logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_window: 64,
            seed: None,
            logprobs: 0,
        }
    }
}

/// Most alternatives a request may ask for.
pub const MAX_LOGPROBS: usize = 20;

impl SamplingParams {
    /// Checks every field's range, naming the first bad one.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let check = |ok: bool, field, value: String, allowed| {
            if ok {
                Ok(())
            } else {
                Err(SamplingError {
                    field,
                    value,
                    allowed,
                })
            }
        };
        let t = self.temperature;
        check(
            (0.0..=2.0).contains(&t),
            "temperature",
            t.to_string(),
            "0 to 2",
        )?;
        let p = self.top_p;
        check(
            p > 0.0 && p <= 1.0,
            "top_p",
            p.to_string(),
            "greater than 0, at most 1",
        )?;
        let m = self.min_p;
        check((0.0..=1.0).contains(&m), "min_p", m.to_string(), "0 to 1")?;
        let r = self.repetition_penalty;
        check(
            r > 0.0 && r <= 10.0,
            "repetition_penalty",
            r.to_string(),
            "greater than 0, at most 10",
        )?;
        let pp = self.presence_penalty;
        check(
            (-2.0..=2.0).contains(&pp),
            "presence_penalty",
            pp.to_string(),
            "-2 to 2",
        )?;
        let fp = self.frequency_penalty;
        check(
            (-2.0..=2.0).contains(&fp),
            "frequency_penalty",
            fp.to_string(),
            "-2 to 2",
        )?;
        let l = self.logprobs;
        check(l <= MAX_LOGPROBS, "logprobs", l.to_string(), "0 to 20")?;
        Ok(())
    }
}

/// A chosen token with its log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    pub id: u32,
    /// Log-probability of `id` under the raw distribution.
    pub logprob: f32,
    /// The `logprobs` most likely tokens under the raw distribution, best first.
    pub top: Vec<(u32, f32)>,
}

/// xoshiro256** seeded through splitmix64: small, fast and the same on every platform.
#[derive(Debug, Clone)]
struct Rng([u64; 4]);

impl Rng {
    fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Self([next(), next(), next(), next()])
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn entropy_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Picks tokens for one sequence; owns its random state and scratch buffers.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    logits: Vec<f32>,
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    /// A sampler; without a seed it draws one from the clock.
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng::new(params.seed.unwrap_or_else(entropy_seed));
        Self {
            params,
            rng,
            logits: Vec::new(),
            candidates: Vec::new(),
        }
    }

    /// The parameters.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Whether a token is the raw logits' argmax and needs nothing else of
    /// them (no penalties, no alternatives): what [`greedy_pick`] gives, so a
    /// backend may pick it on the device.
    pub fn is_plain_greedy(&self) -> bool {
        let p = &self.params;
        (p.temperature <= 0.0 || p.top_k == 1) && !has_penalties(p) && p.logprobs == 0
    }

    /// Picks the next token from raw logits; `context` is the prompt and the
    /// tokens generated so far.
    pub fn sample(&mut self, logits: &[f32], context: &[u32]) -> SampledToken {
        self.logits.clear();
        self.logits.extend_from_slice(logits);
        apply_penalties(&mut self.logits, context, &self.params);
        let id = if self.params.temperature <= 0.0 || self.params.top_k == 1 {
            argmax(&self.logits)
        } else {
            self.draw()
        };
        let top = self.params.logprobs;
        let lse = log_sum_exp(logits);
        let logprob = logits
            .get(id as usize)
            .map_or(f32::NEG_INFINITY, |&l| l - lse);
        let top = if top > 0 {
            top_n(logits, top)
                .into_iter()
                .map(|(t, l)| (t, l - lse))
                .collect()
        } else {
            Vec::new()
        };
        SampledToken { id, logprob, top }
    }

    /// Filters the penalized logits in `self.logits` and draws from what remains.
    fn draw(&mut self) -> u32 {
        let p = &self.params;
        let c = &mut self.candidates;
        c.clear();
        c.extend(self.logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, |a, b| b.1.total_cmp(&a.1));
            c.truncate(p.top_k);
        }
        c.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        // Probabilities at temperature 1 for top-p and min-p, as llama.cpp computes them.
        let max = c[0].1;
        let mut probs: Vec<f64> = c.iter().map(|&(_, l)| ((l - max) as f64).exp()).collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        let mut keep = c.len();
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            for (i, q) in probs.iter().enumerate() {
                cum += q;
                if cum >= p.top_p as f64 {
                    keep = keep.min(i + 1);
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p as f64;
            keep = keep.min(probs.iter().take_while(|&&q| q >= floor).count().max(1));
        }
        c.truncate(keep);
        let t = p.temperature as f64;
        let weights: Vec<f64> = c
            .iter()
            .map(|&(_, l)| ((l - max) as f64 / t).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let mut r = self.rng.unit() * total;
        for (i, w) in weights.iter().enumerate() {
            if r < *w {
                return c[i].0;
            }
            r -= w;
        }
        c[c.len() - 1].0
    }
}

fn has_penalties(p: &SamplingParams) -> bool {
    p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 || p.frequency_penalty != 0.0
}

fn apply_penalties(logits: &mut [f32], context: &[u32], p: &SamplingParams) {
    if !has_penalties(p) {
        return;
    }
    let window = &context[context.len().saturating_sub(p.penalty_window)..];
    let mut counts: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
    for &t in window {
        *counts.entry(t).or_default() += 1;
    }
    for (&t, &n) in &counts {
        let Some(l) = logits.get_mut(t as usize) else {
            continue;
        };
        if *l > 0.0 {
            *l /= p.repetition_penalty;
        } else {
            *l *= p.repetition_penalty;
        }
        *l -= n as f32 * p.frequency_penalty + p.presence_penalty;
    }
}

/// A plain greedy choice from one row of raw logits: the argmax and its
/// log-probability, exactly what [`Sampler::sample`] gives when
/// [`Sampler::is_plain_greedy`].
pub fn greedy_pick(logits: &[f32]) -> (u32, f32) {
    let id = argmax(logits);
    let logprob = logits
        .get(id as usize)
        .map_or(f32::NEG_INFINITY, |&l| l - log_sum_exp(logits));
    (id, logprob)
}

/// Index of the largest value; ties go to the lowest index.
fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// ln Σ exp(x), for every sampled token's log-probability. Over a vocabulary
/// of 49,152 a double-precision `exp` per logit took 0.25–0.29 ms per token
/// (5% of the CPU of a 64-sequence decode on two cores); [`exp_nonpositive`]
/// in lanes that vectorize takes a quarter of that (55–72 µs). Lanes sum 16 values each in single
/// precision, then every 256 values go into a double.
fn log_sum_exp(x: &[f32]) -> f32 {
    const LANES: usize = 16;
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return max;
    }
    let mut total = 0.0f64;
    let mut chunks = x.chunks_exact(LANES * LANES);
    for chunk in &mut chunks {
        let mut lanes = [0f32; LANES];
        for row in chunk.chunks_exact(LANES) {
            for (l, &v) in lanes.iter_mut().zip(row) {
                *l += exp_nonpositive(v - max);
            }
        }
        total += lanes.iter().map(|&l| f64::from(l)).sum::<f64>();
    }
    total += chunks
        .remainder()
        .iter()
        .map(|&v| f64::from(exp_nonpositive(v - max)))
        .sum::<f64>();
    max + total.ln() as f32
}

/// e^x for x ≤ 0 within 3e-7 relative down to e^-87 (below which it
/// returns e^-87, nothing beside the 1 of the maximum): x = n ln 2 + r with
/// |r| ≤ ln 2 / 2, e^r by its degree-6 Taylor polynomial, 2^n from the
/// exponent bits. Branch-free, so a loop over it vectorizes.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5 * 2^23 rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.max(-87.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // n is in -126..=0: a normal power of two.
    let k = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    p * f32::from_bits(((k + 127) as u32) << 23)
}

/// The `n` largest values with their indices, best first.
fn top_n(x: &[f32], n: usize) -> Vec<(u32, f32)> {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    for (i, &v) in x.iter().enumerate() {
        if best.len() == n && best.last().is_some_and(|&(_, w)| v <= w) {
            continue;
        }
        let pos = best.partition_point(|&(_, w)| w >= v);
        best.insert(pos, (i as u32, v));
        best.truncate(n);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams::default()
    }

    #[test]
    fn the_fast_exponential_is_within_3e_7_of_exp() {
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let (want, got) = (f64::from(x).exp(), f64::from(exp_nonpositive(x)));
            assert!(
                ((got - want) / want).abs() < 3e-7,
                "e^{x}: {got} for {want}"
            );
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(-1e4) > 0.0 && exp_nonpositive(-1e4) < 2e-38);
    }

    #[test]
    fn log_sum_exp_matches_the_double_precision_sum() {
        let x: Vec<f32> = (0..49_152)
            .map(|i| ((i * 7919 % 1000) as f32) / 50.0 - 10.0)
            .collect();
        for v in [
            &x[..],
            &x[..1000],
            &x[..7],
            &[f32::NEG_INFINITY, -3.0, 2.5][..],
        ] {
            let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let want = f64::from(max)
                + v.iter()
                    .map(|&l| (f64::from(l) - f64::from(max)).exp())
                    .sum::<f64>()
                    .ln();
            let got = f64::from(log_sum_exp(v));
            assert!((got - want).abs() < 1e-5, "{got} for {want}");
        }
    }

    #[test]
    fn greedy_is_argmax_with_lowest_index_on_ties() {
        let mut s = Sampler::new(params());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0], &[]).id, 1);
    }

    #[test]
    fn a_plain_greedy_pick_is_what_the_sampler_gives() {
        let logits: Vec<f32> = (0..5000)
            .map(|i| ((i * 7919 % 1013) as f32) / 40.0 - 12.0)
            .collect();
        let mut s = Sampler::new(params());
        assert!(s.is_plain_greedy());
        let want = s.sample(&logits, &[1, 2, 3]);
        assert_eq!(greedy_pick(&logits), (want.id, want.logprob));
        assert_eq!(
            greedy_pick(&[1.0, 3.0, 3.0]).0,
            1,
            "ties to the lowest index"
        );
        assert!(greedy_pick(&[f32::NEG_INFINITY; 4]).1.is_nan());
        // Anything that needs more of the logits than their argmax is not plain.
        for p in [
            SamplingParams {
                temperature: 0.7,
                ..params()
            },
            SamplingParams {
                logprobs: 2,
                ..params()
            },
            SamplingParams {
                presence_penalty: 0.5,
                ..params()
            },
            SamplingParams {
                repetition_penalty: 1.1,
                ..params()
            },
        ] {
            assert!(!Sampler::new(p).is_plain_greedy());
        }
        let top1 = SamplingParams {
            temperature: 0.7,
            top_k: 1,
            ..params()
        };
        assert!(Sampler::new(top1).is_plain_greedy());
    }

    #[test]
    fn logprobs_are_the_raw_distribution() {
        let mut s = Sampler::new(SamplingParams {
            logprobs: 3,
            repetition_penalty: 2.0,
            ..params()
        });
        let logits = [1.0f32, 2.0, 0.5, 4.0, 3.0];
        let t = s.sample(&logits, &[3]);
        let lse = logits.iter().map(|&l| (l as f64).exp()).sum::<f64>().ln();
        assert_eq!(t.top.iter().map(|x| x.0).collect::<Vec<_>>(), vec![3, 4, 1]);
        for &(id, lp) in &t.top {
            assert!((lp as f64 - (logits[id as usize] as f64 - lse)).abs() < 1e-5);
        }
        // The penalty moved the choice to token 4, but logprob reports the raw one.
        assert_eq!(t.id, 4);
        assert!((t.logprob as f64 - (3.0 - lse)).abs() < 1e-5);
    }

    fn draws(seed: u64, n: usize, p: SamplingParams) -> Vec<u32> {
        let mut s = Sampler::new(SamplingParams {
            seed: Some(seed),
            ..p
        });
        let logits = [1.0f32, 1.5, 0.2, 1.2, 0.9, 0.0];
        (0..n).map(|_| s.sample(&logits, &[]).id).collect()
    }

    #[test]
    fn seeds_reproduce_and_differ() {
        let p = SamplingParams {
            temperature: 1.0,
            ..params()
        };
        assert_eq!(draws(5, 50, p.clone()), draws(5, 50, p.clone()));
        assert_ne!(draws(5, 50, p.clone()), draws(6, 50, p));
    }

    #[test]
    fn top_k_one_is_greedy_and_filters_cut_the_tail() {
        let greedy = draws(
            1,
            20,
            SamplingParams {
                temperature: 1.0,
                top_k: 1,
                ..params()
            },
        );
        assert!(greedy.iter().all(|&t| t == 1));
        let top2 = draws(
            1,
            200,
            SamplingParams {
                temperature: 1.0,
                top_k: 2,
                ..params()
            },
        );
        assert!(top2.iter().all(|&t| t == 1 || t == 3));
        // min_p 0.9 keeps only tokens within 90% of the best's probability.
        let minp = draws(
            1,
            200,
            SamplingParams {
                temperature: 1.0,
                min_p: 0.9,
                ..params()
            },
        );
        assert!(minp.iter().all(|&t| t == 1));
        // top_p 0.3 keeps the smallest prefix reaching 30%: the best two tokens.
        let topp = draws(
            1,
            200,
            SamplingParams {
                temperature: 1.0,
                top_p: 0.3,
                ..params()
            },
        );
        assert!(topp.iter().all(|&t| t == 1 || t == 3), "{topp:?}");
    }

    #[test]
    fn frequencies_follow_the_distribution() {
        let logits = [0.0f32, (2.0f32).ln(), (3.0f32).ln(), f32::NEG_INFINITY];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            seed: Some(11),
            ..params()
        });
        let mut counts = [0usize; 4];
        let n = 60_000;
        for _ in 0..n {
            counts[s.sample(&logits, &[]).id as usize] += 1;
        }
        assert_eq!(counts[3], 0);
        for (i, want) in [1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0].iter().enumerate() {
            let got = counts[i] as f64 / n as f64;
            assert!((got - want).abs() < 0.01, "token {i}: {got} vs {want}");
        }
    }

    #[test]
    fn penalties_move_the_choice() {
        let logits = [2.0f32, 1.9, 0.0];
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.5,
            ..params()
        });
        assert_eq!(s.sample(&logits, &[0]).id, 1);
        let mut s = Sampler::new(SamplingParams {
            frequency_penalty: 0.05,
            ..params()
        });
        assert_eq!(
            s.sample(&logits, &[0]).id,
            0,
            "one occurrence costs 0.05 only"
        );
        assert_eq!(s.sample(&logits, &[0, 0, 0]).id, 1);
        // The window only looks back penalty_window tokens.
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 0.5,
            penalty_window: 1,
            ..params()
        });
        assert_eq!(s.sample(&logits, &[0, 2]).id, 0);
    }

    #[test]
    fn validate_names_the_field() {
        let bad = |p: SamplingParams| p.validate().unwrap_err().field;
        assert_eq!(
            bad(SamplingParams {
                temperature: 3.0,
                ..params()
            }),
            "temperature"
        );
        assert_eq!(
            bad(SamplingParams {
                top_p: 0.0,
                ..params()
            }),
            "top_p"
        );
        assert_eq!(
            bad(SamplingParams {
                logprobs: 21,
                ..params()
            }),
            "logprobs"
        );
        assert_eq!(
            bad(SamplingParams {
                presence_penalty: -2.5,
                ..params()
            }),
            "presence_penalty"
        );
        assert!(params().validate().is_ok());
    }
}
