//! Two namespaces joined by a veth pair: the scene every test, the bench
//! and the demo start from.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{anyhow, Result};

use crate::ns::{next_id, run, Netns};

/// The two ends of a veth pair, each created directly in its namespace
/// (never in the initial one, so names cannot collide); they go away with
/// the namespaces.
pub struct VethPair {
    pub sender_if: String,
    pub receiver_if: String,
}

impl VethPair {
    /// `ctdt-tx` in `sender`, `ctdt-rx` in `receiver`.
    pub fn create(sender: &Netns, receiver: &Netns) -> Result<VethPair> {
        VethPair::create_named(sender, "ctdt-tx", receiver, "ctdt-rx")
    }

    pub fn create_named(
        sender: &Netns,
        sender_if: &str,
        receiver: &Netns,
        receiver_if: &str,
    ) -> Result<VethPair> {
        run(&[
            "ip",
            "link",
            "add",
            sender_if,
            "netns",
            &sender.name,
            "type",
            "veth",
            "peer",
            "name",
            receiver_if,
            "netns",
            &receiver.name,
        ])?;
        Ok(VethPair {
            sender_if: sender_if.to_string(),
            receiver_if: receiver_if.to_string(),
        })
    }
}

/// Names and addresses of a [`Topology`] with fixed names (the bench's,
/// the demo's); both ends on one /24.
pub struct PairSpec<'a> {
    pub sender: &'a str,
    pub receiver: &'a str,
    pub sender_if: &'a str,
    pub receiver_if: &'a str,
    pub sender_addr: Ipv4Addr,
    pub receiver_addr: Ipv4Addr,
}

/// Sender and receiver namespaces on one /24 of 198.18.0.0/15.
pub struct Topology {
    pub veth: VethPair,
    pub sender_addr: Ipv4Addr,
    pub receiver_addr: Ipv4Addr,
    // Declared last: dropped after everything that refers to them.
    pub sender: Netns,
    pub receiver: Netns,
}

impl Topology {
    /// `sender` 198.18.<n>.1/24 -- veth -- `receiver` 198.18.<n>.2/24, both
    /// up, namespaces `ctdt-<pid>-<n>`.
    pub fn pair() -> Result<Topology> {
        Topology::pair_with_prefix("ctdt")
    }

    /// [`Topology::pair`] with namespaces named `<prefix>-<pid>-<n>`.
    pub fn pair_with_prefix(prefix: &str) -> Result<Topology> {
        let sender = Netns::with_prefix(prefix)?;
        let receiver = Netns::with_prefix(prefix)?;
        let veth = VethPair::create(&sender, &receiver)?;
        let n = (next_id() % 256) as u8;
        Topology::address(
            sender,
            receiver,
            veth,
            Ipv4Addr::new(198, 18, n, 1),
            Ipv4Addr::new(198, 18, n, 2),
        )
    }

    /// A pair with exactly the names and addresses of `spec`.
    pub fn build(spec: &PairSpec) -> Result<Topology> {
        let sender = Netns::create(spec.sender)?;
        let receiver = Netns::create(spec.receiver)?;
        let veth = VethPair::create_named(&sender, spec.sender_if, &receiver, spec.receiver_if)?;
        Topology::address(sender, receiver, veth, spec.sender_addr, spec.receiver_addr)
    }

    fn address(
        sender: Netns,
        receiver: Netns,
        veth: VethPair,
        sender_addr: Ipv4Addr,
        receiver_addr: Ipv4Addr,
    ) -> Result<Topology> {
        for (ns, dev, addr) in [
            (&sender, &veth.sender_if, sender_addr),
            (&receiver, &veth.receiver_if, receiver_addr),
        ] {
            ns.exec(&["ip", "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ns.exec(&["ip", "link", "set", dev, "up"])?;
        }
        Ok(Topology {
            veth,
            sender_addr,
            receiver_addr,
            sender,
            receiver,
        })
    }

    /// `iptables -A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT`
    /// in the receiver: any conntrack match is what turns conntrack on
    /// there; only new flows then need an entry, and a full table drops them.
    pub fn track_receiver(&self) -> Result<()> {
        self.receiver
            .accept_ct("iptables", "INPUT", "ESTABLISHED,RELATED")
    }

    /// Turns IPv6 on for the veth ends only (loopback and the rest stay
    /// off), without router solicitations, and adds `sender`/`receiver`
    /// as /64 addresses without DAD, so they are usable at once.
    pub fn add_ipv6(&self, sender: Ipv6Addr, receiver: Ipv6Addr) -> Result<()> {
        for (ns, dev, a) in [
            (&self.sender, &self.veth.sender_if, sender),
            (&self.receiver, &self.veth.receiver_if, receiver),
        ] {
            ns.exec(&[
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{dev}.router_solicitations=0"),
                &format!("net.ipv6.conf.{dev}.disable_ipv6=0"),
            ])?;
            ns.exec(&[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{a}/64"),
                "dev",
                dev,
                "nodad",
            ])?;
        }
        Ok(())
    }

    /// A permanent neighbour entry for the receiver in the sender: no ARP
    /// exchange in the middle of a flood.
    pub fn pin_receiver_neighbour(&self) -> Result<()> {
        let mac = self.receiver.exec(&[
            "cat",
            &format!("/sys/class/net/{}/address", self.veth.receiver_if),
        ])?;
        let mac = mac.trim();
        if mac.is_empty() {
            return Err(anyhow!(
                "no MAC address for {} in {}",
                self.veth.receiver_if,
                self.receiver.name
            ));
        }
        self.sender.exec(&[
            "ip",
            "neigh",
            "replace",
            &self.receiver_addr.to_string(),
            "lladdr",
            mac,
            "dev",
            &self.veth.sender_if,
            "nud",
            "permanent",
        ])?;
        Ok(())
    }
}
