//! Proxy ARP: requests from tasks are answered by the dataplane from
//! cluster state, as Swarm's overlay does; nothing is flooded.

use super::arp_lookup;
use crate::packet::{DropReason, Frame, Verdict};
use crate::tables::{NetId, PortId, Tables};
use crate::wire::MacAddr;
use crate::wire::arp::{self, ArpRepr, Operation};
use crate::wire::ethernet::{self, ethertype};

/// Answers an ARP request from the endpoint `src` on `in_port`, in place.
///
/// Requests are answered whether broadcast or unicast (Linux re-validates
/// neighbours with unicast requests). Replies, gratuitous ARP and requests
/// whose sender address is not the endpoint's own are dropped.
pub(crate) fn proxy(frame: &mut Frame<'_>, in_port: PortId, net: NetId, src: MacAddr, t: &Tables) -> Verdict {
    use DropReason as D;
    let Ok(req) = ArpRepr::parse(&frame.data()[ethernet::HEADER_LEN..]) else {
        return Verdict::Drop(D::ArpMalformed);
    };
    if req.operation != Operation::Request {
        return Verdict::Drop(D::ArpNotRequest);
    }
    if req.target_ip == req.sender_ip {
        return Verdict::Drop(D::ArpGratuitous);
    }
    // An RFC 5227 probe has sender 0.0.0.0; anything else must be the
    // endpoint's own address and MAC.
    let probe = req.sender_ip.is_unspecified();
    if req.sender_mac != src || (!probe && arp_lookup(t, net, req.sender_ip) != Some(src)) {
        return Verdict::Drop(D::ArpSenderSpoofed);
    }
    let Some(mac) = arp_lookup(t, net, req.target_ip) else {
        return Verdict::Drop(D::ArpUnknownTarget);
    };
    if mac == src {
        // An RFC 5227 probe for the sender's own address: answering would
        // tell it the address is taken.
        return Verdict::Drop(D::ArpGratuitous);
    }
    let reply = req.reply_from(mac);
    let len = ethernet::HEADER_LEN + arp::PACKET_LEN;
    let start = frame.start();
    frame.set_window(start, len);
    let d = frame.data_mut();
    // The frame held a whole request, so it has room for the reply.
    if ethernet::emit_header(d, src, mac, ethertype::ARP).is_err()
        || reply.emit(&mut d[ethernet::HEADER_LEN..]).is_err()
    {
        return Verdict::Drop(D::Malformed);
    }
    Verdict::Tx(in_port)
}

/// An ARP request on the uplink for this node's data-path address, or for
/// its egress address (`Tables.egress`, when it is another one): the reply
/// from the data-path MAC, in place, back out of the uplink (when the
/// dataplane owns the uplink outright, as with a TAP uplink; with AF_XDP
/// the steering program leaves ARP to the kernel). `None` for any other
/// frame.
pub(crate) fn uplink(frame: &mut Frame<'_>, t: &Tables) -> Option<Verdict> {
    let d = frame.data();
    if d.get(12..14)? != [0x08, 0x06] {
        return None;
    }
    let req = ArpRepr::parse(d.get(ethernet::HEADER_LEN..)?).ok()?;
    let ours = t.is_mesh_addr(req.target_ip) || t.egress.as_ref().is_some_and(|e| e.addr == req.target_ip);
    if req.operation != Operation::Request || !ours || req.sender_ip == req.target_ip {
        return None;
    }
    let reply = req.reply_from(t.data_mac);
    let start = frame.start();
    frame.set_window(start, ethernet::HEADER_LEN + arp::PACKET_LEN);
    let d = frame.data_mut();
    ethernet::emit_header(d, req.sender_mac, t.data_mac, ethertype::ARP).ok()?;
    reply.emit(&mut d[ethernet::HEADER_LEN..]).ok()?;
    Some(Verdict::Tx(crate::tables::UPLINK))
}

/// An ARP request for `ip` on a link of its own (the host link): the
/// reply from `mac`, in place, back out of `out`; another ARP frame is
/// dropped (`arp_unknown_target`). `None` for a frame that is not ARP.
pub(crate) fn answer(frame: &mut Frame<'_>, ip: core::net::Ipv4Addr, mac: MacAddr, out: PortId) -> Option<Verdict> {
    let d = frame.data();
    if d.get(12..14)? != [0x08, 0x06] {
        return None;
    }
    let Some(req) = d.get(ethernet::HEADER_LEN..).and_then(|a| ArpRepr::parse(a).ok()) else {
        return Some(Verdict::Drop(DropReason::ArpMalformed));
    };
    if req.operation != Operation::Request || req.target_ip != ip || req.sender_ip == req.target_ip {
        return Some(Verdict::Drop(DropReason::ArpUnknownTarget));
    }
    let reply = req.reply_from(mac);
    let start = frame.start();
    frame.set_window(start, ethernet::HEADER_LEN + arp::PACKET_LEN);
    let d = frame.data_mut();
    ethernet::emit_header(d, req.sender_mac, mac, ethertype::ARP).ok()?;
    reply.emit(&mut d[ethernet::HEADER_LEN..]).ok()?;
    Some(Verdict::Tx(out))
}

/// A broadcast ARP request that came over VXLAN from the endpoint `src`
/// behind a known VTEP (the frame is the inner frame): rewritten in place
/// into the reply from cluster state, to be encapsulated back. The request
/// must say what state says of its sender; the target must be in state.
pub(crate) fn overlay(frame: &mut Frame<'_>, net: NetId, src: MacAddr, t: &Tables) -> Result<(), DropReason> {
    use DropReason as D;
    let req = ArpRepr::parse(frame.data().get(ethernet::HEADER_LEN..).ok_or(D::InnerMalformed)?)
        .map_err(|_| D::InnerArpSpoofed)?;
    if req.operation != Operation::Request || req.sender_mac != src || arp_lookup(t, net, req.sender_ip) != Some(src) {
        return Err(D::InnerArpSpoofed);
    }
    let mac = arp_lookup(t, net, req.target_ip).ok_or(D::ArpUnknownTarget)?;
    if mac == src {
        return Err(D::ArpGratuitous);
    }
    let reply = req.reply_from(mac);
    let start = frame.start();
    frame.set_window(start, ethernet::HEADER_LEN + arp::PACKET_LEN);
    let d = frame.data_mut();
    ethernet::emit_header(d, src, mac, ethertype::ARP).map_err(|_| D::InnerMalformed)?;
    reply.emit(&mut d[ethernet::HEADER_LEN..]).map_err(|_| D::InnerMalformed)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tables::TablesSpec;

    fn tables(egress: &str) -> Tables {
        let spec: TablesSpec =
            toml::from_str(&format!("[node]\ndata_ip = \"198.18.0.1\"\ndata_mac = \"02:00:00:00:00:aa\"\n{egress}"))
                .expect("spec");
        Tables::compile(&spec).expect("tables")
    }

    /// A broadcast request from 198.18.0.9 for `target`.
    fn request(target: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[2, 0, 0, 0, 0, 9, 0x08, 0x06]);
        f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 9, 198, 18, 0, 9]);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&target);
        f
    }

    /// The reply `uplink` made for `target`, if any: (Ethernet destination,
    /// sender MAC, sender IP).
    fn answer(t: &Tables, target: [u8; 4]) -> Option<([u8; 6], [u8; 6], [u8; 4])> {
        let mut buf = request(target);
        let len = buf.len();
        let mut f = Frame::new(&mut buf, 0, len).expect("frame");
        let v = uplink(&mut f, t)?;
        assert_eq!(v, Verdict::Tx(crate::tables::UPLINK));
        let d = f.data();
        assert_eq!(&d[20..22], &[0, 2], "a reply");
        let six = |r: core::ops::Range<usize>| <[u8; 6]>::try_from(&d[r]).expect("6 bytes");
        Some((six(0..6), six(22..28), <[u8; 4]>::try_from(&d[28..32]).expect("4 bytes")))
    }

    #[test]
    fn the_egress_address_is_answered_like_the_data_address() {
        let aa = [2, 0, 0, 0, 0, 0xaa];
        let nine = [2, 0, 0, 0, 0, 9];
        let t = tables("[node.egress]\naddr = \"198.18.0.7\"\n");
        assert_eq!(answer(&t, [198, 18, 0, 1]), Some((nine, aa, [198, 18, 0, 1])));
        assert_eq!(answer(&t, [198, 18, 0, 7]), Some((nine, aa, [198, 18, 0, 7])));
        assert_eq!(answer(&t, [198, 18, 0, 8]), None);
        // Without egress the egress address is nobody's.
        let t = tables("");
        assert_eq!(answer(&t, [198, 18, 0, 7]), None);
        assert_eq!(answer(&t, [198, 18, 0, 1]), Some((nine, aa, [198, 18, 0, 1])));
    }
}
