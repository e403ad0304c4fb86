//! Secure aggregation: the server learns the sum of the clients' updates and nothing about
//! any single one, even when some clients drop out after masking (after Bonawitz et al.,
//! "Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017, for an
//! honest-but-curious server).
//!
//! Per round, each client `u`:
//! 1. makes an X25519 key pair `(s_u, S_u)` and a random self-mask seed `b_u`, and publishes
//!    `S_u`;
//! 2. splits `s_u` and `b_u` into Shamir shares (threshold `t` of the `n` clients, over
//!    GF(2^8) byte by byte) and sends share `v` to client `v`, encrypted with a key only `u`
//!    and `v` can derive (the X25519 agreement of their keys), so the relaying server cannot
//!    read it;
//! 3. encodes its update in fixed point (`2^-scale` steps, wrapping integers mod 2^64) and
//!    adds the pairwise masks `PRG(k_uv)` for `v > u`, subtracts them for `v < u` (`k_uv`
//!    from the X25519 agreement, hashed), and adds the self mask `PRG(b_u)`.
//!
//! The pairwise masks cancel in the sum. For a client that dropped after step 2, the others
//! hand the server shares of its `s_u`: with `t` of them the server recomputes the masks that
//! no longer cancel. For every client that did send, the others hand shares of its `b_u`, so
//! the server can remove the self masks. It never asks for both secrets of one client, so a
//! client's masked update stays hidden. With fewer than `t` clients left the round fails,
//! saying so.

use std::collections::{BTreeMap, BTreeSet};

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};

/// Fixed-point scale: updates are encoded in steps of 2^-24 (values up to ±2^39 sum safely).
const SCALE: f64 = (1u64 << 24) as f64;

/// A client's public announcement for the round.
#[derive(Clone, Debug)]
pub struct Announcement {
    /// Client index in the round (1..=n).
    pub client: u8,
    /// Its X25519 public key.
    pub public: PublicKey,
}

impl Announcement {
    /// The announcement of client `client` whose public key is `public` (as sent).
    pub fn from_bytes(client: u8, public: [u8; 32]) -> Self {
        Self { client, public: PublicKey::from(public) }
    }

    /// The public key's bytes, to send.
    pub fn public_bytes(&self) -> [u8; 32] {
        self.public.to_bytes()
    }
}

/// A Shamir share of a client's secrets, encrypted for its recipient.
#[derive(Clone, Debug)]
pub struct SealedShare {
    /// Whose secrets.
    pub from: u8,
    /// For whom.
    pub to: u8,
    /// Ciphertext of (share of `s`, share of `b`): 64 bytes.
    pub ciphertext: Vec<u8>,
}

/// One client's side of a round.
pub struct SecureClient {
    index: u8,
    secret: StaticSecret,
    seed: [u8; 32],
    /// Shares received from other clients (decrypted): from -> (share of s, share of b).
    held: BTreeMap<u8, ([u8; 32], [u8; 32])>,
}

impl std::fmt::Debug for SecureClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureClient").field("index", &self.index).finish_non_exhaustive()
    }
}

fn prg_mask(seed: &[u8; 32], len: usize) -> Vec<u64> {
    let mut rng = ChaCha20Rng::from_seed(*seed);
    (0..len).map(|_| rng.next_u64()).collect()
}

fn derive(label: &[u8], material: &[u8]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(label);
    hash.update(material);
    hash.finalize().into()
}

fn pair_key(secret: &StaticSecret, public: &PublicKey, label: &[u8]) -> [u8; 32] {
    derive(label, secret.diffie_hellman(public).as_bytes())
}

fn xor_stream(key: &[u8; 32], data: &mut [u8]) {
    let mut rng = ChaCha20Rng::from_seed(*key);
    let mut stream = vec![0u8; data.len()];
    rng.fill_bytes(&mut stream);
    for (byte, k) in data.iter_mut().zip(stream) {
        *byte ^= k;
    }
}

/// GF(2^8) arithmetic with the AES polynomial.
mod gf256 {
    pub fn mul(mut a: u8, mut b: u8) -> u8 {
        let mut product = 0u8;
        while b != 0 {
            if b & 1 != 0 {
                product ^= a;
            }
            let carry = a & 0x80;
            a <<= 1;
            if carry != 0 {
                a ^= 0x1b;
            }
            b >>= 1;
        }
        product
    }

    pub fn inv(a: u8) -> u8 {
        // a^254 = a^-1 in GF(2^8).
        let mut result = 1u8;
        let mut base = a;
        let mut exponent = 254u32;
        while exponent > 0 {
            if exponent & 1 == 1 {
                result = mul(result, base);
            }
            base = mul(base, base);
            exponent >>= 1;
        }
        result
    }
}

/// Shares of a 32-byte secret for holders `1..=n`, any `threshold` of which recover it.
fn split(secret: &[u8; 32], threshold: usize, n: u8, rng: &mut impl Rng) -> Vec<[u8; 32]> {
    let mut shares = vec![[0u8; 32]; usize::from(n)];
    for (byte, &value) in secret.iter().enumerate() {
        let coefficients: Vec<u8> = std::iter::once(value).chain((1..threshold).map(|_| rng.gen())).collect();
        for (holder, share) in shares.iter_mut().enumerate() {
            let x = holder as u8 + 1;
            // Horner's rule.
            share[byte] = coefficients.iter().rev().fold(0u8, |acc, &c| gf256::mul(acc, x) ^ c);
        }
    }
    shares
}

/// The secret from `(holder, share)` pairs (Lagrange interpolation at 0).
fn combine(shares: &[(u8, [u8; 32])]) -> [u8; 32] {
    let mut secret = [0u8; 32];
    for (i, (xi, share)) in shares.iter().enumerate() {
        // Lagrange basis at 0: prod_{j != i} x_j / (x_j - x_i); subtraction is xor.
        let mut basis = 1u8;
        for (j, (xj, _)) in shares.iter().enumerate() {
            if i != j {
                basis = gf256::mul(basis, gf256::mul(*xj, gf256::inv(xj ^ xi)));
            }
        }
        for (byte, value) in secret.iter_mut().zip(share) {
            *byte ^= gf256::mul(*value, basis);
        }
    }
    secret
}

impl SecureClient {
    /// A client with index `index` (1..=255), its secrets drawn from `rng`.
    pub fn new(index: u8, rng: &mut (impl Rng + rand::CryptoRng)) -> Self {
        let mut key = [0u8; 32];
        rng.fill_bytes(&mut key);
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        Self { index, secret: StaticSecret::from(key), seed, held: BTreeMap::new() }
    }

    /// Step 1: the public key to announce.
    pub fn announce(&self) -> Announcement {
        Announcement { client: self.index, public: PublicKey::from(&self.secret) }
    }

    /// Step 2: shares of this client's secrets for every announced client, sealed for each.
    pub fn share(&self, announced: &[Announcement], threshold: usize, rng: &mut impl Rng) -> Vec<SealedShare> {
        let n = announced.iter().map(|a| a.client).max().unwrap_or(0);
        let s_shares = split(&self.secret.to_bytes(), threshold, n, rng);
        let b_shares = split(&self.seed, threshold, n, rng);
        announced
            .iter()
            .map(|peer| {
                let holder = usize::from(peer.client - 1);
                let mut plaintext = [s_shares[holder], b_shares[holder]].concat();
                xor_stream(&pair_key(&self.secret, &peer.public, b"edgeflow-secagg-share"), &mut plaintext);
                SealedShare { from: self.index, to: peer.client, ciphertext: plaintext }
            })
            .collect()
    }

    /// Receives the shares addressed to this client.
    pub fn receive(&mut self, announced: &[Announcement], shares: &[SealedShare]) {
        for sealed in shares.iter().filter(|s| s.to == self.index) {
            let Some(sender) = announced.iter().find(|a| a.client == sealed.from) else { continue };
            let mut plaintext = sealed.ciphertext.clone();
            xor_stream(&pair_key(&self.secret, &sender.public, b"edgeflow-secagg-share"), &mut plaintext);
            let mut s = [0u8; 32];
            let mut b = [0u8; 32];
            s.copy_from_slice(&plaintext[..32]);
            b.copy_from_slice(&plaintext[32..64]);
            self.held.insert(sealed.from, (s, b));
        }
    }

    /// Step 3: the masked, fixed-point update.
    pub fn mask(&self, update: &[f32], announced: &[Announcement]) -> Vec<u64> {
        let mut masked: Vec<u64> = update.iter().map(|v| (f64::from(*v) * SCALE).round() as i64 as u64).collect();
        for (value, mask) in masked.iter_mut().zip(prg_mask(&self.seed, update.len())) {
            *value = value.wrapping_add(mask);
        }
        for peer in announced.iter().filter(|a| a.client != self.index) {
            let mask = prg_mask(&pair_key(&self.secret, &peer.public, b"edgeflow-secagg-mask"), update.len());
            let add = peer.client > self.index;
            for (value, m) in masked.iter_mut().zip(mask) {
                *value = if add { value.wrapping_add(m) } else { value.wrapping_sub(m) };
            }
        }
        masked
    }

    /// Step 4: what this (surviving) client reveals for unmasking: shares of the mask key
    /// of each dropped client, and shares of the self-mask seed of each surviving one.
    pub fn reveal(&self, survivors: &BTreeSet<u8>, dropped: &BTreeSet<u8>) -> Reveal {
        let mut reveal = Reveal { from: self.index, keys: BTreeMap::new(), seeds: BTreeMap::new() };
        for (&owner, (s, b)) in &self.held {
            if dropped.contains(&owner) {
                reveal.keys.insert(owner, *s);
            } else if survivors.contains(&owner) {
                reveal.seeds.insert(owner, *b);
            }
        }
        reveal
    }
}

/// A surviving client's unmasking message.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Reveal {
    /// The revealing client.
    pub from: u8,
    /// Shares of dropped clients' mask keys.
    pub keys: BTreeMap<u8, [u8; 32]>,
    /// Shares of surviving clients' self-mask seeds.
    pub seeds: BTreeMap<u8, [u8; 32]>,
}

/// The server's unmasking: the exact sum of the surviving clients' updates.
pub fn unmask(
    announced: &[Announcement],
    masked: &BTreeMap<u8, Vec<u64>>,
    reveals: &[Reveal],
    threshold: usize,
) -> Result<Vec<f32>, String> {
    let n = announced.len();
    if masked.len() < threshold || reveals.len() < threshold {
        return Err(format!(
            "secure aggregation failed: {} of {n} clients sent masked updates and {} answered the unmasking; {threshold} are needed",
            masked.len(),
            reveals.len()
        ));
    }
    let len = masked.values().next().map_or(0, Vec::len);
    let mut sum = vec![0u64; len];
    for values in masked.values() {
        for (s, v) in sum.iter_mut().zip(values) {
            *s = s.wrapping_add(*v);
        }
    }
    let shares_of = |owner: u8, pick: &dyn Fn(&Reveal) -> Option<[u8; 32]>| -> Result<[u8; 32], String> {
        let shares: Vec<(u8, [u8; 32])> =
            reveals.iter().filter_map(|r| pick(r).map(|s| (r.from, s))).take(threshold).collect();
        if shares.len() < threshold {
            return Err(format!(
                "secure aggregation failed: only {} shares of client {owner}'s secret; {threshold} are needed",
                shares.len()
            ));
        }
        Ok(combine(&shares))
    };
    for &client in masked.keys() {
        let seed = shares_of(client, &|r: &Reveal| r.seeds.get(&client).copied())?;
        for (s, m) in sum.iter_mut().zip(prg_mask(&seed, len)) {
            *s = s.wrapping_sub(m);
        }
    }
    for dropped in announced.iter().filter(|a| !masked.contains_key(&a.client)) {
        let key = StaticSecret::from(shares_of(dropped.client, &|r: &Reveal| r.keys.get(&dropped.client).copied())?);
        for survivor in announced.iter().filter(|a| masked.contains_key(&a.client)) {
            // The survivor added +mask if dropped > survivor, -mask otherwise: undo it.
            let mask = prg_mask(&pair_key(&key, &survivor.public, b"edgeflow-secagg-mask"), len);
            let survivor_added = dropped.client > survivor.client;
            for (s, m) in sum.iter_mut().zip(mask) {
                *s = if survivor_added { s.wrapping_sub(m) } else { s.wrapping_add(m) };
            }
        }
    }
    Ok(sum.into_iter().map(|v| (v as i64 as f64 / SCALE) as f32).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Round {
        clients: Vec<SecureClient>,
        announced: Vec<Announcement>,
        updates: Vec<Vec<f32>>,
        masked: BTreeMap<u8, Vec<u64>>,
    }

    /// n clients run steps 1-3; those in `drop` vanish after sharing (before masking).
    fn round(n: u8, threshold: usize, drop: &[u8], len: usize) -> Round {
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        let mut clients: Vec<SecureClient> = (1..=n).map(|i| SecureClient::new(i, &mut rng)).collect();
        let announced: Vec<Announcement> = clients.iter().map(SecureClient::announce).collect();
        let shares: Vec<SealedShare> = clients.iter().flat_map(|c| c.share(&announced, threshold, &mut rng)).collect();
        for client in &mut clients {
            client.receive(&announced, &shares);
        }
        let updates: Vec<Vec<f32>> = (0..n)
            .map(|c| (0..len).map(|i| ((i * 31 + usize::from(c) * 7) % 97) as f32 / 10.0 - 4.8).collect())
            .collect();
        let masked = clients
            .iter()
            .zip(&updates)
            .filter(|(c, _)| !drop.contains(&c.index))
            .map(|(c, u)| (c.index, c.mask(u, &announced)))
            .collect();
        Round { clients, announced, updates, masked }
    }

    fn plain_sum(round: &Round) -> Vec<f32> {
        let len = round.updates[0].len();
        (0..len)
            .map(|i| round.masked.keys().map(|c| f64::from(round.updates[usize::from(*c - 1)][i])).sum::<f64>() as f32)
            .collect()
    }

    fn finish(round: &Round, threshold: usize) -> Result<Vec<f32>, String> {
        let survivors: BTreeSet<u8> = round.masked.keys().copied().collect();
        let dropped: BTreeSet<u8> =
            round.announced.iter().map(|a| a.client).filter(|c| !survivors.contains(c)).collect();
        let reveals: Vec<Reveal> = round
            .clients
            .iter()
            .filter(|c| survivors.contains(&c.index))
            .map(|c| c.reveal(&survivors, &dropped))
            .collect();
        unmask(&round.announced, &round.masked, &reveals, threshold)
    }

    fn assert_close(a: &[f32], b: &[f32]) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-4, "{x} vs {y}");
        }
    }

    #[test]
    fn the_sum_is_exact_without_dropouts() {
        let round = round(10, 6, &[], 1000);
        assert_close(&finish(&round, 6).unwrap(), &plain_sum(&round));
    }

    #[test]
    fn the_sum_is_exact_with_dropouts_after_sharing() {
        let round = round(10, 6, &[2, 5, 9], 1000);
        assert_eq!(round.masked.len(), 7);
        assert_close(&finish(&round, 6).unwrap(), &plain_sum(&round));
    }

    #[test]
    fn too_many_dropouts_fail_the_round_with_the_reason() {
        let round = round(10, 6, &[1, 2, 3, 4, 5], 10);
        let err = finish(&round, 6).unwrap_err();
        assert_eq!(
            err,
            "secure aggregation failed: 5 of 10 clients sent masked updates and 5 answered the unmasking; 6 are needed"
        );
    }

    #[test]
    fn a_single_masked_update_reveals_nothing_recognisable() {
        let round = round(5, 3, &[], 2000);
        let masked = &round.masked[&1];
        let decoded: Vec<f64> = masked.iter().map(|v| *v as i64 as f64 / SCALE).collect();
        // The update's values are within ±5; masked ones are spread over the whole ring.
        let near = decoded.iter().filter(|v| v.abs() < 10.0).count();
        assert!(near < 5, "{near} of 2000 masked values look like the update");
    }

    #[test]
    fn shamir_recovers_from_any_threshold_subset_only() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let secret: [u8; 32] = std::array::from_fn(|i| i as u8 * 7 + 1);
        let shares = split(&secret, 3, 5, &mut rng);
        let pick = |holders: &[u8]| -> Vec<(u8, [u8; 32])> {
            holders.iter().map(|&h| (h, shares[usize::from(h - 1)])).collect()
        };
        assert_eq!(combine(&pick(&[1, 2, 3])), secret);
        assert_eq!(combine(&pick(&[5, 2, 4])), secret);
        assert_ne!(combine(&pick(&[1, 2])), secret, "two shares of a 3-threshold say nothing");
    }
}
