//! pcap-ng with the dropped packets' captured network headers: raw IP
//! packets (link type RAW), one interface per namespace/interface pair so
//! Wireshark can filter on it, and the cause in each packet's comment.

use std::io::{self, Write};

use tracer_common::HEADER_CAPTURE_LEN;

const SHB: u32 = 0x0A0D_0D0A;
const IDB: u32 = 0x0000_0001;
const EPB: u32 = 0x0000_0006;
const BYTE_ORDER_MAGIC: u32 = 0x1A2B_3C4D;
/// LINKTYPE_RAW: packets start at the IPv4 or IPv6 header.
const LINKTYPE_RAW: u16 = 101;
const OPT_END: u16 = 0;
const OPT_COMMENT: u16 = 1;
const SHB_USERAPPL: u16 = 4;
const IF_NAME: u16 = 2;
const IF_TSRESOL: u16 = 9;

pub struct PcapngWriter<W: Write> {
    out: W,
    interfaces: Vec<String>,
    pub packets: u64,
}

fn option(buf: &mut Vec<u8>, code: u16, value: &[u8]) {
    // Option lengths are 16-bit; a longer comment is cut, never corrupts.
    let value = &value[..value.len().min(u16::MAX as usize - 3)];
    buf.extend_from_slice(&code.to_le_bytes());
    buf.extend_from_slice(&(value.len() as u16).to_le_bytes());
    buf.extend_from_slice(value);
    pad(buf);
}

fn pad(buf: &mut Vec<u8>) {
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

fn end_options(buf: &mut Vec<u8>) {
    buf.extend_from_slice(&OPT_END.to_le_bytes());
    buf.extend_from_slice(&0u16.to_le_bytes());
}

impl<W: Write> PcapngWriter<W> {
    pub fn new(mut out: W) -> io::Result<Self> {
        let mut body = Vec::new();
        body.extend_from_slice(&BYTE_ORDER_MAGIC.to_le_bytes());
        body.extend_from_slice(&1u16.to_le_bytes());
        body.extend_from_slice(&0u16.to_le_bytes());
        body.extend_from_slice(&(-1i64).to_le_bytes()); // section length unknown
        option(
            &mut body,
            SHB_USERAPPL,
            format!("ctdrop {}", env!("CARGO_PKG_VERSION")).as_bytes(),
        );
        end_options(&mut body);
        write_block(&mut out, SHB, &body)?;
        Ok(PcapngWriter {
            out,
            interfaces: Vec::new(),
            packets: 0,
        })
    }

    /// Index of the interface named `name`, declaring it on first use.
    fn interface(&mut self, name: &str) -> io::Result<u32> {
        if let Some(i) = self.interfaces.iter().position(|n| n == name) {
            return Ok(i as u32);
        }
        let mut body = Vec::new();
        body.extend_from_slice(&LINKTYPE_RAW.to_le_bytes());
        body.extend_from_slice(&0u16.to_le_bytes());
        body.extend_from_slice(&(HEADER_CAPTURE_LEN as u32).to_le_bytes());
        option(&mut body, IF_NAME, name.as_bytes());
        option(&mut body, IF_TSRESOL, &[9]); // nanoseconds
        end_options(&mut body);
        write_block(&mut self.out, IDB, &body)?;
        self.interfaces.push(name.to_string());
        Ok(self.interfaces.len() as u32 - 1)
    }

    /// One dropped packet: `header` starts at its network header.
    pub fn packet(
        &mut self,
        interface: &str,
        wall_ns: u64,
        header: &[u8; HEADER_CAPTURE_LEN],
        skb_len: u32,
        comment: &str,
    ) -> io::Result<()> {
        let iface = self.interface(interface)?;
        let (cap, orig) = lengths(header, skb_len);
        let mut body = Vec::with_capacity(64 + cap + comment.len());
        body.extend_from_slice(&iface.to_le_bytes());
        body.extend_from_slice(&((wall_ns >> 32) as u32).to_le_bytes());
        body.extend_from_slice(&(wall_ns as u32).to_le_bytes());
        body.extend_from_slice(&(cap as u32).to_le_bytes());
        body.extend_from_slice(&orig.to_le_bytes());
        body.extend_from_slice(&header[..cap]);
        pad(&mut body);
        option(&mut body, OPT_COMMENT, comment.as_bytes());
        end_options(&mut body);
        write_block(&mut self.out, EPB, &body)?;
        self.packets += 1;
        Ok(())
    }

    pub fn finish(mut self) -> io::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Captured and original length from the IP header itself: the copy is a
/// fixed 128 bytes, and what follows a short packet is not the packet.
fn lengths(h: &[u8; HEADER_CAPTURE_LEN], skb_len: u32) -> (usize, u32) {
    let ip_len = match h[0] >> 4 {
        4 => u16::from_be_bytes([h[2], h[3]]) as u32,
        6 => u16::from_be_bytes([h[4], h[5]]) as u32 + 40,
        _ => 0,
    };
    let orig = if ip_len >= 20 { ip_len } else { skb_len.max(1) };
    ((orig as usize).min(HEADER_CAPTURE_LEN), orig)
}

fn write_block(out: &mut impl Write, ty: u32, body: &[u8]) -> io::Result<()> {
    let total = (12 + body.len()) as u32;
    out.write_all(&ty.to_le_bytes())?;
    out.write_all(&total.to_le_bytes())?;
    out.write_all(body)?;
    out.write_all(&total.to_le_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4_udp() -> [u8; HEADER_CAPTURE_LEN] {
        let mut h = [0xee; HEADER_CAPTURE_LEN];
        h[..28].copy_from_slice(&[
            0x45, 0, 0, 29, 0, 1, 0, 0, 64, 17, 0, 0, 198, 18, 0, 1, 198, 18, 0, 2, 0x9c, 0x40, 0,
            53, 0, 9, 0, 0,
        ]);
        h
    }

    #[test]
    fn packet_length_comes_from_the_ip_header() {
        assert_eq!(lengths(&ipv4_udp(), 999), (29, 29));
        let mut big = ipv4_udp();
        big[2..4].copy_from_slice(&1500u16.to_be_bytes());
        assert_eq!(lengths(&big, 1500), (128, 1500));
        assert_eq!(lengths(&[0; HEADER_CAPTURE_LEN], 60), (60, 60));
    }

    #[test]
    fn blocks_are_aligned_and_lengths_mirror() {
        let mut w = PcapngWriter::new(Vec::new()).unwrap();
        w.packet(
            "ns1/veth0",
            1_700_000_000_123_456_789,
            &ipv4_udp(),
            29,
            "conntrack_table_full odd",
        )
        .unwrap();
        w.packet("ns1/veth0", 1_700_000_000_223_456_789, &ipv4_udp(), 29, "x")
            .unwrap();
        let out = w.finish().unwrap();
        let mut at = 0;
        let mut types = Vec::new();
        while at < out.len() {
            let ty = u32::from_le_bytes(out[at..at + 4].try_into().unwrap());
            let len = u32::from_le_bytes(out[at + 4..at + 8].try_into().unwrap()) as usize;
            assert_eq!(len % 4, 0);
            assert_eq!(
                u32::from_le_bytes(out[at + len - 4..at + len].try_into().unwrap()) as usize,
                len
            );
            types.push(ty);
            at += len;
        }
        assert_eq!(types, vec![SHB, IDB, EPB, EPB]);
    }
}
