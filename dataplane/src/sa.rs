//! One security association: the keys, the sequence number or replay window, the lifetime and the
//! counters of one direction, and the AH / ESP-GCM tunnel-mode packet transforms.
//!
//! AH (RFC 4302) with HMAC-SHA-256-128 (RFC 4868) authenticates the outer IPv4 header with its
//! mutable fields (TOS, flags and fragment offset, TTL, checksum) zeroed, the AH header with its ICV
//! zeroed, and the whole inner packet. ESP (RFC 4303) with AES-256-GCM and a 16-byte tag
//! (RFC 4106) encrypts the inner packet, its padding and the next-header byte; its 8-byte explicit
//! IV is the sequence number, which never repeats within an SA.

use std::fmt;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use ring::{aead, hmac};
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

use crate::packet::{
    self, IPV4_HEADER_LEN, NewHeader, PROTO_AH, PROTO_ESP, PROTO_IPV4, PROTO_NONE,
};
use crate::replay::{ReplayWindow, Replayed};

/// Length of the fixed AH fields before the ICV.
const AH_FIXED_LEN: usize = 12;
/// HMAC-SHA-256-128 ICV and AES-GCM-16 tag length.
const ICV_LEN: usize = 16;
/// AH header length with its ICV.
const AH_LEN: usize = AH_FIXED_LEN + ICV_LEN;
/// AH "payload length" field: the AH length in 32-bit words minus 2 (RFC 4302 §2.2).
const AH_PAYLOAD_LEN_FIELD: u8 = (AH_LEN / 4 - 2) as u8;
/// SPI and sequence number.
const ESP_HEADER_LEN: usize = 8;
/// Explicit IV of AES-GCM in ESP (RFC 4106 §3.1).
const ESP_IV_LEN: usize = 8;
/// Salt that completes the GCM nonce (RFC 4106 §4).
const GCM_SALT_LEN: usize = 4;
/// Key length of HMAC-SHA-256-128 (RFC 4868 §2.1.1).
pub const AH_KEY_LEN: usize = 32;
/// AES-256 key followed by the 4-byte salt, as IKE derives it (RFC 4106 §8.1).
pub const ESP_GCM_KEY_LEN: usize = 32 + GCM_SALT_LEN;
/// Outbound sequence number at which the SA asks to be rekeyed, a quarter of the space before the
/// 32-bit wrap (no ESN: IKEv1 does not negotiate it here).
const SEQ_SOFT_LIMIT: u32 = 0xc000_0000;

/// Which transform protects an SA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protection {
    /// AH with HMAC-SHA-256-128: integrity, origin authentication and anti-replay (the default).
    Ah,
    /// ESP with AES-256-GCM-16: the same plus confidentiality.
    EspGcm,
}

impl Protection {
    /// The IP protocol number of the outer packets.
    pub fn ip_protocol(self) -> u8 {
        match self {
            Protection::Ah => PROTO_AH,
            Protection::EspGcm => PROTO_ESP,
        }
    }

    /// The key length IKE must deliver for this transform.
    pub fn key_len(self) -> usize {
        match self {
            Protection::Ah => AH_KEY_LEN,
            Protection::EspGcm => ESP_GCM_KEY_LEN,
        }
    }

    /// The largest inner packet whose outer packet fits a path MTU of `path_mtu` bytes.
    pub fn max_inner_len(self, path_mtu: u16) -> usize {
        let mtu = usize::from(path_mtu);
        match self {
            Protection::Ah => mtu.saturating_sub(IPV4_HEADER_LEN + AH_LEN),
            Protection::EspGcm => {
                let room =
                    mtu.saturating_sub(IPV4_HEADER_LEN + ESP_HEADER_LEN + ESP_IV_LEN + ICV_LEN);
                (room / 4 * 4).saturating_sub(2)
            }
        }
    }

    /// Outer packet length for an inner packet (payload) of `inner_len` bytes.
    pub fn outer_len(self, inner_len: usize) -> usize {
        match self {
            Protection::Ah => IPV4_HEADER_LEN + AH_LEN + inner_len,
            Protection::EspGcm => {
                IPV4_HEADER_LEN
                    + ESP_HEADER_LEN
                    + ESP_IV_LEN
                    + (inner_len + 2).next_multiple_of(4)
                    + ICV_LEN
            }
        }
    }
}

/// Limits after which IKE should negotiate a new SA (soft) and after which this one stops (hard).
///
/// Packet and byte counts cover the inner packets protected by the SA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetime {
    /// Packets after which a rekey is requested.
    pub soft_packets: u64,
    /// Packets after which the SA is removed.
    pub hard_packets: u64,
    /// Bytes after which a rekey is requested.
    pub soft_bytes: u64,
    /// Bytes after which the SA is removed.
    pub hard_bytes: u64,
    /// Age at which a rekey is requested.
    pub soft_time: Duration,
    /// Age at which the SA is removed.
    pub hard_time: Duration,
}

impl Default for Lifetime {
    /// RFC 2407's default of 28800 s, the rekey requested at 90 %, no volume limits.
    fn default() -> Self {
        Self {
            soft_packets: u64::MAX,
            hard_packets: u64::MAX,
            soft_bytes: u64::MAX,
            hard_bytes: u64::MAX,
            soft_time: Duration::from_secs(25_920),
            hard_time: Duration::from_secs(28_800),
        }
    }
}

/// What IKE negotiated for one direction of an SA. The key is borrowed: the SA copies it into its
/// own key schedule and the caller zeroizes its copy.
#[derive(Clone, Copy)]
pub struct SaParams<'k> {
    /// Security parameter index, chosen by the receiver of the direction.
    pub spi: u32,
    /// AH or ESP-GCM.
    pub protection: Protection,
    /// 32 bytes for AH, 36 (key then salt) for ESP-GCM.
    pub key: &'k [u8],
    /// Soft and hard limits.
    pub lifetime: Lifetime,
}

impl fmt::Debug for SaParams<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SaParams")
            .field("spi", &format_args!("{:08x}", self.spi))
            .field("protection", &self.protection)
            .field("key", &"<redacted>")
            .field("lifetime", &self.lifetime)
            .finish()
    }
}

/// Which limit of a [`Lifetime`] was reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// The packet count.
    Packets,
    /// The byte count.
    Bytes,
    /// The age.
    Time,
    /// The 32-bit sequence number is close to (soft) or at (hard) its end.
    SequenceNumber,
}

/// Per-SA counters, read by the daemon for status and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SaCounters {
    /// Packets protected (outbound) or accepted (inbound).
    pub packets: u64,
    /// Inner bytes protected or accepted.
    pub bytes: u64,
    /// Inbound packets whose ICV (or GCM tag) did not verify.
    pub icv_failures: u64,
    /// Inbound packets refused by the anti-replay window.
    pub replay_drops: u64,
}

/// Why a packet could not be processed by an SA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SaError {
    /// The packet's structure is wrong (the sender's fault, or damage in transit).
    Malformed,
    /// The sequence number was refused by the window.
    Replay(Replayed),
    /// The ICV did not verify.
    Authentication,
    /// The SA reached a hard limit.
    Expired,
    /// The caller's output buffer cannot hold the result.
    BufferTooSmall,
}

enum Transform {
    Ah(hmac::Key),
    EspGcm {
        key: Box<aead::LessSafeKey>,
        salt: [u8; GCM_SALT_LEN],
    },
}

impl Drop for Transform {
    fn drop(&mut self) {
        // ring keeps its key schedules opaque and does not zeroize them; the salt is ours.
        if let Transform::EspGcm { salt, .. } = self {
            salt.zeroize();
        }
    }
}

/// A key of the wrong length for its transform (a local misuse by the key provider).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BadKeyLength;

impl Transform {
    fn new(protection: Protection, key: &[u8]) -> Result<Self, BadKeyLength> {
        if key.len() != protection.key_len() {
            return Err(BadKeyLength);
        }
        Ok(match protection {
            Protection::Ah => Transform::Ah(hmac::Key::new(hmac::HMAC_SHA256, key)),
            Protection::EspGcm => {
                let (aes, salt_bytes) = key.split_at(32);
                let unbound =
                    aead::UnboundKey::new(&aead::AES_256_GCM, aes).map_err(|_| BadKeyLength)?;
                let mut salt = [0u8; GCM_SALT_LEN];
                salt.copy_from_slice(salt_bytes);
                Transform::EspGcm {
                    key: Box::new(aead::LessSafeKey::new(unbound)),
                    salt,
                }
            }
        })
    }

    fn protection(&self) -> Protection {
        match self {
            Transform::Ah(_) => Protection::Ah,
            Transform::EspGcm { .. } => Protection::EspGcm,
        }
    }
}

fn gcm_nonce(salt: &[u8; GCM_SALT_LEN], iv: [u8; ESP_IV_LEN]) -> aead::Nonce {
    let mut n = [0u8; aead::NONCE_LEN];
    n[..GCM_SALT_LEN].copy_from_slice(salt);
    n[GCM_SALT_LEN..].copy_from_slice(&iv);
    aead::Nonce::assume_unique_for_key(n)
}

/// A limit newly reached by the last packet or by the passage of time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Crossing {
    /// Time to rekey.
    Soft(Limit),
    /// The SA must go.
    Hard(Limit),
}

/// State shared by both directions: keys, limits and counters.
pub(crate) struct SaState {
    spi: u32,
    transform: Transform,
    lifetime: Lifetime,
    installed: Instant,
    counters: SaCounters,
    soft_raised: bool,
    expired: bool,
}

impl fmt::Debug for SaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SaState")
            .field("spi", &format_args!("{:08x}", self.spi))
            .field("protection", &self.transform.protection())
            .field("counters", &self.counters)
            .field("expired", &self.expired)
            .finish_non_exhaustive()
    }
}

impl SaState {
    fn new(params: &SaParams<'_>, now: Instant) -> Result<Self, BadKeyLength> {
        Ok(Self {
            spi: params.spi,
            transform: Transform::new(params.protection, params.key)?,
            lifetime: params.lifetime,
            installed: now,
            counters: SaCounters::default(),
            soft_raised: false,
            expired: false,
        })
    }

    /// The SPI.
    pub(crate) fn spi(&self) -> u32 {
        self.spi
    }

    /// AH or ESP-GCM.
    pub(crate) fn protection(&self) -> Protection {
        self.transform.protection()
    }

    /// The counters so far.
    pub(crate) fn counters(&self) -> SaCounters {
        self.counters
    }

    /// When the next time limit falls due, if one is still ahead.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        if self.expired {
            None
        } else if !self.soft_raised {
            Some(self.installed + self.lifetime.soft_time.min(self.lifetime.hard_time))
        } else {
            Some(self.installed + self.lifetime.hard_time)
        }
    }

    /// Applies the time limits at `now`.
    pub(crate) fn check_time(&mut self, now: Instant) -> Option<Crossing> {
        if self.expired {
            return None;
        }
        let age = now.saturating_duration_since(self.installed);
        if age >= self.lifetime.hard_time {
            self.expired = true;
            return Some(Crossing::Hard(Limit::Time));
        }
        if age >= self.lifetime.soft_time && !self.soft_raised {
            self.soft_raised = true;
            return Some(Crossing::Soft(Limit::Time));
        }
        None
    }

    /// Counts one packet of `bytes` inner bytes and reports a limit it reached.
    fn account(&mut self, bytes: usize, seq: u32, outbound: bool) -> Option<Crossing> {
        self.counters.packets += 1;
        self.counters.bytes += bytes as u64;
        let c = &self.counters;
        let l = &self.lifetime;
        let hard = if c.packets >= l.hard_packets {
            Some(Limit::Packets)
        } else if c.bytes >= l.hard_bytes {
            Some(Limit::Bytes)
        } else if outbound && seq == u32::MAX {
            Some(Limit::SequenceNumber)
        } else {
            None
        };
        if let Some(limit) = hard {
            self.expired = true;
            return Some(Crossing::Hard(limit));
        }
        if self.soft_raised {
            return None;
        }
        let soft = if c.packets >= l.soft_packets {
            Some(Limit::Packets)
        } else if c.bytes >= l.soft_bytes {
            Some(Limit::Bytes)
        } else if outbound && seq >= SEQ_SOFT_LIMIT {
            Some(Limit::SequenceNumber)
        } else {
            None
        };
        if soft.is_some() {
            self.soft_raised = true;
        }
        soft.map(Crossing::Soft)
    }
}

/// The sending direction: keys plus the last sequence number used.
#[derive(Debug)]
pub(crate) struct OutboundSa {
    state: SaState,
    seq: u32,
    ip_id: u16,
}

/// What [`OutboundSa::seal`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Sealed {
    /// Length of the outer packet at the start of the output buffer.
    pub(crate) len: usize,
    /// A limit this packet reached.
    pub(crate) crossing: Option<Crossing>,
}

impl OutboundSa {
    /// An SA that has sent nothing yet.
    pub(crate) fn new(params: &SaParams<'_>, now: Instant) -> Result<Self, BadKeyLength> {
        Ok(Self {
            state: SaState::new(params, now)?,
            seq: 0,
            ip_id: 0,
        })
    }

    /// The shared state.
    pub(crate) fn state(&self) -> &SaState {
        &self.state
    }

    /// The shared state, for time limits.
    pub(crate) fn state_mut(&mut self) -> &mut SaState {
        &mut self.state
    }

    /// Wraps `payload` (an inner IPv4 packet with `next_header` 4, or probe filler with 59) in a
    /// tunnel-mode packet from `src` to `dst`, written to the start of `out`.
    pub(crate) fn seal(
        &mut self,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        tos: u8,
        next_header: u8,
        payload: &[u8],
        out: &mut [u8],
    ) -> Result<Sealed, SaError> {
        if self.state.expired {
            return Err(SaError::Expired);
        }
        let protection = self.state.protection();
        let total = protection.outer_len(payload.len());
        let total_u16 = u16::try_from(total).map_err(|_| SaError::BufferTooSmall)?;
        let out = out.get_mut(..total).ok_or(SaError::BufferTooSmall)?;
        let seq = self.seq.checked_add(1).ok_or(SaError::Expired)?;
        self.seq = seq;
        // A non-zero ID keeps the kernel from choosing its own, which the AH ICV covers.
        self.ip_id = self.ip_id.wrapping_add(1).max(1);
        let (head, rest) = out.split_at_mut(IPV4_HEADER_LEN);
        let head: &mut [u8; IPV4_HEADER_LEN] =
            head.try_into().map_err(|_| SaError::BufferTooSmall)?;
        let header = NewHeader {
            tos,
            total_len: total_u16,
            id: self.ip_id,
            ttl: packet::OUTER_TTL,
            protocol: protection.ip_protocol(),
            src,
            dst,
        };
        match &self.state.transform {
            Transform::Ah(key) => {
                let (ah, inner) = rest.split_at_mut(AH_LEN);
                ah[0] = next_header;
                ah[1] = AH_PAYLOAD_LEN_FIELD;
                ah[2..4].fill(0);
                ah[4..8].copy_from_slice(&self.state.spi.to_be_bytes());
                ah[8..12].copy_from_slice(&seq.to_be_bytes());
                ah[AH_FIXED_LEN..].fill(0);
                inner.copy_from_slice(payload);
                // The ICV covers the header with TOS, flags/offset, TTL and checksum zeroed.
                let zeroed = NewHeader {
                    tos: 0,
                    ttl: 0,
                    ..header
                };
                let mut mutable_zeroed = [0u8; IPV4_HEADER_LEN];
                write_zeroed_header(&mut mutable_zeroed, &zeroed);
                let icv = ah_icv(key, &mutable_zeroed, ah, inner);
                ah[AH_FIXED_LEN..].copy_from_slice(&icv);
            }
            Transform::EspGcm { key, salt } => {
                let (esp, body) = rest.split_at_mut(ESP_HEADER_LEN + ESP_IV_LEN);
                esp[0..4].copy_from_slice(&self.state.spi.to_be_bytes());
                esp[4..8].copy_from_slice(&seq.to_be_bytes());
                let iv = u64::from(seq).to_be_bytes();
                esp[8..16].copy_from_slice(&iv);
                let (plain, tag_out) = body.split_at_mut(body.len() - ICV_LEN);
                let (data, trailer) = plain.split_at_mut(payload.len());
                data.copy_from_slice(payload);
                let pad_len = trailer.len() - 2;
                for (i, b) in trailer[..pad_len].iter_mut().enumerate() {
                    *b = (i + 1) as u8;
                }
                trailer[pad_len] = pad_len as u8;
                trailer[pad_len + 1] = next_header;
                let aad = aead::Aad::from(&esp[..ESP_HEADER_LEN]);
                let tag = key
                    .seal_in_place_separate_tag(gcm_nonce(salt, iv), aad, plain)
                    .map_err(|_| SaError::BufferTooSmall)?;
                tag_out.copy_from_slice(tag.as_ref());
            }
        }
        packet::write_ipv4_header(head, &header);
        let crossing = self.state.account(payload.len(), seq, true);
        Ok(Sealed {
            len: total,
            crossing,
        })
    }
}

/// Writes the outer header as the ICV sees it: flags, offset and checksum zero.
fn write_zeroed_header(out: &mut [u8; IPV4_HEADER_LEN], h: &NewHeader) {
    out[0] = 0x45;
    out[1] = 0;
    out[2..4].copy_from_slice(&h.total_len.to_be_bytes());
    out[4..6].copy_from_slice(&h.id.to_be_bytes());
    out[6..10].copy_from_slice(&[0, 0, 0, h.protocol]);
    out[10..12].fill(0);
    out[12..16].copy_from_slice(&h.src.octets());
    out[16..20].copy_from_slice(&h.dst.octets());
}

/// HMAC-SHA-256 over (zeroed outer header, AH with zero ICV, payload), truncated to 128 bits.
fn ah_icv(
    key: &hmac::Key,
    outer: &[u8],
    ah_fixed_and_zero_icv: &[u8],
    payload: &[u8],
) -> [u8; ICV_LEN] {
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(outer);
    ctx.update(ah_fixed_and_zero_icv);
    ctx.update(payload);
    let tag = ctx.sign();
    let mut icv = [0u8; ICV_LEN];
    icv.copy_from_slice(&tag.as_ref()[..ICV_LEN]);
    icv
}

/// The receiving direction: keys plus the anti-replay window.
#[derive(Debug)]
pub(crate) struct InboundSa {
    state: SaState,
    window: ReplayWindow,
}

/// What [`InboundSa::open`] produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Opened {
    /// Length of the payload written to the start of the output buffer.
    pub(crate) len: usize,
    /// 4 for an inner IPv4 packet, 59 for a probe to discard.
    pub(crate) next_header: u8,
    /// A limit this packet reached.
    pub(crate) crossing: Option<Crossing>,
}

/// Where the fields of a received outer packet lie, from [`InboundSa::spi_of`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Received {
    /// The parsed outer header.
    pub(crate) outer: packet::Ipv4Header,
    /// The SPI in the AH or ESP header.
    pub(crate) spi: u32,
}

impl InboundSa {
    /// An SA that has received nothing yet.
    pub(crate) fn new(params: &SaParams<'_>, now: Instant) -> Result<Self, BadKeyLength> {
        Ok(Self {
            state: SaState::new(params, now)?,
            window: ReplayWindow::new(),
        })
    }

    /// The shared state.
    pub(crate) fn state(&self) -> &SaState {
        &self.state
    }

    /// The shared state, for time limits.
    pub(crate) fn state_mut(&mut self) -> &mut SaState {
        &mut self.state
    }

    /// Reads the outer header and the SPI of a received AH or ESP packet, for the SA lookup.
    pub(crate) fn spi_of(packet: &[u8]) -> Result<Received, SaError> {
        let outer = packet::parse_ipv4(packet).map_err(|_| SaError::Malformed)?;
        // Options would need RFC 4302 Appendix A handling; confmesh never sends them.
        if outer.header_len != IPV4_HEADER_LEN
            || outer.is_fragment
            || packet::checksum(&packet[..IPV4_HEADER_LEN]) != 0
        {
            return Err(SaError::Malformed);
        }
        let spi_offset = match outer.protocol {
            PROTO_AH => 4,
            PROTO_ESP => 0,
            _ => return Err(SaError::Malformed),
        };
        let at = IPV4_HEADER_LEN + spi_offset;
        let spi = packet.get(at..at + 4).ok_or(SaError::Malformed)?;
        let spi = u32::from_be_bytes([spi[0], spi[1], spi[2], spi[3]]);
        Ok(Received { outer, spi })
    }

    /// Checks the window, verifies and strips the protection of `packet` (the whole outer packet,
    /// already looked up by [`spi_of`](Self::spi_of)), and writes the payload to the start of
    /// `out`.
    pub(crate) fn open(
        &mut self,
        rx: &Received,
        packet: &[u8],
        out: &mut [u8],
    ) -> Result<Opened, SaError> {
        let Self { state, window } = self;
        if state.expired {
            return Err(SaError::Expired);
        }
        if rx.outer.protocol != state.protection().ip_protocol() {
            return Err(SaError::Malformed);
        }
        let body = packet.get(IPV4_HEADER_LEN..).ok_or(SaError::Malformed)?;
        let counters = &mut state.counters;
        let (len, next_header, seq) = match &state.transform {
            Transform::Ah(key) => {
                let ah = body.get(..AH_LEN).ok_or(SaError::Malformed)?;
                let payload = &body[AH_LEN..];
                if ah[1] != AH_PAYLOAD_LEN_FIELD {
                    return Err(SaError::Malformed);
                }
                let next_header = ah[0];
                let seq = u32::from_be_bytes([ah[8], ah[9], ah[10], ah[11]]);
                check_window(window, counters, seq)?;
                let mut zeroed = [0u8; IPV4_HEADER_LEN];
                zeroed.copy_from_slice(&packet[..IPV4_HEADER_LEN]);
                zeroed[1] = 0; // TOS
                zeroed[6..9].fill(0); // flags, fragment offset, TTL
                zeroed[10..12].fill(0); // checksum
                let mut fixed = [0u8; AH_LEN];
                fixed[..AH_FIXED_LEN].copy_from_slice(&ah[..AH_FIXED_LEN]);
                let icv = ah_icv(key, &zeroed, &fixed, payload);
                if !bool::from(icv.ct_eq(&ah[AH_FIXED_LEN..])) {
                    counters.icv_failures += 1;
                    return Err(SaError::Authentication);
                }
                let dest = out
                    .get_mut(..payload.len())
                    .ok_or(SaError::BufferTooSmall)?;
                dest.copy_from_slice(payload);
                window.update(seq);
                (payload.len(), next_header, seq)
            }
            Transform::EspGcm { key, salt } => {
                let head = body
                    .get(..ESP_HEADER_LEN + ESP_IV_LEN)
                    .ok_or(SaError::Malformed)?;
                let sealed = &body[ESP_HEADER_LEN + ESP_IV_LEN..];
                // At least the 2-byte trailer padded to 4, plus the tag; whole 4-byte words.
                if sealed.len() < 4 + ICV_LEN || sealed.len() % 4 != 0 {
                    return Err(SaError::Malformed);
                }
                let seq = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
                check_window(window, counters, seq)?;
                let mut iv = [0u8; ESP_IV_LEN];
                iv.copy_from_slice(&head[ESP_HEADER_LEN..]);
                let work = out.get_mut(..sealed.len()).ok_or(SaError::BufferTooSmall)?;
                work.copy_from_slice(sealed);
                let aad = aead::Aad::from(&head[..ESP_HEADER_LEN]);
                let plain_len = match key.open_in_place(gcm_nonce(salt, iv), aad, work) {
                    Ok(plain) => plain.len(),
                    Err(_) => {
                        counters.icv_failures += 1;
                        return Err(SaError::Authentication);
                    }
                };
                // Authenticated from here on: a bad trailer is the peer's malformation.
                window.update(seq);
                let plain = &work[..plain_len];
                let next_header = plain[plain_len - 1];
                let pad_len = usize::from(plain[plain_len - 2]);
                let len = plain_len
                    .checked_sub(2 + pad_len)
                    .ok_or(SaError::Malformed)?;
                let padding_ok = plain[len..len + pad_len]
                    .iter()
                    .enumerate()
                    .all(|(i, &b)| usize::from(b) == i + 1);
                if !padding_ok {
                    return Err(SaError::Malformed);
                }
                (len, next_header, seq)
            }
        };
        let crossing = state.account(len, seq, false);
        Ok(Opened {
            len,
            next_header,
            crossing,
        })
    }
}

fn check_window(window: &ReplayWindow, counters: &mut SaCounters, seq: u32) -> Result<(), SaError> {
    window.check(seq).map_err(|r| {
        counters.replay_drops += 1;
        SaError::Replay(r)
    })
}

/// The next-header values an SA accepts: an inner IPv4 packet or a probe.
pub(crate) fn is_tunnel_payload(next_header: u8) -> bool {
    next_header == PROTO_IPV4 || next_header == PROTO_NONE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    /// RFC 4868 §2.7.2.2 AUTH256-1..4, fed through the ICV function in three arbitrary parts as the
    /// AH code does (header, AH, payload).
    #[test]
    fn rfc4868_hmac_sha256_128_vectors() {
        let vectors: [(Vec<u8>, Vec<u8>, &str); 4] = [
            (
                vec![0x0b; 32],
                b"Hi There".to_vec(),
                "198a607eb44bfbc69903a0f1cf2bbdc5",
            ),
            (
                b"JefeJefeJefeJefeJefeJefeJefeJefe".to_vec(),
                b"what do ya want for nothing?".to_vec(),
                "167f928588c5cc2eef8e3093caa0e87c",
            ),
            (
                vec![0xaa; 32],
                vec![0xdd; 50],
                "cdcb1220d1ecccea91e53aba3092f962",
            ),
            (
                (1..=32).collect(),
                vec![0xcd; 50],
                "372efcf9b40b35c2115b1346903d2ef4",
            ),
        ];
        for (key, data, expected) in vectors {
            let key = hmac::Key::new(hmac::HMAC_SHA256, &key);
            for (a, b) in [(0, 0), (1, 3), (2, data.len()), (data.len(), data.len())] {
                let icv = ah_icv(&key, &data[..a], &data[a..b], &data[b..]);
                assert_eq!(icv.to_vec(), hex(expected), "split at {a}/{b}");
            }
        }
    }

    /// The sequence number asks for a rekey at three quarters of its space and ends the SA at
    /// its last value instead of wrapping (no ESN).
    #[test]
    fn sequence_number_limits() {
        let now = Instant::now();
        let key = [7u8; 32];
        let params = SaParams {
            spi: 0x1234,
            protection: Protection::Ah,
            key: &key,
            lifetime: Lifetime::default(),
        };
        let mut sa = OutboundSa::new(&params, now).expect("sa");
        let (src, dst) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        let mut out = [0u8; 128];
        let mut send = |sa: &mut OutboundSa| sa.seal(src, dst, 0, PROTO_NONE, &[0; 8], &mut out);
        assert_eq!(send(&mut sa).map(|s| s.crossing), Ok(None));
        sa.seq = SEQ_SOFT_LIMIT - 1;
        assert_eq!(
            send(&mut sa).map(|s| s.crossing),
            Ok(Some(Crossing::Soft(Limit::SequenceNumber)))
        );
        assert_eq!(send(&mut sa).map(|s| s.crossing), Ok(None), "raised once");
        sa.seq = u32::MAX - 1;
        assert_eq!(
            send(&mut sa).map(|s| s.crossing),
            Ok(Some(Crossing::Hard(Limit::SequenceNumber)))
        );
        assert_eq!(send(&mut sa), Err(SaError::Expired), "never wraps to 0");
    }

    #[test]
    fn overheads() {
        assert_eq!(Protection::Ah.max_inner_len(1500), 1452);
        assert_eq!(Protection::Ah.max_inner_len(1280), 1232);
        assert_eq!(Protection::EspGcm.max_inner_len(1500), 1446);
        assert_eq!(Protection::EspGcm.max_inner_len(1280), 1226);
        for mtu in [576u16, 1280, 1400, 1499, 1500, 9000] {
            for p in [Protection::Ah, Protection::EspGcm] {
                let inner = p.max_inner_len(mtu);
                assert!(p.outer_len(inner) <= usize::from(mtu));
                assert!(p.outer_len(inner + 1) > usize::from(mtu));
            }
        }
    }
}
