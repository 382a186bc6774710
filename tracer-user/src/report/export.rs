//! `ctdrop export FILE --pcap OUT`: the captured packet headers as pcap-ng,
//! each packet commented with why, where and at what table fill it died.

use std::{fmt::Write as _, fs::OpenOptions, io::BufWriter, os::unix::fs::OpenOptionsExt};

use anyhow::{bail, Context, Result};

use crate::{
    capture::{CaptureReader, Item},
    cli::ExportArgs,
    kernel::btf::DropReasons,
    output::pcapng::PcapngWriter,
};

pub fn run(args: &ExportArgs) -> Result<()> {
    let mut reader = CaptureReader::open(&args.file)?;
    if !reader.header.headers {
        bail!(
            "{} has no packet bytes (it was captured without --headers): capture again with `ctdrop capture --headers`",
            args.file.display()
        );
    }
    let reasons = DropReasons::from_pairs(
        reader
            .header
            .drop_reasons
            .iter()
            .map(|(v, n)| (n.clone(), *v)),
    );
    let boot = reader.header.boot_offset_ns;
    // Packet bytes are as private as the capture itself.
    let mut opts = OpenOptions::new();
    opts.write(true).mode(0o600);
    if args.force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let file = opts.open(&args.pcap).with_context(|| {
        if args.pcap.exists() && !args.force {
            format!(
                "{} already exists: choose another name, or add --force to replace it",
                args.pcap.display()
            )
        } else {
            format!("creating {}", args.pcap.display())
        }
    })?;
    let mut w = PcapngWriter::new(BufWriter::with_capacity(1 << 16, file))
        .context("writing the pcap-ng header")?;
    let mut without = 0u64;
    let mut comment = String::new();
    while let Some(item) = reader.next_item() {
        let Item::Drop(d) = item else { continue };
        let Some(h) = &d.ev.header else {
            without += 1;
            continue;
        };
        let ns = d
            .netns_name
            .map(|i| reader.string(i).to_string())
            .or(d.ev.netns.map(|n| n.to_string()))
            .unwrap_or_else(|| "?".into());
        let ifname = d
            .ifname
            .map(|i| reader.string(i).to_string())
            .or(d.ev.ifindex.map(|i| format!("#{i}")))
            .unwrap_or_else(|| "-".into());
        comment.clear();
        let _ = write!(comment, "{} netns {ns}", d.cause);
        if let Some(inum) = d.ev.netns {
            let _ = write!(comment, " ({inum})");
        }
        let _ = write!(
            comment,
            " if {ifname} reason {} at {}",
            reasons.name(d.ev.reason),
            reader.string(d.location)
        );
        if let Some(f) = d.ev.ct_fill {
            let _ = write!(comment, " table {}/{}", f.count, f.max);
        }
        w.packet(
            &format!("{ns}/{ifname}"),
            d.ev.ts_ns + boot,
            h,
            d.ev.skb_len,
            &comment,
        )
        .with_context(|| format!("writing {}", args.pcap.display()))?;
    }
    let packets = w.packets;
    w.finish()
        .with_context(|| format!("writing {}", args.pcap.display()))?;
    if let Some(d) = reader.end().and_then(|e| e.describe()) {
        log::warn!("{}: {d}", args.file.display());
    }
    eprintln!(
        "ctdrop: wrote {}: {packets} packets{}",
        args.pcap.display(),
        if without > 0 {
            format!(" ({without} drops had no header bytes and were skipped)")
        } else {
            String::new()
        }
    );
    Ok(())
}
