//! The suite's primitives: HMAC-SHA-256 as the IKE PRF, AES-256-CBC for phase-1 payloads, and the
//! two Diffie-Hellman groups (MODP-4096 with a constant-time Montgomery ladder, X25519).
//!
//! Everything secret lives in `Zeroizing` buffers; nothing here implements `Debug` with contents.

use std::sync::OnceLock;

use aes::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit, block_padding::NoPadding};
use crypto_bigint::modular::runtime_mod::{DynResidue, DynResidueParams};
use crypto_bigint::{ArrayEncoding, U512, U4096};
use hmac::{Hmac, Mac};
use rand_core::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

/// RFC 3526 §5: the 4096-bit MODP group (IKE group 16), generator 2.
pub(crate) const MODP4096_PRIME_HEX: &str = concat!(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74",
    "020BBEA63B139B22514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F1437",
    "4FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED",
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF05",
    "98DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB",
    "9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B",
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF695581718",
    "3995497CEA956AE515D2261898FA051015728E5A8AAAC42DAD33170D04507A33",
    "A85521ABDF1CBA64ECFB850458DBEF0A8AEA71575D060C7DB3970F85A6E1E4C7",
    "ABF5AE8CDB0933D71E8C94E04A25619DCEE3D2261AD2EE6BF12FFA06D98A0864",
    "D87602733EC86A64521F2B18177B200CBBE117577A615D6C770988C0BAD946E2",
    "08E24FA074E5AB3143DB5BFCE0FD108E4B82D120A92108011A723C12A787E6D7",
    "88719A10BDBA5B2699C327186AF4E23C1A946834B6150BDA2583E9CA2AD44CE8",
    "DBBBC2DB04DE8EF92E8EFC141FBECAA6287C59474E6BC05D99B2964FA090C3A2",
    "233BA186515BE7ED1F612970CEE2D7AFB81BDD762170481CD0069127D5B05AA9",
    "93B4EA988D8FDDC186FFB7DC90A6C08F4DF435C934063199FFFFFFFFFFFFFFFF",
);

/// Bytes of a MODP-4096 public value and shared secret (left-padded with zeros, RFC 2409 §5).
pub(crate) const MODP4096_LEN: usize = 512;
/// Private exponent size: 512 bits, well above twice the group's ~150-bit strength (RFC 3526 §8).
const MODP_EXPONENT_BITS: usize = 512;

/// The prime as a number.
pub(crate) fn modp4096_prime() -> U4096 {
    U4096::from_be_hex(MODP4096_PRIME_HEX)
}

/// Montgomery parameters of the prime, computed once per process.
fn modp4096_params() -> &'static DynResidueParams<{ U4096::LIMBS }> {
    static PARAMS: OnceLock<DynResidueParams<{ U4096::LIMBS }>> = OnceLock::new();
    PARAMS.get_or_init(|| DynResidueParams::new(&modp4096_prime()))
}

/// A Diffie-Hellman group this engine can negotiate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DhGroup {
    /// RFC 3526 group 16, what the deployment guide prescribes (the default).
    Modp4096,
    /// Group 31 (Curve25519, RFC 7748/8031): far cheaper; only when both ends are configured for it.
    Curve25519,
}

impl DhGroup {
    /// The IKE group number on the wire.
    pub fn id(self) -> u16 {
        match self {
            DhGroup::Modp4096 => 16,
            DhGroup::Curve25519 => 31,
        }
    }

    /// The group with this wire number, if supported.
    pub fn from_id(id: u16) -> Option<Self> {
        match id {
            16 => Some(DhGroup::Modp4096),
            31 => Some(DhGroup::Curve25519),
            _ => None,
        }
    }

    /// Length of the public value in the KE payload.
    pub(crate) fn public_len(self) -> usize {
        match self {
            DhGroup::Modp4096 => MODP4096_LEN,
            DhGroup::Curve25519 => 32,
        }
    }
}

/// Why a peer's public value was refused (the peer sent garbage or a small-subgroup value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BadPublicValue;

/// One ephemeral Diffie-Hellman key pair; the private half is zeroized on drop.
pub(crate) struct DhKey {
    group: DhGroup,
    secret: Zeroizing<[u8; 64]>,
    public: Vec<u8>,
}

impl DhKey {
    /// Draws a private value from `rng` and computes the public value.
    pub(crate) fn generate<R: RngCore + CryptoRng>(group: DhGroup, rng: &mut R) -> Self {
        let mut secret = Zeroizing::new([0u8; 64]);
        rng.fill_bytes(&mut secret[..]);
        let public = match group {
            DhGroup::Modp4096 => {
                let mut x = U512::from_be_slice(&secret[..]);
                let g = DynResidue::new(&U4096::from_u8(2), *modp4096_params());
                let y = g.pow_bounded_exp(&x, MODP_EXPONENT_BITS).retrieve();
                x.zeroize();
                y.to_be_byte_array().to_vec()
            }
            DhGroup::Curve25519 => {
                let mut k = [0u8; 32];
                k.copy_from_slice(&secret[..32]);
                let p = x25519_dalek::x25519(k, x25519_dalek::X25519_BASEPOINT_BYTES);
                k.zeroize();
                p.to_vec()
            }
        };
        Self {
            group,
            secret,
            public,
        }
    }

    /// The public value to send in a KE payload.
    pub(crate) fn public(&self) -> &[u8] {
        &self.public
    }

    /// The shared secret g^xy with the peer's public value, after checking that value
    /// (1 < y < p-1 for MODP; not a low-order point for X25519).
    pub(crate) fn agree(&self, peer: &[u8]) -> Result<Zeroizing<Vec<u8>>, BadPublicValue> {
        if peer.len() != self.group.public_len() {
            return Err(BadPublicValue);
        }
        match self.group {
            DhGroup::Modp4096 => {
                let y = U4096::from_be_slice(peer);
                let p = modp4096_prime();
                let p_minus_1 = p.wrapping_sub(&U4096::ONE);
                // Public values: a variable-time comparison leaks nothing secret.
                if y <= U4096::ONE || y >= p_minus_1 {
                    return Err(BadPublicValue);
                }
                let mut x = U512::from_be_slice(&self.secret[..]);
                let mut z = DynResidue::new(&y, *modp4096_params())
                    .pow_bounded_exp(&x, MODP_EXPONENT_BITS)
                    .retrieve();
                x.zeroize();
                let out = Zeroizing::new(z.to_be_byte_array().to_vec());
                z.zeroize();
                Ok(out)
            }
            DhGroup::Curve25519 => {
                let mut k = [0u8; 32];
                k.copy_from_slice(&self.secret[..32]);
                let mut u = [0u8; 32];
                u.copy_from_slice(peer);
                let z = Zeroizing::new(x25519_dalek::x25519(k, u));
                k.zeroize();
                if z.iter().all(|&b| b == 0) {
                    return Err(BadPublicValue);
                }
                Ok(Zeroizing::new(z.to_vec()))
            }
        }
    }
}

/// HMAC-SHA-256 over the concatenation of `parts`: the negotiated PRF.
pub(crate) fn prf(key: &[u8], parts: &[&[u8]]) -> Zeroizing<[u8; 32]> {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        mac.update(p);
    }
    Zeroizing::new(mac.finalize().into_bytes().into())
}

/// Plain SHA-256 over `parts`: the negotiated hash, used for IVs (RFC 2409 Appendix B).
pub(crate) fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// AES block size, the CBC IV length.
pub(crate) const BLOCK: usize = 16;

/// Encrypts `buf` (a multiple of 16 bytes) in place and returns the last ciphertext block, the
/// next IV of the exchange.
pub(crate) fn cbc_encrypt(key: &[u8; 32], iv: &[u8; BLOCK], buf: &mut [u8]) -> [u8; BLOCK] {
    let len = buf.len();
    let enc = cbc::Encryptor::<aes::Aes256>::new(key.into(), iv.into());
    // Length is a multiple of the block size by construction, so NoPadding cannot fail.
    let _ = enc.encrypt_padded_mut::<NoPadding>(buf, len);
    last_block(buf).unwrap_or(*iv)
}

/// Decrypts `buf` in place; returns the last ciphertext block (taken before decrypting), or
/// `None` if the length is not a non-zero multiple of the block size.
pub(crate) fn cbc_decrypt(key: &[u8; 32], iv: &[u8; BLOCK], buf: &mut [u8]) -> Option<[u8; BLOCK]> {
    if buf.is_empty() || buf.len() % BLOCK != 0 {
        return None;
    }
    let last = last_block(buf)?;
    let dec = cbc::Decryptor::<aes::Aes256>::new(key.into(), iv.into());
    dec.decrypt_padded_mut::<NoPadding>(buf).ok()?;
    Some(last)
}

fn last_block(buf: &[u8]) -> Option<[u8; BLOCK]> {
    let start = buf.len().checked_sub(BLOCK)?;
    buf.get(start..)?.try_into().ok()
}

/// RFC 2409 §5.5 KEYMAT expansion: K1 = prf(SKEYID_d, [g^xy] | protocol | SPI | Ni_b | Nr_b),
/// Kn = prf(SKEYID_d, Kn-1 | [g^xy] | protocol | SPI | Ni_b | Nr_b), concatenated to `len` bytes.
pub(crate) fn keymat(
    skeyid_d: &[u8],
    gxy: Option<&[u8]>,
    protocol: u8,
    spi: u32,
    ni: &[u8],
    nr: &[u8],
    len: usize,
) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(len + 32));
    let spi = spi.to_be_bytes();
    let g = gxy.unwrap_or(&[]);
    let mut prev: Option<Zeroizing<[u8; 32]>> = None;
    while out.len() < len {
        let k = match &prev {
            None => prf(skeyid_d, &[g, &[protocol], &spi, ni, nr]),
            Some(p) => prf(skeyid_d, &[&p[..], g, &[protocol], &spi, ni, nr]),
        };
        out.extend_from_slice(&k[..]);
        prev = Some(k);
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::SeedableRng;

    #[test]
    fn rfc3526_group16_prime() {
        let p = modp4096_prime();
        let bytes = p.to_be_byte_array();
        // p = 2^4096 - 2^4032 - 1 + 2^64 * ([2^3966 pi] + 240904): top and bottom 64 bits are ones,
        // and the bits below the top 64 are pi's binary expansion (pi = 3.243F6A8885A308D3... hex;
        // 2^3966 pi starts at bit 3967 so the leading 2 bits of "3" fall into the 0xC9.. word).
        assert!(bytes[..8].iter().all(|&b| b == 0xff));
        assert!(bytes[504..].iter().all(|&b| b == 0xff));
        let pi_shifted = U512::from_be_hex(concat!(
            "3243F6A8885A308D313198A2E03707344A4093822299F31D0082EFA98EC4E6C8",
            "9452821E638D01377BE5466CF34E90C6CC0AC29B7C97C50DD3F84D5B5B547091",
        ))
        .shl_vartime(2);
        let middle = U512::from_be_slice(&bytes[8..72]);
        // The first 440 bits agree (the +240904 and the last digits only touch the low end).
        assert_eq!(middle.shr_vartime(72), pi_shifted.shr_vartime(72));
        // Safe prime: 2 generates the subgroup of prime order q = (p-1)/2 (2^q = 1 mod p), and a
        // Fermat test on p in base 3 passes.
        let q = p.shr_vartime(1);
        let params = DynResidueParams::new(&p);
        let two = DynResidue::new(&U4096::from_u8(2), params);
        assert_eq!(two.pow(&q).retrieve(), U4096::ONE);
        let three = DynResidue::new(&U4096::from_u8(3), params);
        assert_eq!(
            three.pow(&p.wrapping_sub(&U4096::ONE)).retrieve(),
            U4096::ONE
        );
        // q is prime too (Fermat base 2).
        let qp = DynResidueParams::new(&q);
        assert_eq!(
            DynResidue::new(&U4096::from_u8(2), qp)
                .pow(&q.wrapping_sub(&U4096::ONE))
                .retrieve(),
            U4096::ONE
        );
    }

    /// RFC 4868 §2.7.1 test cases 1-3 for HMAC-SHA-256 (the PRF and the AH integrity function).
    #[test]
    fn rfc4868_hmac_sha256_vectors() {
        let cases: [(&[u8], &[u8], &str); 3] = [
            (
                &[0x0b; 32],
                b"Hi There",
                "198a607eb44bfbc69903a0f1cf2bbdc5ba0aa3f3d9ae3c1c7a3b1696a0b68cf7",
            ),
            (
                b"JefeJefeJefeJefeJefeJefeJefeJefe",
                b"what do ya want for nothing?",
                "167f928588c5cc2eef8e3093caa0e87c9ff566a14794aa61648d81621a2a40c6",
            ),
            (
                &[0xaa; 32],
                &[0xdd; 50],
                "cdcb1220d1ecccea91e53aba3092f962e549fe6ce9ed7fdc43191fbde45c30b0",
            ),
        ];
        for (key, data, want) in cases {
            let got = prf(key, &[data]);
            assert_eq!(hex::encode(&got[..]), want);
            // AH truncates to 128 bits.
            assert_eq!(hex::encode(&got[..16]), want[..32]);
        }
    }

    #[test]
    fn dh_agreement_both_groups_and_bad_values() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        for g in [DhGroup::Modp4096, DhGroup::Curve25519] {
            let a = DhKey::generate(g, &mut rng);
            let b = DhKey::generate(g, &mut rng);
            assert_eq!(a.public().len(), g.public_len());
            assert_eq!(*a.agree(b.public()).unwrap(), *b.agree(a.public()).unwrap());
            assert!(a.agree(&b.public()[1..]).is_err());
        }
        let a = DhKey::generate(DhGroup::Modp4096, &mut rng);
        let mut one = [0u8; MODP4096_LEN];
        one[MODP4096_LEN - 1] = 1;
        assert_eq!(a.agree(&one), Err(BadPublicValue));
        let pm1 = modp4096_prime()
            .wrapping_sub(&U4096::ONE)
            .to_be_byte_array();
        assert_eq!(a.agree(&pm1), Err(BadPublicValue));
        assert_eq!(a.agree(&[0u8; MODP4096_LEN]), Err(BadPublicValue));
        let x = DhKey::generate(DhGroup::Curve25519, &mut rng);
        assert_eq!(x.agree(&[0u8; 32]), Err(BadPublicValue));
    }

    #[test]
    fn cbc_round_trip_returns_chaining_block() {
        let key = [3u8; 32];
        let iv = [9u8; 16];
        let mut buf = [0x41u8; 48];
        let last = cbc_encrypt(&key, &iv, &mut buf);
        assert_eq!(last[..], buf[32..]);
        let last2 = cbc_decrypt(&key, &iv, &mut buf).unwrap();
        assert_eq!(last, last2);
        assert_eq!(buf, [0x41u8; 48]);
        assert!(cbc_decrypt(&key, &iv, &mut [0u8; 15]).is_none());
    }
}
