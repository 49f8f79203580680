//! ISAKMP (RFC 2408) encoding: the fixed header, the generic payload chain, SA/proposal/transform
//! structures with their attributes, and the builders for what this engine sends.
//!
//! Parsing never allocates and never indexes past the input: every length comes from the datagram
//! and is checked before use.

use std::net::Ipv4Addr;

/// Length of the ISAKMP header.
pub(crate) const HEADER_LEN: usize = 28;
/// ISAKMP version 1.0.
const VERSION: u8 = 0x10;

/// Exchange types (RFC 2408 §3.1).
pub(crate) const EXCH_MAIN: u8 = 2;
pub(crate) const EXCH_INFO: u8 = 5;
pub(crate) const EXCH_QUICK: u8 = 32;

/// Header flags.
pub(crate) const FLAG_ENC: u8 = 0x01;

/// Payload types (RFC 2408 §3.1).
pub(crate) const PL_SA: u8 = 1;
pub(crate) const PL_PROPOSAL: u8 = 2;
pub(crate) const PL_TRANSFORM: u8 = 3;
pub(crate) const PL_KE: u8 = 4;
pub(crate) const PL_ID: u8 = 5;
pub(crate) const PL_HASH: u8 = 8;
pub(crate) const PL_NONCE: u8 = 10;
pub(crate) const PL_NOTIFY: u8 = 11;
pub(crate) const PL_DELETE: u8 = 12;
pub(crate) const PL_VID: u8 = 13;

/// Protocol IDs (RFC 2407 §4.4.1).
pub(crate) const PROTO_ISAKMP: u8 = 1;
pub(crate) const PROTO_AH: u8 = 2;
pub(crate) const PROTO_ESP: u8 = 3;

/// Notify types used here (RFC 2408 §3.14.1, RFC 2407 §4.6.3, RFC 3706).
pub(crate) const N_INVALID_COOKIE: u16 = 11;
pub(crate) const N_NO_PROPOSAL_CHOSEN: u16 = 14;
pub(crate) const N_INVALID_ID_INFORMATION: u16 = 18;
pub(crate) const N_AUTHENTICATION_FAILED: u16 = 24;
pub(crate) const N_INITIAL_CONTACT: u16 = 24578;
pub(crate) const N_R_U_THERE: u16 = 36136;
pub(crate) const N_R_U_THERE_ACK: u16 = 36137;

/// ID types (RFC 2407 §4.6.2.1).
pub(crate) const ID_IPV4_ADDR: u8 = 1;
pub(crate) const ID_IPV4_ADDR_SUBNET: u8 = 4;

/// RFC 3706 vendor ID announcing DPD support.
pub(crate) const DPD_VID: [u8; 16] = [
    0xaf, 0xca, 0xd7, 0x13, 0x68, 0xa1, 0xf1, 0xc9, 0x6b, 0x86, 0x96, 0xfc, 0x77, 0x57, 0x01, 0x00,
];

/// DOI IPsec, situation identity-only.
const DOI_IPSEC: u32 = 1;
const SIT_IDENTITY_ONLY: u32 = 1;

/// Phase-1 attribute types and values (RFC 2409 Appendix A).
const P1_ENC: u16 = 1;
const P1_HASH: u16 = 2;
const P1_AUTH: u16 = 3;
const P1_GROUP: u16 = 4;
const P1_LIFE_TYPE: u16 = 11;
const P1_LIFE_DURATION: u16 = 12;
const P1_KEY_LEN: u16 = 14;
const ENC_AES_CBC: u64 = 7;
const HASH_SHA2_256: u64 = 4;
const AUTH_PSK: u64 = 1;
const LIFE_SECONDS: u64 = 1;
const LIFE_KILOBYTES: u64 = 2;

/// Phase-2 attribute types and values (RFC 2407 §4.5, RFC 4868 §4).
const P2_LIFE_TYPE: u16 = 1;
const P2_LIFE_DURATION: u16 = 2;
const P2_GROUP: u16 = 3;
const P2_ENCAP: u16 = 4;
const P2_AUTH_ALG: u16 = 5;
const P2_KEY_LEN: u16 = 6;
const ENCAP_TUNNEL: u64 = 1;
const AUTH_HMAC_SHA2_256: u64 = 5;
/// Transform IDs: AH_SHA2_256 (RFC 4868), ESP_AES_GCM_16 (RFC 4106).
const AH_SHA2_256: u8 = 5;
const ESP_AES_GCM_16: u8 = 20;

/// Why a datagram could not be parsed; it is dropped and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Malformed;

/// The fixed ISAKMP header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) icookie: [u8; 8],
    pub(crate) rcookie: [u8; 8],
    pub(crate) next: u8,
    pub(crate) exchange: u8,
    pub(crate) flags: u8,
    pub(crate) msgid: u32,
    pub(crate) length: u32,
}

fn be16(b: &[u8], at: usize) -> Result<u16, Malformed> {
    let s = b.get(at..at + 2).ok_or(Malformed)?;
    Ok(u16::from_be_bytes([s[0], s[1]]))
}

fn be32(b: &[u8], at: usize) -> Result<u32, Malformed> {
    let s = b.get(at..at + 4).ok_or(Malformed)?;
    Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

impl Header {
    /// Parses the header and checks the version and that the length field matches the datagram.
    pub(crate) fn parse(d: &[u8]) -> Result<Self, Malformed> {
        let h = d.get(..HEADER_LEN).ok_or(Malformed)?;
        if h[17] >> 4 != 1 {
            return Err(Malformed);
        }
        let length = be32(h, 24)?;
        if usize::try_from(length).ok() != Some(d.len()) {
            return Err(Malformed);
        }
        let mut icookie = [0u8; 8];
        icookie.copy_from_slice(&h[..8]);
        let mut rcookie = [0u8; 8];
        rcookie.copy_from_slice(&h[8..16]);
        Ok(Self {
            icookie,
            rcookie,
            next: h[16],
            exchange: h[18],
            flags: h[19],
            msgid: be32(h, 20)?,
            length,
        })
    }

    /// Writes the header into the first 28 bytes of `out`.
    pub(crate) fn write(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.icookie);
        out[8..16].copy_from_slice(&self.rcookie);
        out[16] = self.next;
        out[17] = VERSION;
        out[18] = self.exchange;
        out[19] = self.flags;
        out[20..24].copy_from_slice(&self.msgid.to_be_bytes());
        out[24..28].copy_from_slice(&self.length.to_be_bytes());
    }
}

/// One payload of a chain: its type, body (after the 4-byte generic header) and the whole payload.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Payload<'a> {
    pub(crate) kind: u8,
    pub(crate) body: &'a [u8],
    /// Offset of the payload's end in the buffer that was iterated.
    pub(crate) end: usize,
    /// Offset of the payload's start.
    pub(crate) start: usize,
}

/// Iterates a payload chain; yields `Err` once and stops if a length is inconsistent.
pub(crate) struct Payloads<'a> {
    buf: &'a [u8],
    pos: usize,
    next: u8,
    failed: bool,
}

impl<'a> Payloads<'a> {
    /// A chain starting at `pos` in `buf` whose first payload has type `first`. Bytes after the
    /// last payload (CBC padding) are ignored.
    pub(crate) fn new(buf: &'a [u8], pos: usize, first: u8) -> Self {
        Self {
            buf,
            pos,
            next: first,
            failed: false,
        }
    }
}

impl<'a> Iterator for Payloads<'a> {
    type Item = Result<Payload<'a>, Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next == 0 || self.failed {
            return None;
        }
        let start = self.pos;
        let parsed = (|| {
            let hdr = self.buf.get(start..start.checked_add(4)?)?;
            let len = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
            if len < 4 {
                return None;
            }
            let end = start.checked_add(len)?;
            let body = self.buf.get(start + 4..end)?;
            Some((hdr[0], body, end))
        })();
        match parsed {
            Some((next, body, end)) => {
                let kind = self.next;
                self.next = next;
                self.pos = end;
                Some(Ok(Payload {
                    kind,
                    body,
                    end,
                    start,
                }))
            }
            None => {
                self.failed = true;
                Some(Err(Malformed))
            }
        }
    }
}

/// Builds a payload chain: each payload's next-type is patched when the following one is added.
pub(crate) struct Chain {
    pub(crate) buf: Vec<u8>,
    first: u8,
    last_next_at: Option<usize>,
}

impl Chain {
    /// An empty chain.
    pub(crate) fn new() -> Self {
        Self {
            buf: Vec::with_capacity(768),
            first: 0,
            last_next_at: None,
        }
    }

    /// Appends a payload of type `kind` with `body`.
    pub(crate) fn push(&mut self, kind: u8, body: &[u8]) -> &mut Self {
        match self.last_next_at {
            Some(at) => self.buf[at] = kind,
            None => self.first = kind,
        }
        self.last_next_at = Some(self.buf.len());
        // Bodies are built locally and bounded far below 64 KiB.
        let len = u16::try_from(body.len() + 4).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&[0, 0]);
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.extend_from_slice(body);
        self
    }

    /// Appends all payloads of `rest` (built apart because a hash covers them).
    pub(crate) fn append(&mut self, rest: &Chain) -> &mut Self {
        let Some(rest_last) = rest.last_next_at else {
            return self;
        };
        match self.last_next_at {
            Some(at) => self.buf[at] = rest.first,
            None => self.first = rest.first,
        }
        self.last_next_at = Some(self.buf.len() + rest_last);
        self.buf.extend_from_slice(&rest.buf);
        self
    }

    /// The first payload's type.
    pub(crate) fn first(&self) -> u8 {
        self.first
    }
}

/// A parsed SA attribute: type and value (basic values and variable ones up to 8 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Attr {
    kind: u16,
    value: u64,
}

fn attrs(mut b: &[u8]) -> impl Iterator<Item = Result<Attr, Malformed>> + '_ {
    let mut failed = false;
    std::iter::from_fn(move || {
        if b.is_empty() || failed {
            return None;
        }
        let r = (|| {
            let t = be16(b, 0)?;
            if t & 0x8000 != 0 {
                let v = be16(b, 2)?;
                b = b.get(4..).ok_or(Malformed)?;
                Ok(Attr {
                    kind: t & 0x7fff,
                    value: u64::from(v),
                })
            } else {
                let l = usize::from(be16(b, 2)?);
                let v = b.get(4..4 + l).ok_or(Malformed)?;
                if l > 8 {
                    return Err(Malformed);
                }
                let value = v.iter().fold(0u64, |a, &x| (a << 8) | u64::from(x));
                b = b.get(4 + l..).ok_or(Malformed)?;
                Ok(Attr { kind: t, value })
            }
        })();
        if r.is_err() {
            failed = true;
        }
        Some(r)
    })
}

fn put_attr(out: &mut Vec<u8>, kind: u16, value: u64) {
    if let Ok(v) = u16::try_from(value) {
        out.extend_from_slice(&(kind | 0x8000).to_be_bytes());
        out.extend_from_slice(&v.to_be_bytes());
    } else {
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&u32::try_from(value).unwrap_or(u32::MAX).to_be_bytes());
    }
}

/// A proposal inside an SA payload.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Proposal<'a> {
    pub(crate) number: u8,
    pub(crate) protocol: u8,
    pub(crate) spi: &'a [u8],
    /// The transform payloads (a chain of type 3).
    transforms: &'a [u8],
}

/// A transform inside a proposal.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Transform<'a> {
    pub(crate) id: u8,
    attrs: &'a [u8],
    /// The whole transform payload, to echo it back in a reply.
    raw: &'a [u8],
}

/// Splits an SA payload body into its proposals after checking DOI and situation.
pub(crate) fn proposals(
    sa_body: &[u8],
) -> Result<impl Iterator<Item = Result<Proposal<'_>, Malformed>>, Malformed> {
    if be32(sa_body, 0)? != DOI_IPSEC || be32(sa_body, 4)? != SIT_IDENTITY_ONLY {
        return Err(Malformed);
    }
    Ok(Payloads::new(sa_body, 8, PL_PROPOSAL).map(|p| {
        let p = p?;
        if p.kind != PL_PROPOSAL {
            return Err(Malformed);
        }
        let b = p.body;
        let spi_len = usize::from(*b.get(2).ok_or(Malformed)?);
        let spi = b.get(4..4 + spi_len).ok_or(Malformed)?;
        let transforms = b.get(4 + spi_len..).ok_or(Malformed)?;
        Ok(Proposal {
            number: b[0],
            protocol: b[1],
            spi,
            transforms,
        })
    }))
}

impl<'a> Proposal<'a> {
    /// The proposal's transforms.
    pub(crate) fn transforms(&self) -> impl Iterator<Item = Result<Transform<'a>, Malformed>> + 'a {
        let buf = self.transforms;
        Payloads::new(buf, 0, PL_TRANSFORM).map(move |t| {
            let t = t?;
            if t.kind != PL_TRANSFORM {
                return Err(Malformed);
            }
            let id = *t.body.get(1).ok_or(Malformed)?;
            let attrs = t.body.get(4..).ok_or(Malformed)?;
            let raw = buf.get(t.start..t.end).ok_or(Malformed)?;
            Ok(Transform { id, attrs, raw })
        })
    }
}

/// What a phase-1 transform proposes, reduced to what this engine checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct P1Offer {
    pub(crate) group: u16,
    pub(crate) life_secs: Option<u64>,
    pub(crate) acceptable_suite: bool,
}

/// Reads a phase-1 transform: the suite must be exactly AES-CBC-256, SHA2-256, PSK; the group is
/// returned for the caller to match.
pub(crate) fn p1_offer(t: &Transform<'_>) -> Result<P1Offer, Malformed> {
    let (mut enc, mut hash, mut auth, mut keylen) = (0, 0, 0, 0);
    let mut offer = P1Offer::default();
    let mut life_type = 0;
    for a in attrs(t.attrs) {
        let a = a?;
        match a.kind {
            P1_ENC => enc = a.value,
            P1_HASH => hash = a.value,
            P1_AUTH => auth = a.value,
            P1_GROUP => offer.group = u16::try_from(a.value).unwrap_or(0),
            P1_KEY_LEN => keylen = a.value,
            P1_LIFE_TYPE => life_type = a.value,
            P1_LIFE_DURATION if life_type == LIFE_SECONDS => offer.life_secs = Some(a.value),
            _ => {}
        }
    }
    offer.acceptable_suite = t.id == 1
        && enc == ENC_AES_CBC
        && keylen == 256
        && hash == HASH_SHA2_256
        && auth == AUTH_PSK;
    Ok(offer)
}

/// What a phase-2 transform proposes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct P2Offer {
    pub(crate) group: u16,
    pub(crate) life_secs: Option<u64>,
    pub(crate) life_kb: Option<u64>,
    pub(crate) tunnel: bool,
    /// The transform is AH HMAC-SHA2-256-128 (for an AH proposal) or ESP AES-256-GCM-16.
    pub(crate) acceptable_suite: bool,
}

/// Reads a phase-2 transform of protocol `protocol`.
pub(crate) fn p2_offer(protocol: u8, t: &Transform<'_>) -> Result<P2Offer, Malformed> {
    let mut offer = P2Offer::default();
    let (mut auth, mut keylen, mut life_type) = (None, None, 0);
    for a in attrs(t.attrs) {
        let a = a?;
        match a.kind {
            P2_LIFE_TYPE => life_type = a.value,
            P2_LIFE_DURATION if life_type == LIFE_SECONDS => offer.life_secs = Some(a.value),
            P2_LIFE_DURATION if life_type == LIFE_KILOBYTES => offer.life_kb = Some(a.value),
            P2_GROUP => offer.group = u16::try_from(a.value).unwrap_or(0),
            P2_ENCAP => offer.tunnel = a.value == ENCAP_TUNNEL,
            P2_AUTH_ALG => auth = Some(a.value),
            P2_KEY_LEN => keylen = Some(a.value),
            _ => {}
        }
    }
    offer.acceptable_suite = match protocol {
        PROTO_AH => t.id == AH_SHA2_256 && auth.is_none_or(|a| a == AUTH_HMAC_SHA2_256),
        PROTO_ESP => t.id == ESP_AES_GCM_16 && keylen == Some(256) && auth.is_none(),
        _ => false,
    };
    Ok(offer)
}

impl Transform<'_> {
    /// The transform payload as received, with its next-payload byte cleared (last in a reply).
    pub(crate) fn echo(&self) -> Vec<u8> {
        let mut v = self.raw.to_vec();
        if let Some(b) = v.first_mut() {
            *b = 0;
        }
        v
    }
}

/// Builds an SA payload body with one proposal.
pub(crate) fn sa_body(number: u8, protocol: u8, spi: &[u8], transform: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(64);
    b.extend_from_slice(&DOI_IPSEC.to_be_bytes());
    b.extend_from_slice(&SIT_IDENTITY_ONLY.to_be_bytes());
    let plen = u16::try_from(8 + spi.len() + transform.len()).unwrap_or(u16::MAX);
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(&plen.to_be_bytes());
    // spi.len() is 0 or 4 here.
    b.extend_from_slice(&[number, protocol, spi.len() as u8, 1]);
    b.extend_from_slice(spi);
    b.extend_from_slice(transform);
    b
}

fn transform_payload(id: u8, attrs: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(8 + attrs.len());
    let len = u16::try_from(8 + attrs.len()).unwrap_or(u16::MAX);
    t.extend_from_slice(&[0, 0]);
    t.extend_from_slice(&len.to_be_bytes());
    t.extend_from_slice(&[1, id, 0, 0]);
    t.extend_from_slice(attrs);
    t
}

/// Our phase-1 transform: AES-CBC-256, SHA2-256, PSK, `group`, lifetime in seconds.
pub(crate) fn p1_transform(group: u16, life_secs: u64) -> Vec<u8> {
    let mut a = Vec::with_capacity(32);
    put_attr(&mut a, P1_ENC, ENC_AES_CBC);
    put_attr(&mut a, P1_KEY_LEN, 256);
    put_attr(&mut a, P1_HASH, HASH_SHA2_256);
    put_attr(&mut a, P1_AUTH, AUTH_PSK);
    put_attr(&mut a, P1_GROUP, u64::from(group));
    put_attr(&mut a, P1_LIFE_TYPE, LIFE_SECONDS);
    put_attr(&mut a, P1_LIFE_DURATION, life_secs);
    transform_payload(1, &a)
}

/// Our phase-2 transform for AH (HMAC-SHA2-256-128) or ESP (AES-256-GCM-16), tunnel mode, PFS.
pub(crate) fn p2_transform(
    protocol: u8,
    group: u16,
    life_secs: u64,
    life_kb: Option<u64>,
) -> Vec<u8> {
    let mut a = Vec::with_capacity(32);
    put_attr(&mut a, P2_LIFE_TYPE, LIFE_SECONDS);
    put_attr(&mut a, P2_LIFE_DURATION, life_secs);
    if let Some(kb) = life_kb {
        put_attr(&mut a, P2_LIFE_TYPE, LIFE_KILOBYTES);
        put_attr(&mut a, P2_LIFE_DURATION, kb);
    }
    put_attr(&mut a, P2_GROUP, u64::from(group));
    put_attr(&mut a, P2_ENCAP, ENCAP_TUNNEL);
    if protocol == PROTO_AH {
        put_attr(&mut a, P2_AUTH_ALG, AUTH_HMAC_SHA2_256);
        transform_payload(AH_SHA2_256, &a)
    } else {
        put_attr(&mut a, P2_KEY_LEN, 256);
        transform_payload(ESP_AES_GCM_16, &a)
    }
}

/// An ID payload body for one IPv4 address (protocol and port 0).
pub(crate) fn id_body(addr: Ipv4Addr) -> [u8; 8] {
    let o = addr.octets();
    [ID_IPV4_ADDR, 0, 0, 0, o[0], o[1], o[2], o[3]]
}

/// The single IPv4 address an ID payload names: ID_IPV4_ADDR, or ID_IPV4_ADDR_SUBNET with a /32.
pub(crate) fn id_addr(body: &[u8]) -> Option<Ipv4Addr> {
    let a = |at: usize| -> Option<Ipv4Addr> {
        let s = body.get(at..at + 4)?;
        Some(Ipv4Addr::new(s[0], s[1], s[2], s[3]))
    };
    match *body.first()? {
        ID_IPV4_ADDR if body.len() == 8 => a(4),
        ID_IPV4_ADDR_SUBNET if body.len() == 12 && body[8..12] == [255; 4] => a(4),
        _ => None,
    }
}

/// A notification payload body.
pub(crate) fn notify_body(protocol: u8, spi: &[u8], kind: u16, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(12 + spi.len() + data.len());
    b.extend_from_slice(&DOI_IPSEC.to_be_bytes());
    // SPIs are 0, 4 or 16 bytes.
    b.extend_from_slice(&[protocol, spi.len() as u8]);
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(spi);
    b.extend_from_slice(data);
    b
}

/// A parsed notification.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Notify<'a> {
    pub(crate) kind: u16,
    /// The SPI the notification is about (empty, 4 bytes of a child SA, 16 of cookies).
    pub(crate) spi: &'a [u8],
    pub(crate) data: &'a [u8],
}

/// Parses a notification payload body.
pub(crate) fn notify(b: &[u8]) -> Result<Notify<'_>, Malformed> {
    let spi_len = usize::from(*b.get(5).ok_or(Malformed)?);
    let kind = be16(b, 6)?;
    let spi = b.get(8..8 + spi_len).ok_or(Malformed)?;
    let data = b.get(8 + spi_len..).ok_or(Malformed)?;
    Ok(Notify { kind, spi, data })
}

/// A delete payload body for one SPI (4 bytes) or one ISAKMP SA (16 bytes of cookies).
pub(crate) fn delete_body(protocol: u8, spi: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(12 + spi.len());
    b.extend_from_slice(&DOI_IPSEC.to_be_bytes());
    b.extend_from_slice(&[protocol, spi.len() as u8, 0, 1]);
    b.extend_from_slice(spi);
    b
}

/// A parsed delete payload: protocol, SPI size and the packed SPIs.
pub(crate) fn delete(b: &[u8]) -> Result<(u8, usize, &[u8]), Malformed> {
    let protocol = *b.get(4).ok_or(Malformed)?;
    let spi_len = usize::from(*b.get(5).ok_or(Malformed)?);
    let n = usize::from(be16(b, 6)?);
    let spis = b
        .get(8..8 + spi_len.checked_mul(n).ok_or(Malformed)?)
        .ok_or(Malformed)?;
    if spi_len == 0 {
        return Err(Malformed);
    }
    Ok((protocol, spi_len, spis))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_round_trip() {
        let mut c = Chain::new();
        c.push(PL_SA, &[1, 2, 3]).push(PL_VID, &DPD_VID);
        let got: Vec<_> = Payloads::new(&c.buf, 0, c.first())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].kind, got[0].body), (PL_SA, &[1u8, 2, 3][..]));
        assert_eq!((got[1].kind, got[1].body), (PL_VID, &DPD_VID[..]));
        // A truncated chain yields one error and stops.
        let bad: Vec<_> = Payloads::new(&c.buf[..c.buf.len() - 1], 0, c.first()).collect();
        assert!(bad.last().unwrap().is_err());
    }

    #[test]
    fn p1_transform_is_read_back() {
        let t = p1_transform(16, 100_000);
        let sa = sa_body(1, PROTO_ISAKMP, &[], &t);
        let p = proposals(&sa).unwrap().next().unwrap().unwrap();
        let tr = p.transforms().next().unwrap().unwrap();
        let o = p1_offer(&tr).unwrap();
        assert!(o.acceptable_suite);
        assert_eq!((o.group, o.life_secs), (16, Some(100_000)));
    }

    #[test]
    fn p2_transforms_are_read_back() {
        for proto in [PROTO_AH, PROTO_ESP] {
            let t = p2_transform(proto, 31, 3600, Some(4_000_000));
            let sa = sa_body(1, proto, &[1, 2, 3, 4], &t);
            let p = proposals(&sa).unwrap().next().unwrap().unwrap();
            assert_eq!(p.spi, &[1, 2, 3, 4]);
            let o = p2_offer(proto, &p.transforms().next().unwrap().unwrap()).unwrap();
            assert!(o.acceptable_suite && o.tunnel);
            assert_eq!(
                (o.group, o.life_secs, o.life_kb),
                (31, Some(3600), Some(4_000_000))
            );
        }
    }
}
