//! Secure aggregation: the server learns the sum of the clients' updates and nothing about
//! any single one, even when some clients drop out after masking (after Bonawitz et al.,
//! "Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS 2017, for an
//! honest-but-curious server).
//!
//! Per round `r`, each client `u`:
//! 1. makes an X25519 key pair `(s_u, S_u)` and a random self-mask seed `b_u` (both from the
//!    generator it is given: the operating system's for a real client), and publishes `S_u`;
//! 2. splits `s_u` and `b_u` into Shamir shares (threshold `t` of the `n` clients, over
//!    GF(2^8) byte by byte, in constant time) and sends share `v` to client `v` sealed with
//!    ChaCha20-Poly1305 under a key only `u` and `v` can derive (HKDF-SHA256 of their X25519
//!    agreement, bound to the round), so the relaying server can neither read nor alter it
//!    undetected;
//! 3. encodes its update in fixed point (`2^-24` steps, wrapping integers mod 2^64) and adds
//!    the pairwise masks `PRG(k_uv)` for `v > u`, subtracts them for `v < u` (`k_uv` by
//!    HKDF from the same agreement, another label), and adds the self mask `PRG(b_u)`; the
//!    PRG is the ChaCha20 keystream (RFC 8439, zero nonce) read as little-endian u64s. The
//!    masked update carries a Poly1305 tag under a key derived from `b_u`, which the server
//!    checks once it has recovered `b_u`: a masked update altered on its way is refused.
//!
//! The pairwise masks cancel in the sum. For a client that dropped after step 2, the others
//! hand the server shares of its `s_u`: with `t` of them the server recomputes the masks that
//! no longer cancel. For every client that did send, the others hand shares of its `b_u`, so
//! the server can remove the self masks. It never asks for both secrets of one client, so a
//! client's masked update stays hidden. With fewer than `t` clients left the round fails,
//! saying so.
//!
//! Key derivation (HKDF-SHA256, salt `edgeflow-secagg-v1`, input the X25519 shared secret or
//! `b_u`, info = label ‖ round as 8 big-endian bytes): label `share` seals shares, `mask`
//! seeds pairwise masks, `tag` keys the masked update's tag. Share nonces are
//! `[from, to, 0, ..., 0]` (the key is shared by both directions of a pair), the associated
//! data `edgeflow-secagg share` ‖ round ‖ from ‖ to.

use std::collections::{BTreeMap, BTreeSet};

use chacha20::cipher::{KeyIvInit, StreamCipher};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::ChaCha20Poly1305;
use hkdf::Hkdf;
use rand::{CryptoRng, Rng};
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

/// Fixed-point scale: updates are encoded in steps of 2^-24 (values up to ±2^39 sum safely).
const SCALE: f64 = (1u64 << 24) as f64;

/// HKDF salt of every key of the protocol (its version).
const SALT: &[u8] = b"edgeflow-secagg-v1";

/// Why a secure-aggregation round could not be unmasked, or a client refused shares.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UnmaskError {
    /// Shares that do not authenticate (altered, replayed, or sealed by someone else).
    #[error("client {client} refused shares that do not authenticate, from {from}")]
    Unauthenticated {
        /// The client that received them.
        client: u8,
        /// Their senders.
        from: String,
    },
    /// Fewer survivors than the threshold.
    #[error("secure aggregation failed: {masked} of {clients} clients sent masked updates and {reveals} answered the unmasking; {threshold} are needed")]
    TooFew {
        /// Masked updates received.
        masked: usize,
        /// Clients announced.
        clients: usize,
        /// Unmasking answers received.
        reveals: usize,
        /// Needed.
        threshold: usize,
    },
    /// A masked update of another length than the others.
    #[error("secure aggregation failed: client {client}'s masked update has another length")]
    Length {
        /// The client.
        client: u8,
    },
    /// Too few shares of a client's secret.
    #[error("secure aggregation failed: only {shares} shares of client {owner}'s secret; {threshold} are needed")]
    TooFewShares {
        /// Whose secret.
        owner: u8,
        /// Shares received.
        shares: usize,
        /// Needed.
        threshold: usize,
    },
    /// A masked update altered on its way.
    #[error("secure aggregation failed: client {client}'s masked update does not match its tag (altered on its way): refused")]
    Tag {
        /// The client.
        client: u8,
    },
}

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

/// A Shamir share of a client's secrets, sealed for its recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedShare {
    /// Whose secrets.
    pub from: u8,
    /// For whom.
    pub to: u8,
    /// ChaCha20-Poly1305 ciphertext of (share of `s`, share of `b`): 64 bytes and a 16-byte
    /// tag.
    pub ciphertext: Vec<u8>,
}

/// A masked update with its authentication tag.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MaskedUpdate {
    /// The masked fixed-point values.
    pub values: Vec<u64>,
    /// Poly1305 tag over the round, the client's index and the values, keyed from `b_u`.
    pub tag: [u8; 16],
}

/// One client's side of a round.
pub struct SecureClient {
    index: u8,
    round: u64,
    secret: StaticSecret,
    seed: [u8; 32],
    /// Shares received from other clients (decrypted): from -> (share of s, share of b).
    held: BTreeMap<u8, ([u8; 32], [u8; 32])>,
}

impl std::fmt::Debug for SecureClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureClient").field("index", &self.index).field("round", &self.round).finish_non_exhaustive()
    }
}

/// HKDF-SHA256 of `material` for `label` in `round`.
fn derive(material: &[u8], label: &[u8], round: u64) -> [u8; 32] {
    let mut info = Vec::with_capacity(label.len() + 8);
    info.extend_from_slice(label);
    info.extend_from_slice(&round.to_be_bytes());
    let mut key = [0u8; 32];
    Hkdf::<Sha256>::new(Some(SALT), material)
        .expand(&info, &mut key)
        // Cannot fail: 32 bytes is far below HKDF-SHA256's limit of 255 * 32.
        .unwrap_or_else(|_| unreachable!("32 bytes is a valid HKDF-SHA256 output length"));
    key
}

fn pair_key(secret: &StaticSecret, public: &PublicKey, label: &[u8], round: u64) -> [u8; 32] {
    derive(secret.diffie_hellman(public).as_bytes(), label, round)
}

/// The mask stream of `seed`: the ChaCha20 keystream (zero nonce) as little-endian u64s.
fn prg_mask(seed: &[u8; 32], len: usize) -> Vec<u64> {
    let mut stream = vec![0u8; len * 8];
    chacha20::ChaCha20::new(seed.into(), &[0u8; 12].into()).apply_keystream(&mut stream);
    stream.chunks_exact(8).map(|chunk| u64::from_le_bytes(chunk.try_into().unwrap_or_default())).collect()
}

fn share_nonce(from: u8, to: u8) -> chacha20poly1305::Nonce {
    let mut nonce = [0u8; 12];
    nonce[0] = from;
    nonce[1] = to;
    nonce.into()
}

fn share_aad(round: u64, from: u8, to: u8) -> Vec<u8> {
    let mut aad = b"edgeflow-secagg share".to_vec();
    aad.extend_from_slice(&round.to_be_bytes());
    aad.extend_from_slice(&[from, to]);
    aad
}

/// The tag of a masked update: Poly1305 (ChaCha20-Poly1305 over no plaintext) with the
/// values as associated data.
fn masked_tag(seed: &[u8; 32], round: u64, client: u8, values: &[u64]) -> [u8; 16] {
    let cipher = ChaCha20Poly1305::new(&derive(seed, b"tag", round).into());
    let mut aad = Vec::with_capacity(9 + values.len() * 8);
    aad.extend_from_slice(&round.to_be_bytes());
    aad.push(client);
    for value in values {
        aad.extend_from_slice(&value.to_le_bytes());
    }
    let sealed = cipher
        .encrypt(&[0u8; 12].into(), Payload { msg: &[], aad: &aad })
        // Cannot fail: encryption fails only past ChaCha20's 256 GiB message limit.
        .unwrap_or_default();
    let mut tag = [0u8; 16];
    tag.copy_from_slice(&sealed[..16.min(sealed.len())]);
    tag
}

/// GF(2^8) arithmetic with the AES polynomial x^8 + x^4 + x^3 + x + 1, in constant time: no
/// branch and no table index depends on a secret byte.
mod gf256 {
    pub fn mul(a: u8, b: u8) -> u8 {
        let (mut a, mut b, mut product) = (a, b, 0u8);
        for _ in 0..8 {
            product ^= a & (b & 1).wrapping_neg();
            let carry = (a >> 7).wrapping_neg();
            a = (a << 1) ^ (0x1b & carry);
            b >>= 1;
        }
        product
    }

    /// a^-1 = a^254 (0 for 0), by a fixed sequence of multiplications.
    pub fn inv(a: u8) -> u8 {
        let mut result = 1u8;
        let mut base = a;
        for bit in 0..8 {
            // The exponent 254 is public: its bits pick the multiplications, not `a`.
            if (254u32 >> bit) & 1 == 1 {
                result = mul(result, base);
            }
            base = mul(base, base);
        }
        result
    }
}

/// Shares of a 32-byte secret for holders `1..=n`, any `threshold` of which recover it.
fn split(secret: &[u8; 32], threshold: usize, n: u8, rng: &mut (impl Rng + CryptoRng)) -> Vec<[u8; 32]> {
    let mut shares = vec![[0u8; 32]; usize::from(n)];
    let mut coefficients = vec![0u8; threshold.max(1)];
    for (byte, &value) in secret.iter().enumerate() {
        coefficients[0] = value;
        rng.fill_bytes(&mut coefficients[1..]);
        for (holder, share) in shares.iter_mut().enumerate() {
            let x = holder as u8 + 1;
            // Horner's rule.
            share[byte] = coefficients.iter().rev().fold(0u8, |acc, &c| gf256::mul(acc, x) ^ c);
        }
    }
    coefficients.fill(0);
    shares
}

/// The secret from `(holder, share)` pairs (Lagrange interpolation at 0).
fn combine(shares: &[(u8, [u8; 32])]) -> [u8; 32] {
    let mut secret = [0u8; 32];
    for (i, (xi, share)) in shares.iter().enumerate() {
        // Lagrange basis at 0: prod_{j != i} x_j / (x_j - x_i); subtraction is xor. The
        // holders' indices are public.
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
    /// Client `index` (1..=255) of round `round`, its secrets drawn from `rng`.
    pub fn new(index: u8, round: u64, rng: &mut (impl Rng + CryptoRng)) -> Self {
        let secret = StaticSecret::random_from_rng(&mut *rng);
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        Self { index, round, secret, seed, held: BTreeMap::new() }
    }

    /// Step 1: the public key to announce.
    pub fn announce(&self) -> Announcement {
        Announcement { client: self.index, public: PublicKey::from(&self.secret) }
    }

    /// Step 2: shares of this client's secrets for every announced client, sealed for each.
    pub fn share(
        &self,
        announced: &[Announcement],
        threshold: usize,
        rng: &mut (impl Rng + CryptoRng),
    ) -> Vec<SealedShare> {
        let n = announced.iter().map(|a| a.client).max().unwrap_or(0);
        let s_shares = split(&self.secret.to_bytes(), threshold, n, rng);
        let b_shares = split(&self.seed, threshold, n, rng);
        announced
            .iter()
            .map(|peer| {
                let holder = usize::from(peer.client - 1);
                let plaintext = [s_shares[holder], b_shares[holder]].concat();
                let key = pair_key(&self.secret, &peer.public, b"share", self.round);
                let aad = share_aad(self.round, self.index, peer.client);
                let ciphertext = ChaCha20Poly1305::new(&key.into())
                    .encrypt(&share_nonce(self.index, peer.client), Payload { msg: &plaintext, aad: &aad })
                    .unwrap_or_default();
                SealedShare { from: self.index, to: peer.client, ciphertext }
            })
            .collect()
    }

    /// Receives the shares addressed to this client. A share that does not authenticate
    /// (altered, replayed from another round or pair, or sealed by someone else) is refused,
    /// and the error names its sender; the other shares are kept.
    pub fn receive(&mut self, announced: &[Announcement], shares: &[SealedShare]) -> Result<(), UnmaskError> {
        let mut refused = Vec::new();
        for sealed in shares.iter().filter(|s| s.to == self.index) {
            let Some(sender) = announced.iter().find(|a| a.client == sealed.from) else {
                refused.push(format!("client {} (not announced)", sealed.from));
                continue;
            };
            let key = pair_key(&self.secret, &sender.public, b"share", self.round);
            let aad = share_aad(self.round, sealed.from, self.index);
            let opened = ChaCha20Poly1305::new(&key.into())
                .decrypt(&share_nonce(sealed.from, self.index), Payload { msg: &sealed.ciphertext, aad: &aad });
            match opened {
                Ok(plaintext) if plaintext.len() == 64 => {
                    let mut s = [0u8; 32];
                    let mut b = [0u8; 32];
                    s.copy_from_slice(&plaintext[..32]);
                    b.copy_from_slice(&plaintext[32..64]);
                    self.held.insert(sealed.from, (s, b));
                }
                _ => refused.push(format!("client {}", sealed.from)),
            }
        }
        if refused.is_empty() {
            Ok(())
        } else {
            Err(UnmaskError::Unauthenticated { client: self.index, from: refused.join(", ") })
        }
    }

    /// Step 3: the masked, fixed-point update, with its tag.
    pub fn mask(&self, update: &[f32], announced: &[Announcement]) -> MaskedUpdate {
        let mut masked: Vec<u64> = update.iter().map(|v| encode(*v)).collect();
        for (value, mask) in masked.iter_mut().zip(prg_mask(&self.seed, update.len())) {
            *value = value.wrapping_add(mask);
        }
        for peer in announced.iter().filter(|a| a.client != self.index) {
            let mask = prg_mask(&pair_key(&self.secret, &peer.public, b"mask", self.round), update.len());
            let add = peer.client > self.index;
            for (value, m) in masked.iter_mut().zip(mask) {
                *value = if add { value.wrapping_add(m) } else { value.wrapping_sub(m) };
            }
        }
        let tag = masked_tag(&self.seed, self.round, self.index, &masked);
        MaskedUpdate { values: masked, tag }
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

/// A value in fixed point: `round(v * 2^24)` (half away from zero) as a wrapping u64.
pub fn encode(value: f32) -> u64 {
    (f64::from(value) * SCALE).round() as i64 as u64
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

/// The server's unmasking: the exact sum of the surviving clients' updates. A masked update
/// whose tag does not match (altered between its client and the server) fails the round.
pub fn unmask(
    round: u64,
    announced: &[Announcement],
    masked: &BTreeMap<u8, MaskedUpdate>,
    reveals: &[Reveal],
    threshold: usize,
) -> Result<Vec<f32>, UnmaskError> {
    let n = announced.len();
    if masked.len() < threshold || reveals.len() < threshold {
        return Err(UnmaskError::TooFew { masked: masked.len(), clients: n, reveals: reveals.len(), threshold });
    }
    let len = masked.values().next().map_or(0, |m| m.values.len());
    if let Some((client, _)) = masked.iter().find(|(_, m)| m.values.len() != len) {
        return Err(UnmaskError::Length { client: *client });
    }
    let mut sum = vec![0u64; len];
    for update in masked.values() {
        for (s, v) in sum.iter_mut().zip(&update.values) {
            *s = s.wrapping_add(*v);
        }
    }
    let shares_of = |owner: u8, pick: &dyn Fn(&Reveal) -> Option<[u8; 32]>| -> Result<[u8; 32], UnmaskError> {
        let shares: Vec<(u8, [u8; 32])> =
            reveals.iter().filter_map(|r| pick(r).map(|s| (r.from, s))).take(threshold).collect();
        if shares.len() < threshold {
            return Err(UnmaskError::TooFewShares { owner, shares: shares.len(), threshold });
        }
        Ok(combine(&shares))
    };
    for (&client, update) in masked {
        let seed = shares_of(client, &|r: &Reveal| r.seeds.get(&client).copied())?;
        let expected = masked_tag(&seed, round, client, &update.values);
        if !constant_time_eq(&expected, &update.tag) {
            return Err(UnmaskError::Tag { client });
        }
        for (s, m) in sum.iter_mut().zip(prg_mask(&seed, len)) {
            *s = s.wrapping_sub(m);
        }
    }
    for dropped in announced.iter().filter(|a| !masked.contains_key(&a.client)) {
        let key = StaticSecret::from(shares_of(dropped.client, &|r: &Reveal| r.keys.get(&dropped.client).copied())?);
        for survivor in announced.iter().filter(|a| masked.contains_key(&a.client)) {
            // The survivor added +mask if dropped > survivor, -mask otherwise: undo it.
            let mask = prg_mask(&pair_key(&key, &survivor.public, b"mask", round), len);
            let survivor_added = dropped.client > survivor.client;
            for (s, m) in sum.iter_mut().zip(mask) {
                *s = if survivor_added { s.wrapping_sub(m) } else { s.wrapping_add(m) };
            }
        }
    }
    Ok(sum.into_iter().map(|v| (v as i64 as f64 / SCALE) as f32).collect())
}

fn constant_time_eq(a: &[u8; 16], b: &[u8; 16]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    use super::*;

    const ROUND: u64 = 7;

    struct Round {
        clients: Vec<SecureClient>,
        announced: Vec<Announcement>,
        updates: Vec<Vec<f32>>,
        masked: BTreeMap<u8, MaskedUpdate>,
    }

    /// n clients run steps 1-3; those in `drop` vanish after sharing (before masking).
    fn round(n: u8, threshold: usize, drop: &[u8], len: usize) -> Round {
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        let mut clients: Vec<SecureClient> = (1..=n).map(|i| SecureClient::new(i, ROUND, &mut rng)).collect();
        let announced: Vec<Announcement> = clients.iter().map(SecureClient::announce).collect();
        let shares: Vec<SealedShare> = clients.iter().flat_map(|c| c.share(&announced, threshold, &mut rng)).collect();
        for client in &mut clients {
            client.receive(&announced, &shares).unwrap();
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

    fn finish(round: &Round, threshold: usize) -> Result<Vec<f32>, UnmaskError> {
        let survivors: BTreeSet<u8> = round.masked.keys().copied().collect();
        let dropped: BTreeSet<u8> =
            round.announced.iter().map(|a| a.client).filter(|c| !survivors.contains(c)).collect();
        let reveals: Vec<Reveal> = round
            .clients
            .iter()
            .filter(|c| survivors.contains(&c.index))
            .map(|c| c.reveal(&survivors, &dropped))
            .collect();
        unmask(ROUND, &round.announced, &round.masked, &reveals, threshold)
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
        let err = finish(&round, 6).unwrap_err().to_string();
        assert_eq!(
            err,
            "secure aggregation failed: 5 of 10 clients sent masked updates and 5 answered the unmasking; 6 are needed"
        );
    }

    #[test]
    fn a_single_masked_update_reveals_nothing_recognisable() {
        let round = round(5, 3, &[], 2000);
        let masked = &round.masked[&1].values;
        let decoded: Vec<f64> = masked.iter().map(|v| *v as i64 as f64 / SCALE).collect();
        // The update's values are within ±5; masked ones are spread over the whole ring.
        let near = decoded.iter().filter(|v| v.abs() < 10.0).count();
        assert!(near < 5, "{near} of 2000 masked values look like the update");
    }

    #[test]
    fn a_tampered_share_is_refused_and_names_its_sender() {
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let mut clients: Vec<SecureClient> = (1..=3).map(|i| SecureClient::new(i, ROUND, &mut rng)).collect();
        let announced: Vec<Announcement> = clients.iter().map(SecureClient::announce).collect();
        let mut shares: Vec<SealedShare> = clients.iter().flat_map(|c| c.share(&announced, 2, &mut rng)).collect();
        // The relaying server flips one bit of client 2's share for client 1.
        let target = shares.iter_mut().find(|s| s.from == 2 && s.to == 1).unwrap();
        target.ciphertext[5] ^= 0x01;
        let err = clients[0].receive(&announced, &shares).unwrap_err().to_string();
        assert_eq!(err, "client 1 refused shares that do not authenticate, from client 2");
        assert!(!clients[0].held.contains_key(&2) && clients[0].held.contains_key(&3), "the good share is kept");
        // A share replayed into another round does not open either.
        let mut later = SecureClient::new(1, ROUND + 1, &mut rng);
        later.secret = clients[0].secret.clone();
        let honest: Vec<SealedShare> = clients[2].share(&announced, 2, &mut rng);
        assert!(
            later.receive(&announced, &honest).is_err(),
            "a share of round {ROUND} is refused in round {}",
            ROUND + 1
        );
        // And a share redirected to another recipient does not open.
        let mut redirected = honest.iter().find(|s| s.to == 2).unwrap().clone();
        redirected.to = 1;
        assert!(clients[0].receive(&announced, &[redirected]).is_err());
    }

    #[test]
    fn a_tampered_masked_update_is_refused() {
        let mut round = round(5, 3, &[], 50);
        round.masked.get_mut(&3).unwrap().values[10] ^= 1 << 40;
        let err = finish(&round, 3).unwrap_err().to_string();
        assert_eq!(
            err,
            "secure aggregation failed: client 3's masked update does not match its tag (altered on its way): refused"
        );
        // A forged tag for the altered values cannot be made without the client's seed.
        let mut round = self::round(5, 3, &[], 50);
        let forged = round.masked.get_mut(&2).unwrap();
        forged.values[0] = forged.values[0].wrapping_add(1);
        forged.tag[0] ^= 0x80;
        assert!(finish(&round, 3).is_err());
    }

    /// FIPS-197 section 4.2: {57}·{83} = {c1}, {57}·{13} = {fe}; section 5.1.1: the inverse
    /// of {53} is {ca}.
    #[test]
    fn gf256_matches_the_aes_test_vectors() {
        assert_eq!(gf256::mul(0x57, 0x83), 0xc1);
        assert_eq!(gf256::mul(0x57, 0x13), 0xfe);
        assert_eq!(gf256::inv(0x53), 0xca);
        assert_eq!(gf256::inv(0), 0);
        for a in 1..=255u8 {
            assert_eq!(gf256::mul(a, gf256::inv(a)), 1, "{a}");
        }
    }

    #[test]
    fn hkdf_follows_rfc_5869() {
        // RFC 5869 test case 1.
        let ikm = [0x0bu8; 22];
        let salt: Vec<u8> = (0x00..=0x0c).collect();
        let info: Vec<u8> = (0xf0..=0xf9).collect();
        let mut okm = [0u8; 42];
        Hkdf::<Sha256>::new(Some(&salt), &ikm).expand(&info, &mut okm).unwrap();
        assert_eq!(okm[..8], [0x3c, 0xb2, 0x5f, 0x25, 0xfa, 0xac, 0xd5, 0x7a], "the first bytes of RFC 5869's OKM");
    }

    #[test]
    fn the_mask_stream_is_the_rfc_8439_keystream() {
        // RFC 8439 appendix A.1, test vector 1: zero key, zero nonce, block counter 0.
        let stream = prg_mask(&[0u8; 32], 2);
        assert_eq!(stream[0], u64::from_le_bytes([0x76, 0xb8, 0xe0, 0xad, 0xa0, 0xf1, 0x3d, 0x90]));
        assert_eq!(stream[1], u64::from_le_bytes([0x40, 0x5d, 0x6a, 0xe5, 0x53, 0x86, 0xbd, 0x28]));
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
