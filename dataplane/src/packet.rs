//! IPv4 header reading and writing shared by the SA code, the ICMP answers and the probes.
//!
//! Everything here works on byte slices handed in by the caller and checks every length before it
//! reads, because the bytes come from the network or from the TUN.

use std::net::Ipv4Addr;

/// Length of an IPv4 header without options; the tunnel never emits options.
pub(crate) const IPV4_HEADER_LEN: usize = 20;
/// IP protocol number of ICMP, for the fragmentation-needed answers into the TUN.
pub(crate) const PROTO_ICMP: u8 = 1;
/// "IPv4 in IP": the next header of a tunnel-mode SA.
pub(crate) const PROTO_IPV4: u8 = 4;
/// ESP (RFC 4303).
pub(crate) const PROTO_ESP: u8 = 50;
/// AH (RFC 4302).
pub(crate) const PROTO_AH: u8 = 51;
/// "No next header": the payload is a dummy (RFC 4303 §2.6) — our path-MTU probes.
pub(crate) const PROTO_NONE: u8 = 59;
/// TTL of every outer header (the tunnel endpoint is a fresh sender).
pub(crate) const OUTER_TTL: u8 = 64;
/// Don't-fragment bit in the flags/fragment-offset field.
pub(crate) const FLAG_DF: u16 = 0x4000;
/// More-fragments bit plus the offset mask: non-zero means the packet is a fragment.
const FRAGMENT_MASK: u16 = 0x3fff;

/// The fields of an IPv4 header the tunnel needs, read from a checked buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Ipv4Header {
    /// Header length in bytes (IHL × 4).
    pub(crate) header_len: usize,
    /// Total length from the header; equal to the buffer length once parsed.
    pub(crate) total_len: usize,
    /// DSCP and ECN.
    pub(crate) tos: u8,
    /// Whether DF is set.
    pub(crate) dont_fragment: bool,
    /// Whether MF or a fragment offset is set.
    pub(crate) is_fragment: bool,
    /// Protocol of the payload.
    pub(crate) protocol: u8,
    /// Source address.
    pub(crate) src: Ipv4Addr,
    /// Destination address.
    pub(crate) dst: Ipv4Addr,
}

/// Why a buffer is not a well-formed IPv4 packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NotIpv4;

/// Reads the IPv4 header at the start of `buf` and checks that the packet fills `buf` exactly.
pub(crate) fn parse_ipv4(buf: &[u8]) -> Result<Ipv4Header, NotIpv4> {
    let head: &[u8; IPV4_HEADER_LEN] = buf
        .get(..IPV4_HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(NotIpv4)?;
    if head[0] >> 4 != 4 {
        return Err(NotIpv4);
    }
    let header_len = usize::from(head[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([head[2], head[3]]));
    if header_len < IPV4_HEADER_LEN || total_len < header_len || total_len != buf.len() {
        return Err(NotIpv4);
    }
    let frag = u16::from_be_bytes([head[6], head[7]]);
    Ok(Ipv4Header {
        header_len,
        total_len,
        tos: head[1],
        dont_fragment: frag & FLAG_DF != 0,
        is_fragment: frag & FRAGMENT_MASK != 0,
        protocol: head[9],
        src: Ipv4Addr::new(head[12], head[13], head[14], head[15]),
        dst: Ipv4Addr::new(head[16], head[17], head[18], head[19]),
    })
}

/// RFC 1071 Internet checksum of `data`.
pub(crate) fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Fields of a 20-byte header written by [`write_ipv4_header`].
pub(crate) struct NewHeader {
    pub(crate) tos: u8,
    pub(crate) total_len: u16,
    pub(crate) id: u16,
    pub(crate) ttl: u8,
    pub(crate) protocol: u8,
    pub(crate) src: Ipv4Addr,
    pub(crate) dst: Ipv4Addr,
}

/// Writes an option-less IPv4 header with DF set and a valid checksum.
pub(crate) fn write_ipv4_header(out: &mut [u8; IPV4_HEADER_LEN], h: &NewHeader) {
    out[0] = 0x45;
    out[1] = h.tos;
    out[2..4].copy_from_slice(&h.total_len.to_be_bytes());
    out[4..6].copy_from_slice(&h.id.to_be_bytes());
    out[6..8].copy_from_slice(&FLAG_DF.to_be_bytes());
    out[8] = h.ttl;
    out[9] = h.protocol;
    out[10..12].fill(0);
    out[12..16].copy_from_slice(&h.src.octets());
    out[16..20].copy_from_slice(&h.dst.octets());
    let sum = checksum(out);
    out[10..12].copy_from_slice(&sum.to_be_bytes());
}

/// Recomputes the header checksum of an IPv4 header of `header_len` bytes in place.
pub(crate) fn refresh_checksum(header: &mut [u8]) {
    if let Some(sum_field) = header.get_mut(10..12) {
        sum_field.fill(0);
        let sum = checksum(header);
        header[10..12].copy_from_slice(&sum.to_be_bytes());
    }
}

/// ECN codepoints (RFC 3168) in the two low bits of the TOS byte.
pub(crate) mod ecn {
    /// Not ECN-capable transport.
    pub(crate) const NOT_ECT: u8 = 0b00;
    /// ECT(1).
    pub(crate) const ECT1: u8 = 0b01;
    /// ECT(0).
    pub(crate) const ECT0: u8 = 0b10;
    /// Congestion experienced.
    pub(crate) const CE: u8 = 0b11;
    /// Mask of the ECN bits.
    pub(crate) const MASK: u8 = 0b11;
}

/// RFC 6040 §4.2 decapsulation: the inner TOS byte to forward, or `None` when the combination
/// (congestion marked on a packet whose sender cannot understand it) must be dropped.
pub(crate) fn ecn_decapsulate(inner_tos: u8, outer_tos: u8) -> Option<u8> {
    let inner = inner_tos & ecn::MASK;
    let outer = outer_tos & ecn::MASK;
    let result = match (inner, outer) {
        (ecn::NOT_ECT, ecn::CE) => return None,
        (ecn::NOT_ECT, _) => ecn::NOT_ECT,
        (_, ecn::CE) => ecn::CE,
        (ecn::ECT0, ecn::ECT1) => ecn::ECT1,
        (inner, _) => inner,
    };
    Some((inner_tos & !ecn::MASK) | result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_a_known_header() {
        // The worked example of RFC 1071 style: a header whose checksum field is 0xb861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&h), 0xb861);
        h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(checksum(&h), 0);
    }

    #[test]
    fn rfc6040_table() {
        use ecn::*;
        assert_eq!(ecn_decapsulate(NOT_ECT, CE), None);
        assert_eq!(ecn_decapsulate(NOT_ECT, ECT0), Some(NOT_ECT));
        assert_eq!(ecn_decapsulate(ECT0, CE), Some(CE));
        assert_eq!(ecn_decapsulate(ECT1, CE), Some(CE));
        assert_eq!(ecn_decapsulate(ECT0, ECT1), Some(ECT1));
        assert_eq!(ecn_decapsulate(ECT1, ECT0), Some(ECT1));
        assert_eq!(ecn_decapsulate(CE, NOT_ECT), Some(CE));
        // DSCP bits pass through untouched.
        assert_eq!(ecn_decapsulate(0xb8 | ECT0, CE), Some(0xb8 | CE));
    }

    #[test]
    fn parse_rejects_bad_lengths() {
        let mut h = [0u8; 24];
        h[0] = 0x45;
        h[2..4].copy_from_slice(&24u16.to_be_bytes());
        assert!(parse_ipv4(&h).is_ok());
        assert_eq!(parse_ipv4(&h[..23]), Err(NotIpv4));
        h[0] = 0x44;
        assert_eq!(parse_ipv4(&h), Err(NotIpv4));
        h[0] = 0x46;
        assert!(parse_ipv4(&h).is_ok());
        h[0] = 0x47;
        assert_eq!(
            parse_ipv4(&h),
            Err(NotIpv4),
            "header longer than the packet"
        );
        h[0] = 0x65;
        assert_eq!(parse_ipv4(&h), Err(NotIpv4), "IPv6 version nibble");
    }
}
