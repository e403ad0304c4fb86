//! Differential privacy for federated rounds: L2 clipping, Gaussian and Laplace noise,
//! adaptive clipping, and a Rényi-DP accountant for the Poisson-subsampled Gaussian
//! mechanism.
//!
//! The accountant follows Mironov, Talwar and Zhang, "Rényi Differential Privacy of the
//! Sampled Gaussian Mechanism" (2019) for the RDP of one round at each order (integer orders
//! by the binomial expansion, fractional ones by the two-sided series of their Sec. 3.3),
//! composes rounds by adding RDP, and converts to (ε, δ) with the bound of Balle et al.,
//! "Hypothesis Testing Interpretations and Rényi Differential Privacy" (2020, Prop. 12),
//! minimised over the orders. This is the computation of Google's `dp-accounting` package
//! (`RdpAccountant`, the same default orders); the tests check the two agree.

use rand::Rng;

/// The RDP orders tracked: those of `dp-accounting`'s `RdpAccountant`.
pub fn default_orders() -> Vec<f64> {
    let mut orders: Vec<f64> = (1..100).map(|x| 1.0 + f64::from(x) / 10.0).collect();
    orders.extend((11..64).map(f64::from));
    orders.extend([128.0, 256.0, 512.0, 1024.0]);
    orders
}

fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = (x.min(y), x.max(y));
    if a == f64::NEG_INFINITY {
        return b;
    }
    (a - b).exp().ln_1p() + b
}

fn log_comb(n: f64, k: f64) -> f64 {
    libm::lgamma(n + 1.0) - libm::lgamma(k + 1.0) - libm::lgamma(n - k + 1.0)
}

/// log Φ(x), the log of the standard normal CDF, accurate in both tails.
fn log_ndtr(x: f64) -> f64 {
    if x > 6.0 {
        // log(1 - p) for a tiny upper tail p.
        -0.5 * libm::erfc(x / std::f64::consts::SQRT_2)
    } else if x > -20.0 {
        (0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)).ln()
    } else {
        // Asymptotic series: Φ(x) = φ(x)/(-x) * (1 - 1/x² + 3/x⁴ - 15/x⁶ + 105/x⁸ - ...).
        let x2 = x * x;
        let mut series = 1.0;
        let mut term = 1.0;
        for k in 1..12 {
            term *= -f64::from(2 * k - 1) / x2;
            series += term;
        }
        -0.5 * x2 - (-x).ln() - 0.5 * (2.0 * std::f64::consts::PI).ln() + series.ln()
    }
}

fn log_erfc(x: f64) -> f64 {
    std::f64::consts::LN_2 + log_ndtr(-x * std::f64::consts::SQRT_2)
}

fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let log1mq = (-q).ln_1p();
    let mut log_a = f64::NEG_INFINITY;
    for i in 0..=alpha {
        let i_f = i as f64;
        let log_coef = log_comb(alpha as f64, i_f) + i_f * q.ln() + (alpha as f64 - i_f) * log1mq;
        log_a = log_add(log_a, log_coef + (i_f * i_f - i_f) / (2.0 * sigma * sigma));
    }
    log_a
}

fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let log1mq = (-q).ln_1p();
    let (mut last_s0, mut last_s1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    for i in 0..1000 {
        let i = f64::from(i);
        let log_coef = log_comb(alpha, i);
        let j = alpha - i;
        let log_t0 = log_coef + i * q.ln() + j * log1mq;
        let log_t1 = log_coef + j * q.ln() + i * log1mq;
        let log_e0 = 0.5f64.ln() + log_erfc((i - z0) / (std::f64::consts::SQRT_2 * sigma));
        let log_e1 = 0.5f64.ln() + log_erfc((z0 - j) / (std::f64::consts::SQRT_2 * sigma));
        let log_s0 = log_t0 + (i * i - i) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        log_a0 = log_add(log_a0, log_s0);
        log_a1 = log_add(log_a1, log_s1);
        let total = log_add(log_a0, log_a1);
        if log_s0 < last_s0 && log_s1 < last_s1 && log_s0.max(log_s1) < total - 30.0 {
            return total;
        }
        last_s0 = log_s0;
        last_s1 = log_s1;
    }
    f64::INFINITY
}

/// RDP at `order` of one round of the Gaussian mechanism with noise multiplier `sigma`
/// (noise std / L2 sensitivity) on a Poisson sample of rate `q`.
pub fn rdp_subsampled_gaussian(q: f64, sigma: f64, order: f64) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    if order.is_infinite() || sigma == 0.0 {
        return f64::INFINITY;
    }
    if q >= 1.0 {
        return order / (2.0 * sigma * sigma);
    }
    let log_a = if order.fract() == 0.0 { log_a_int(q, sigma, order as u64) } else { log_a_frac(q, sigma, order) };
    log_a / (order - 1.0)
}

/// The smallest ε over `orders` for accumulated RDP `rdp` at `delta`, with the order that
/// gives it.
pub fn epsilon(orders: &[f64], rdp: &[f64], delta: f64) -> (f64, f64) {
    if delta <= 0.0 {
        return if rdp.iter().all(|r| *r == 0.0) { (0.0, 0.0) } else { (f64::INFINITY, 0.0) };
    }
    let mut best = (f64::INFINITY, 0.0);
    for (&a, &r) in orders.iter().zip(rdp) {
        let eps = if r < 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
            0.0
        } else if a > 1.01 {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        } else {
            f64::INFINITY
        };
        if eps < best.0 {
            best = (eps, a);
        }
    }
    (best.0.max(0.0), best.1)
}

/// ε after `steps` rounds of the subsampled Gaussian mechanism, and the optimal order.
pub fn epsilon_for(noise_multiplier: f64, sample_rate: f64, steps: u64, delta: f64) -> (f64, f64) {
    let orders = default_orders();
    let rdp: Vec<f64> =
        orders.iter().map(|&a| steps as f64 * rdp_subsampled_gaussian(sample_rate, noise_multiplier, a)).collect();
    epsilon(&orders, &rdp, delta)
}

/// Tracks the privacy spent over rounds and refuses a round that would exceed the budget.
#[derive(Debug, Clone)]
pub struct Accountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
    delta: f64,
    budget: f64,
    rounds: u64,
    /// ε of pure-DP (Laplace) rounds, composed by adding.
    pure: f64,
}

impl Accountant {
    /// An accountant for (`budget`, `delta`)-DP.
    pub fn new(budget: f64, delta: f64) -> Self {
        let orders = default_orders();
        let rdp = vec![0.0; orders.len()];
        Self { orders, rdp, delta, budget, rounds: 0, pure: 0.0 }
    }

    /// ε spent so far (the RDP-accounted Gaussian rounds plus the pure-DP rounds: basic
    /// composition of the two).
    pub fn spent(&self) -> f64 {
        epsilon(&self.orders, &self.rdp, self.delta).0 + self.pure
    }

    /// Accounts one pure ε-DP round (the Laplace mechanism, without credit for sampling) if
    /// the total stays within the budget.
    pub fn spend_pure(&mut self, round_epsilon: f64) -> Result<f64, BudgetError> {
        let total = epsilon(&self.orders, &self.rdp, self.delta).0 + self.pure + round_epsilon;
        if total > self.budget + 1e-12 {
            return Err(BudgetError::Pure { round: self.rounds + 1, total, budget: self.budget, spent: self.spent() });
        }
        self.pure += round_epsilon;
        self.rounds += 1;
        Ok(total)
    }

    /// Rounds accounted.
    pub fn rounds(&self) -> u64 {
        self.rounds
    }

    /// What was spent so far, for a checkpoint: the RDP per order, rounds, and pure ε.
    pub(crate) fn spent_state(&self) -> (Vec<f64>, u64, f64) {
        (self.rdp.clone(), self.rounds, self.pure)
    }

    /// Takes up what a checkpoint says was spent (orders are always the default ones).
    pub(crate) fn restore_spent(&mut self, (rdp, rounds, pure): (Vec<f64>, u64, f64)) {
        if rdp.len() == self.orders.len() {
            self.rdp = rdp;
        }
        self.rounds = rounds;
        self.pure = pure;
    }

    /// Accounts one round of sampling rate `q` and noise multiplier `sigma` if the total stays
    /// within the budget; returns the new ε, or why the round is refused.
    pub fn spend(&mut self, q: f64, sigma: f64) -> Result<f64, BudgetError> {
        let next: Vec<f64> =
            self.orders.iter().zip(&self.rdp).map(|(&a, &r)| r + rdp_subsampled_gaussian(q, sigma, a)).collect();
        let eps = epsilon(&self.orders, &next, self.delta).0 + self.pure;
        if eps > self.budget {
            return Err(BudgetError::Approximate {
                round: self.rounds + 1,
                total: eps,
                budget: self.budget,
                delta: self.delta,
                spent: self.spent(),
            });
        }
        self.rdp = next;
        self.rounds += 1;
        Ok(eps)
    }
}

/// A round the privacy budget refuses.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum BudgetError {
    /// Pure ε-DP (Laplace noise).
    #[error("round {round} would spend epsilon {total:.4} > budget {budget} (spent so far {spent:.4})")]
    Pure {
        /// The round.
        round: u64,
        /// ε after it.
        total: f64,
        /// The budget.
        budget: f64,
        /// ε before it.
        spent: f64,
    },
    /// (ε, δ)-DP (Gaussian noise, Rényi accounting).
    #[error(
        "round {round} would spend epsilon {total:.4} > budget {budget} at delta {delta} (spent so far {spent:.4})"
    )]
    Approximate {
        /// The round.
        round: u64,
        /// ε after it.
        total: f64,
        /// The budget.
        budget: f64,
        /// δ.
        delta: f64,
        /// ε before it.
        spent: f64,
    },
}

/// The L2 norm of `values`.
pub fn l2_norm(values: &[f32]) -> f64 {
    values.iter().map(|v| f64::from(*v) * f64::from(*v)).sum::<f64>().sqrt()
}

/// Scales `update` down to L2 norm `clip` if it is longer; returns its norm before.
pub fn clip_l2(update: &mut [f32], clip: f64) -> f64 {
    let norm = l2_norm(update);
    if norm > clip && norm > 0.0 {
        let scale = (clip / norm) as f32;
        for value in update.iter_mut() {
            *value *= scale;
        }
    }
    norm
}

/// A standard normal draw (Box–Muller).
pub fn standard_normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = 1.0 - rng.gen::<f64>(); // in (0, 1]
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// A Laplace draw with scale `b` (inverse CDF).
pub fn laplace(rng: &mut impl Rng, b: f64) -> f64 {
    let u: f64 = rng.gen::<f64>() - 0.5;
    -b * u.signum() * (1.0 - 2.0 * u.abs()).max(f64::MIN_POSITIVE).ln()
}

/// Exact samplers of the discrete Laplace and discrete Gaussian distributions over the
/// integers, after Canonne, Kamath and Steinke, "The Discrete Gaussian for Differential
/// Privacy" (NeurIPS 2020), Algorithms 1–3, the construction OpenDP uses.
///
/// Floating-point noise (`x + σ·N(0,1)` in doubles) leaks: which doubles a sum can land on
/// depends on `x`, so the released value can reveal it (Mironov, "On Significance of the
/// Least Significant Bits for Differential Privacy", CCS 2012). Here every random choice is
/// an integer comparison with uniform integers from the generator, with rational parameters
/// in 128-bit integers; no floating point touches the noise until it is scaled by a power of
/// two (see [`DiscreteNoise`]).
pub mod exact {
    use rand::Rng;

    /// A draw of Bernoulli(`num` / `den`), `num <= den`, `den > 0`.
    fn bernoulli(rng: &mut impl Rng, num: u128, den: u128) -> bool {
        rng.gen_range(0..den) < num
    }

    /// A draw of Bernoulli(exp(-`num` / `den`)), `den > 0` (CKS20 Algorithm 1).
    pub fn bernoulli_exp(rng: &mut impl Rng, num: u128, den: u128) -> bool {
        let (mut num, den) = (num, den);
        // exp(-x) = exp(-1)^floor(x) * exp(-(x - floor(x))).
        while num > den {
            if !bernoulli_exp_at_most_one(rng, den, den) {
                return false;
            }
            num -= den;
        }
        bernoulli_exp_at_most_one(rng, num, den)
    }

    /// Bernoulli(exp(-x)) for x = `num` / `den` in [0, 1].
    fn bernoulli_exp_at_most_one(rng: &mut impl Rng, num: u128, den: u128) -> bool {
        let mut k: u128 = 1;
        loop {
            // Bernoulli(x / k); `den * k` cannot overflow for the parameters used here
            // (k stays tiny: P(k > 40) < 1/40!).
            let Some(scaled) = den.checked_mul(k) else { return k % 2 == 1 };
            if !bernoulli(rng, num, scaled) {
                return k % 2 == 1;
            }
            k += 1;
        }
    }

    /// A draw of the discrete Laplace distribution with scale `t` (an integer, at least 1):
    /// P(x) ∝ exp(-|x| / t) (CKS20 Algorithm 2 with s = 1).
    pub fn discrete_laplace(rng: &mut impl Rng, t: u128) -> i128 {
        loop {
            let u = rng.gen_range(0..t);
            if !bernoulli_exp(rng, u, t) {
                continue;
            }
            let mut v: u128 = 0;
            while bernoulli_exp(rng, 1, 1) {
                v += 1;
            }
            let magnitude = (u + t * v) as i128;
            let negative = rng.gen::<bool>();
            if negative && magnitude == 0 {
                continue;
            }
            return if negative { -magnitude } else { magnitude };
        }
    }

    /// A draw of the discrete Gaussian distribution with variance parameter `sigma2` (an
    /// integer, at least 1): P(x) ∝ exp(-x² / (2·sigma2)) (CKS20 Algorithm 3).
    pub fn discrete_gaussian(rng: &mut impl Rng, sigma2: u128) -> i128 {
        // t = floor(σ) + 1, from the integer square root of σ².
        let t = isqrt(sigma2) + 1;
        loop {
            let y = discrete_laplace(rng, t);
            // Accept with probability exp(-(|y| - σ²/t)² / (2σ²)), as the rational
            // (|y|·t - σ²)² / (2·σ²·t²).
            let diff = (y.unsigned_abs() * t).abs_diff(sigma2);
            let (Some(num), Some(den)) = (diff.checked_mul(diff), (2 * sigma2).checked_mul(t * t)) else {
                continue;
            };
            if bernoulli_exp(rng, num, den) {
                return y;
            }
        }
    }

    /// The integer square root (largest r with r² <= n).
    pub fn isqrt(n: u128) -> u128 {
        if n < 2 {
            return n;
        }
        let mut r = (n as f64).sqrt() as u128;
        while r * r > n {
            r -= 1;
        }
        while (r + 1) * (r + 1) <= n {
            r += 1;
        }
        r
    }
}

/// Noise on a grid: values are rounded to multiples of a power of two `γ` and integer noise
/// from [`exact`] is added in units of `γ`, so the released value is an exact function of
/// an integer mechanism, with no floating-point leak (the "snapping" idea of Mironov 2012,
/// as in Google's differential-privacy library's secure noise).
///
/// `γ` is chosen so that the noise's scale is 2^20 to 2^21 grid steps. Rounding to the
/// grid moves each coordinate by at most `γ/2`, which can add up to `γ·√d` to the L2
/// sensitivity of a `d`-value release (and `γ·d` to its L1 sensitivity); the scale is
/// raised by that much, so the noise stays calibrated to the configured multiplier of the
/// true sensitivity. The scale is also rounded up to the integer grid, never down.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DiscreteNoise {
    /// The grid step γ (a power of two).
    pub granularity: f64,
    /// The scale in grid steps: the variance σ²/γ² (Gaussian) or the scale b/γ (Laplace).
    pub scale: u128,
    /// Gaussian (true) or Laplace (false).
    pub gaussian: bool,
}

impl DiscreteNoise {
    fn granularity(scale: f64) -> f64 {
        // The largest power of two at most scale / 2^20.
        2f64.powi((scale.log2().floor() as i32) - 20)
    }

    /// Gaussian noise of standard deviation `std` for a release of `values` values whose L2
    /// sensitivity is `sensitivity` (the rounding's share added to it as described above).
    pub fn gaussian(std: f64, sensitivity: f64, values: usize) -> Self {
        let granularity = Self::granularity(std);
        let inflated = std * (1.0 + granularity * (values as f64).sqrt() / sensitivity);
        let steps = inflated / granularity;
        Self { granularity, scale: (steps * steps).ceil() as u128, gaussian: true }
    }

    /// Laplace noise of scale `b` for a release of `values` values whose L1 sensitivity is
    /// `sensitivity`.
    pub fn laplace(b: f64, sensitivity: f64, values: usize) -> Self {
        let granularity = Self::granularity(b);
        let inflated = b * (1.0 + granularity * values as f64 / sensitivity);
        Self { granularity, scale: (inflated / granularity).ceil() as u128, gaussian: false }
    }

    /// The standard deviation of the noise as sampled (for reports and tests).
    pub fn std(&self) -> f64 {
        if self.gaussian {
            (self.scale as f64).sqrt() * self.granularity
        } else {
            // A discrete Laplace of scale t has variance ≈ 2t² for large t.
            std::f64::consts::SQRT_2 * self.scale as f64 * self.granularity
        }
    }

    /// One noisy value: `value` snapped to the grid plus integer noise, scaled back.
    pub fn apply(&self, value: f64, rng: &mut impl Rng) -> f64 {
        let noise = if self.gaussian {
            exact::discrete_gaussian(rng, self.scale)
        } else {
            exact::discrete_laplace(rng, self.scale)
        };
        // |value / γ| < 2^62 for any value a clipped sum can take; saturate beyond.
        let snapped = (value / self.granularity).round().clamp(-(2f64.powi(62)), 2f64.powi(62)) as i128;
        (snapped + noise) as f64 * self.granularity
    }

    /// Adds noise to every value.
    pub fn add(&self, values: &mut [f64], rng: &mut impl Rng) {
        for value in values {
            *value = self.apply(*value, rng);
        }
    }
}

/// Which noise calibrates a release.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Noise {
    /// Gaussian with std `noise_multiplier * sensitivity` (L2 sensitivity; RDP-accounted).
    #[default]
    Gaussian,
    /// Laplace with scale `sensitivity / epsilon_per_round` (pure ε-DP per round, for L1
    /// sensitivity).
    Laplace,
}

/// Adaptive clipping (Andrew, Thakkar, McMahan and Ramaswamy, "Differentially Private
/// Learning with Adaptive Clipping", 2021): the clip norm follows a target quantile of the
/// update norms, `C ← C · exp(−η (b̂ − γ))`, where `b̂` is the (noised) fraction of updates
/// whose norm was at most `C`.
#[derive(Clone, Debug, PartialEq)]
pub struct AdaptiveClip {
    /// Current clip norm.
    pub clip: f64,
    /// Target quantile γ of update norms.
    pub target_quantile: f64,
    /// Learning rate η.
    pub learning_rate: f64,
    /// Std of the noise on the count of clipped updates (in updates).
    pub count_noise: f64,
}

impl AdaptiveClip {
    /// Updates the clip norm after a round with `unclipped` of `total` updates within it.
    pub fn update(&mut self, unclipped: usize, total: usize, rng: &mut impl Rng) {
        if total == 0 {
            return;
        }
        // The count has sensitivity 1; its noise is discrete, like the model's.
        let noisy = if self.count_noise > 0.0 {
            DiscreteNoise::gaussian(self.count_noise, 1.0, 1).apply(unclipped as f64, rng)
        } else {
            unclipped as f64
        };
        let fraction = noisy / total as f64;
        self.clip *= (-self.learning_rate * (fraction - self.target_quantile)).exp();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn full_batch_gaussian_is_alpha_over_two_sigma_squared() {
        assert_eq!(rdp_subsampled_gaussian(1.0, 2.0, 8.0), 8.0 / 8.0);
        assert_eq!(rdp_subsampled_gaussian(0.0, 2.0, 8.0), 0.0);
    }

    #[test]
    fn log_ndtr_is_continuous_across_its_branches() {
        for x in [-20.0f64, 6.0] {
            let (a, b) = (log_ndtr(x - 1e-9), log_ndtr(x + 1e-9));
            assert!((a - b).abs() < 1e-6 * a.abs().max(1e-12), "{x}: {a} vs {b}");
        }
        assert!((log_ndtr(0.0) - 0.5f64.ln()).abs() < 1e-15);
    }

    #[test]
    fn accountant_refuses_a_round_over_budget() {
        let mut accountant = Accountant::new(1.0, 1e-5);
        let mut rounds = 0;
        let err = loop {
            match accountant.spend(0.01, 1.1) {
                Ok(eps) => {
                    assert!(eps <= 1.0);
                    rounds += 1;
                }
                Err(err) => break err.to_string(),
            }
        };
        assert!(rounds > 10, "{rounds}");
        assert!(err.contains("would spend epsilon") && err.contains("> budget 1"), "{err}");
        assert_eq!(accountant.rounds(), rounds);
        assert!(accountant.spent() <= 1.0);
    }

    #[test]
    fn clipping_bounds_the_norm_and_keeps_short_updates() {
        let mut long = vec![3.0f32, 4.0];
        assert_eq!(clip_l2(&mut long, 1.0), 5.0);
        assert!((l2_norm(&long) - 1.0).abs() < 1e-6);
        let mut short = vec![0.3f32, 0.4];
        clip_l2(&mut short, 1.0);
        assert_eq!(short, vec![0.3, 0.4]);
    }

    fn moments(samples: &[f64]) -> (f64, f64) {
        let mean = samples.iter().sum::<f64>() / samples.len() as f64;
        let var = samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (samples.len() - 1) as f64;
        (mean, var)
    }

    /// Kolmogorov–Smirnov distance between samples and a CDF.
    fn ks(samples: &mut [f64], cdf: impl Fn(f64) -> f64) -> f64 {
        samples.sort_by(f64::total_cmp);
        let n = samples.len() as f64;
        samples
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let c = cdf(x);
                (c - i as f64 / n).abs().max(((i + 1) as f64 / n - c).abs())
            })
            .fold(0.0, f64::max)
    }

    #[test]
    fn noise_has_the_calibrated_distribution() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let n = 200_000;
        let mut gauss: Vec<f64> = (0..n).map(|_| 2.0 * standard_normal(&mut rng)).collect();
        let (mean, var) = moments(&gauss);
        assert!(mean.abs() < 0.02 && (var - 4.0).abs() < 0.05, "gaussian mean {mean} var {var}");
        // KS critical value at alpha = 0.001 is about 1.95 / sqrt(n).
        let d = ks(&mut gauss, |x| 0.5 * libm::erfc(-x / (2.0 * std::f64::consts::SQRT_2)));
        assert!(d < 1.95 / (n as f64).sqrt(), "gaussian KS distance {d}");
        let mut lap: Vec<f64> = (0..n).map(|_| laplace(&mut rng, 0.5)).collect();
        let (mean, var) = moments(&lap);
        assert!(mean.abs() < 0.01 && (var - 0.5).abs() < 0.01, "laplace mean {mean} var {var} (2b^2 = 0.5)");
        let d = ks(&mut lap, |x| if x < 0.0 { 0.5 * (x / 0.5).exp() } else { 1.0 - 0.5 * (-x / 0.5).exp() });
        assert!(d < 1.95 / (n as f64).sqrt(), "laplace KS distance {d}");
    }

    /// Kolmogorov–Smirnov distance of integer samples from a continuous CDF, measured at the
    /// samples' midpoints (for a lattice with steps far below the scale, as here).
    #[test]
    fn discrete_noise_has_the_calibrated_distribution() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        let n = 100_000;
        let gauss = DiscreteNoise::gaussian(2.0, 1.0, 1);
        assert!((gauss.std() - 2.0).abs() < 1e-4, "{}", gauss.std());
        assert_eq!(gauss.granularity, 2f64.powi(-19));
        let mut samples: Vec<f64> = (0..n).map(|_| gauss.apply(0.0, &mut rng)).collect();
        // Every sample is on the grid: an integer number of steps.
        assert!(samples.iter().all(|s| (s / gauss.granularity).fract() == 0.0));
        let (mean, var) = moments(&samples);
        assert!(mean.abs() < 0.03 && (var - 4.0).abs() < 0.08, "discrete gaussian mean {mean} var {var}");
        let d = ks(&mut samples, |x| 0.5 * libm::erfc(-x / (2.0 * std::f64::consts::SQRT_2)));
        assert!(d < 1.95 / (n as f64).sqrt(), "discrete gaussian KS distance {d}");
        let laplace = DiscreteNoise::laplace(0.5, 1.0, 1);
        let mut samples: Vec<f64> = (0..n).map(|_| laplace.apply(0.0, &mut rng)).collect();
        let (mean, var) = moments(&samples);
        assert!(mean.abs() < 0.01 && (var - 0.5).abs() < 0.015, "discrete laplace mean {mean} var {var}");
        let d = ks(&mut samples, |x| if x < 0.0 { 0.5 * (x / 0.5).exp() } else { 1.0 - 0.5 * (-x / 0.5).exp() });
        assert!(d < 1.95 / (n as f64).sqrt(), "discrete laplace KS distance {d}");
        // The value is snapped to the grid before the noise is added.
        let snapped = DiscreteNoise { granularity: 0.25, scale: 1, gaussian: true };
        let value = snapped.apply(1.1, &mut rng);
        assert_eq!((value / 0.25).fract(), 0.0, "{value}");
    }

    #[test]
    fn rounding_to_the_grid_raises_the_noise_to_cover_it() {
        // A million values: the rounding may add γ·√d to the L2 sensitivity.
        let noise = DiscreteNoise::gaussian(1.0, 1.0, 1_000_000);
        let bound = 1.0 + noise.granularity * 1000.0;
        assert!(noise.std() >= bound - 1e-12, "{} < {bound}", noise.std());
        assert!(noise.std() < 1.01, "{}", noise.std());
    }

    #[test]
    fn exact_bernoulli_exp_matches_its_probability() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(3);
        for (num, den) in [(1u128, 2u128), (3, 1), (7, 3)] {
            let n = 200_000;
            let hits = (0..n).filter(|_| exact::bernoulli_exp(&mut rng, num, den)).count() as f64 / n as f64;
            let want = (-(num as f64) / den as f64).exp();
            assert!(
                (hits - want).abs() < 4.0 * (want * (1.0 - want) / n as f64).sqrt(),
                "{num}/{den}: {hits} vs {want}"
            );
        }
        assert_eq!(exact::isqrt(u128::from(u64::MAX)), u128::from(u32::MAX));
        assert_eq!(exact::isqrt(15), 3);
        assert_eq!(exact::isqrt(16), 4);
    }

    #[test]
    fn adaptive_clip_moves_toward_the_target_quantile() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut clip = AdaptiveClip { clip: 1.0, target_quantile: 0.5, learning_rate: 0.2, count_noise: 0.0 };
        clip.update(10, 10, &mut rng); // all within: shrink
        assert!((clip.clip - (-0.2f64 * 0.5).exp()).abs() < 1e-12);
        clip.update(0, 10, &mut rng); // none within: grow back
        assert!((clip.clip - 1.0).abs() < 1e-12);
    }
}
