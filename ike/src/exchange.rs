//! The state one phase-1 SA carries (RFC 2409 §5): cookies, nonces, Diffie-Hellman values, the
//! derived SKEYIDs and the CBC IV chain, plus the message protection all exchanges under it share.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use crate::crypto::{self, BLOCK, DhKey};
use crate::wire::{self, Chain, HEADER_LEN, Header, Malformed, Payload, Payloads};

/// The three keys of RFC 2409 §5 derived from SKEYID.
pub(crate) struct P1Keys {
    /// Derives child keys and the bandwidth key.
    pub(crate) d: Zeroizing<[u8; 32]>,
    /// Authenticates phase-2 and informational messages.
    pub(crate) a: Zeroizing<[u8; 32]>,
    /// Encrypts (AES-256-CBC needs exactly the PRF's 32 bytes).
    pub(crate) e: Zeroizing<[u8; 32]>,
}

impl P1Keys {
    /// SKEYID = prf(PSK, Ni_b | Nr_b) and its three derivatives.
    pub(crate) fn derive(
        skeyid: &[u8; 32],
        gxy: &[u8],
        icookie: &[u8; 8],
        rcookie: &[u8; 8],
    ) -> Self {
        let d = crypto::prf(skeyid, &[gxy, icookie, rcookie, &[0]]);
        let a = crypto::prf(skeyid, &[&d[..], gxy, icookie, rcookie, &[1]]);
        let e = crypto::prf(skeyid, &[&a[..], gxy, icookie, rcookie, &[2]]);
        Self { d, a, e }
    }
}

/// A message kept for retransmission and for answering a retransmitted request.
pub(crate) struct Flight {
    /// What we sent last in this exchange.
    pub(crate) sent: Vec<u8>,
    /// When to send it again, if we are waiting for an answer.
    pub(crate) resend_at: Option<Instant>,
    /// Transmissions so far.
    pub(crate) tries: u32,
    /// SHA-256 of the last datagram the peer sent in this exchange, to spot its retransmissions.
    pub(crate) last_in: [u8; 32],
}

impl Flight {
    pub(crate) fn new() -> Self {
        Self {
            sent: Vec::new(),
            resend_at: None,
            tries: 0,
            last_in: [0; 32],
        }
    }

    /// Records a new message to send; `wait` arms the retransmission timer.
    pub(crate) fn send(&mut self, msg: Vec<u8>, now: Instant, wait: Option<Duration>) {
        self.sent = msg;
        self.tries = 1;
        self.resend_at = wait.map(|w| now + w);
    }

    /// Records the peer's closing message of the exchange, which we do not answer. A repeat of
    /// it must not make us repeat our own last message: the peer would answer that again, and
    /// duplicated datagrams would keep the two sides echoing each other for ever.
    pub(crate) fn finish(&mut self, closing: &[u8]) {
        self.last_in = hash_of(closing);
        self.sent.clear();
        self.resend_at = None;
    }
}

/// Fingerprint of a datagram, to recognise the peer's retransmissions.
pub(crate) fn hash_of(data: &[u8]) -> [u8; 32] {
    crypto::hash(&[data])
}

/// Where a phase-1 exchange stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum P1State {
    /// Initiator: MM1 sent.
    Mm1Sent,
    /// Initiator: MM3 sent.
    Mm3Sent,
    /// Initiator: MM5 sent.
    Mm5Sent,
    /// Responder: MM2 sent.
    Mm2Sent,
    /// Responder: MM4 sent.
    Mm4Sent,
    /// Both: done.
    Established,
}

/// A Quick Mode exchange in progress (or just finished, kept to answer retransmissions).
pub(crate) struct Quick {
    pub(crate) msgid: u32,
    pub(crate) initiator: bool,
    /// Waiting for QM2 (initiator) or QM3 (responder); `false` once done.
    pub(crate) open: bool,
    /// IV for the next message of this exchange.
    pub(crate) iv: [u8; BLOCK],
    pub(crate) ni: Vec<u8>,
    /// The responder's nonce (responder only; HASH(3) covers it).
    pub(crate) nr: Vec<u8>,
    pub(crate) dh: Option<DhKey>,
    /// The SPI we chose (inbound).
    pub(crate) my_spi: u32,
    /// Responder: the child computed at QM1, installed once QM3 proves the initiator has it.
    pub(crate) pending: Option<crate::endpoint::NewChild>,
    pub(crate) flight: Flight,
    /// When to forget the exchange.
    pub(crate) expires: Instant,
}

/// One phase-1 SA with a peer, from MM1 on.
pub(crate) struct IkeSa {
    pub(crate) peer: Ipv4Addr,
    pub(crate) initiator: bool,
    pub(crate) icookie: [u8; 8],
    pub(crate) rcookie: [u8; 8],
    pub(crate) state: P1State,
    /// The initiator's SA payload body (authenticated by HASH_I/HASH_R).
    pub(crate) sai_b: Vec<u8>,
    pub(crate) dh: Option<DhKey>,
    pub(crate) ni: Vec<u8>,
    pub(crate) nr: Vec<u8>,
    pub(crate) gxi: Vec<u8>,
    pub(crate) gxr: Vec<u8>,
    pub(crate) skeyid: Option<Zeroizing<[u8; 32]>>,
    pub(crate) keys: Option<P1Keys>,
    /// Phase 1: the running IV; once established, the last CBC block of phase 1 (RFC 2409 App. B).
    pub(crate) iv: [u8; BLOCK],
    pub(crate) lifetime: Duration,
    pub(crate) flight: Flight,
    pub(crate) created: Instant,
    pub(crate) established: Option<Instant>,
    pub(crate) rekey_at: Option<Instant>,
    pub(crate) expire_at: Option<Instant>,
    /// A newer SA replaced this one; DELETE it at this time.
    pub(crate) retire_at: Option<Instant>,
    /// The peer announced RFC 3706 support.
    pub(crate) peer_dpd: bool,
    /// Initiator: when the peer's own MM1 last made us repeat ours at once (see
    /// `Endpoint::on_mm1`); such repeats are throttled, since anyone can forge an MM1.
    pub(crate) mm1_repeated_at: Option<Instant>,
    pub(crate) quick: Vec<Quick>,
}

impl IkeSa {
    pub(crate) fn new(
        peer: Ipv4Addr,
        initiator: bool,
        icookie: [u8; 8],
        now: Instant,
        lifetime: Duration,
    ) -> Self {
        Self {
            peer,
            initiator,
            icookie,
            rcookie: [0; 8],
            state: if initiator {
                P1State::Mm1Sent
            } else {
                P1State::Mm2Sent
            },
            sai_b: Vec::new(),
            dh: None,
            ni: Vec::new(),
            nr: Vec::new(),
            gxi: Vec::new(),
            gxr: Vec::new(),
            skeyid: None,
            keys: None,
            iv: [0; BLOCK],
            lifetime,
            flight: Flight::new(),
            created: now,
            established: None,
            rekey_at: None,
            expire_at: None,
            retire_at: None,
            peer_dpd: false,
            mm1_repeated_at: None,
            quick: Vec::new(),
        }
    }

    pub(crate) fn is_established(&self) -> bool {
        self.state == P1State::Established
    }

    /// Computes SKEYID and the keys after the KE/nonce exchange, and the first phase-1 IV.
    pub(crate) fn derive_keys(&mut self, psk: &[u8], gxy: &[u8]) {
        let skeyid = crypto::prf(psk, &[&self.ni, &self.nr]);
        self.keys = Some(P1Keys::derive(&skeyid, gxy, &self.icookie, &self.rcookie));
        self.skeyid = Some(skeyid);
        let h = crypto::hash(&[&self.gxi, &self.gxr]);
        self.iv.copy_from_slice(&h[..BLOCK]);
    }

    /// HASH_I (`initiator`) or HASH_R over the ID payload body `id_b` (RFC 2409 §5).
    pub(crate) fn auth_hash(&self, initiator: bool, id_b: &[u8]) -> Option<Zeroizing<[u8; 32]>> {
        let skeyid = self.skeyid.as_ref()?;
        Some(if initiator {
            crypto::prf(
                &skeyid[..],
                &[
                    &self.gxi,
                    &self.gxr,
                    &self.icookie,
                    &self.rcookie,
                    &self.sai_b,
                    id_b,
                ],
            )
        } else {
            crypto::prf(
                &skeyid[..],
                &[
                    &self.gxr,
                    &self.gxi,
                    &self.rcookie,
                    &self.icookie,
                    &self.sai_b,
                    id_b,
                ],
            )
        })
    }

    /// The IV of the first message of a phase-2 or informational exchange (RFC 2409 App. B).
    pub(crate) fn exchange_iv(&self, msgid: u32) -> [u8; BLOCK] {
        let h = crypto::hash(&[&self.iv, &msgid.to_be_bytes()]);
        let mut iv = [0u8; BLOCK];
        iv.copy_from_slice(&h[..BLOCK]);
        iv
    }

    /// Encrypts a payload chain into a datagram; returns it and the next IV.
    pub(crate) fn seal(
        &self,
        exchange: u8,
        msgid: u32,
        chain: &Chain,
        iv: &[u8; BLOCK],
    ) -> Option<(Vec<u8>, [u8; BLOCK])> {
        let keys = self.keys.as_ref()?;
        let pad = (BLOCK - chain.buf.len() % BLOCK) % BLOCK;
        let body_len = chain.buf.len() + pad;
        let mut out = vec![0u8; HEADER_LEN + body_len];
        let header = Header {
            icookie: self.icookie,
            rcookie: self.rcookie,
            next: chain.first(),
            exchange,
            flags: wire::FLAG_ENC,
            msgid,
            length: u32::try_from(out.len()).ok()?,
        };
        header.write(&mut out);
        out[HEADER_LEN..HEADER_LEN + chain.buf.len()].copy_from_slice(&chain.buf);
        let next_iv = crypto::cbc_encrypt(&keys.e, iv, &mut out[HEADER_LEN..]);
        Some((out, next_iv))
    }

    /// Decrypts a datagram's body; returns the plaintext and the next IV (its last cipher block).
    pub(crate) fn open(&self, datagram: &[u8], iv: &[u8; BLOCK]) -> Option<(Vec<u8>, [u8; BLOCK])> {
        let keys = self.keys.as_ref()?;
        let mut body = datagram.get(HEADER_LEN..)?.to_vec();
        let next_iv = crypto::cbc_decrypt(&keys.e, iv, &mut body)?;
        Some((body, next_iv))
    }

    /// prf(SKEYID_a, parts…): HASH(1)/(2)/(3) of Quick Mode and HASH(1) of informational messages.
    pub(crate) fn hash_a(&self, parts: &[&[u8]]) -> Option<Zeroizing<[u8; 32]>> {
        Some(crypto::prf(&self.keys.as_ref()?.a[..], parts))
    }
}

/// A decrypted, hash-protected message: its HASH payload and the bytes after it that the hash
/// covers (up to the end of the last payload, padding excluded), plus the payloads themselves.
pub(crate) struct Protected<'a> {
    pub(crate) hash: &'a [u8],
    pub(crate) covered: &'a [u8],
    pub(crate) payloads: Vec<Payload<'a>>,
}

/// Splits a decrypted body whose first payload must be HASH.
pub(crate) fn protected(plain: &[u8], first: u8) -> Result<Protected<'_>, Malformed> {
    let payloads: Vec<Payload<'_>> = Payloads::new(plain, 0, first)
        .take(16)
        .collect::<Result<_, _>>()?;
    let (head, rest) = payloads.split_first().ok_or(Malformed)?;
    if head.kind != wire::PL_HASH || head.body.len() != 32 {
        return Err(Malformed);
    }
    let end = payloads.last().map_or(head.end, |p| p.end);
    let covered = plain.get(head.end..end).ok_or(Malformed)?;
    Ok(Protected {
        hash: head.body,
        covered,
        payloads: rest.to_vec(),
    })
}

/// A chain of a HASH payload followed by `rest`.
pub(crate) fn with_hash(hash: &[u8], rest: &Chain) -> Chain {
    let mut c = Chain::new();
    c.push(wire::PL_HASH, hash);
    c.append(rest);
    c
}
