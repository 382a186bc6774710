//! `ctdrop demo`: the incident told in about a minute, with real kernel
//! events, in throwaway namespaces. Pings are fine; a UDP flood fills the
//! server's conntrack table and the pings go down, each explained; the
//! table's snapshot names the flood; ctdrop advises NOTRACK rules; the demo
//! applies them (in its own namespace only) and shows that the drops and
//! the ping loss went to zero.
pub mod fill;
pub mod sink;
pub mod stage;

use std::{
    io::Write,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

use crate::{
    advice::{self, Host, NsEvidence},
    cli::{DemoArgs, LiveArgs},
    conntrack::{occupancy, stats::CtCounters},
    session::{self, SessionOptions},
};
use sink::{DemoSink, Log};
use stage::{ns_path, Stage, CLIENTS, CLIENT_ADDR, SERVER, SERVER_ADDR, SERVICE_PORT};

const INTERVAL_MS: u64 = 500;
const BASELINE: Duration = Duration::from_secs(6);
const FULL: Duration = Duration::from_secs(12);
const RECOVERY: Duration = Duration::from_secs(12);
/// New flows a second once the table is full.
const FLOOD_RATE: u32 = 200;
/// When lowering is the only affordable way: the limit the demo uses.
const FALLBACK_MAX: u64 = 4096;
/// Share of MemAvailable a fill may take in kernel memory.
const FILL_MEM_SHARE: u64 = 4;

fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The server's conntrack counters, read inside its namespace.
fn server_counters() -> Result<CtCounters> {
    ctlab::in_netns(&ns_path(SERVER), || {
        let s = std::fs::read_to_string("/proc/thread-self/net/stat/nf_conntrack")
            .context("reading conntrack stats")?;
        CtCounters::parse(&s)
    })
}

/// Sleeps `d` in short steps; false when asked to stop meanwhile.
fn pause(d: Duration, stop: &AtomicBool) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(
            Duration::from_millis(50).min(end.saturating_duration_since(Instant::now())),
        );
    }
    !stop.load(Ordering::Relaxed)
}

/// Phase boundaries (unix ns) and kernel counters at each.
#[derive(Default)]
struct Timeline {
    flood_on: u64,
    fix_start: u64,
    fix_done: u64,
    end: u64,
    drop_at_flood: u64,
    drop_at_fix_start: u64,
    drop_at_fix_done: u64,
    drop_at_end: u64,
}

pub async fn run(args: &DemoArgs) -> Result<()> {
    crate::kernel::capabilities::require_root()?;
    if !crate::kernel::capabilities::conntrack_loaded() {
        bail!("demo: nf_conntrack is not loaded on this host");
    }
    let stop = Arc::new(AtomicBool::new(false));
    // From here on Ctrl-C and SIGTERM only ask to stop: every path below
    // goes through the stage's cleanup.
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("installing SIGINT handler")?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing SIGTERM handler")?;
    let s = stop.clone();
    let listener = tokio::spawn(async move {
        tokio::select! { _ = sigint.recv() => {}, _ = sigterm.recv() => {} }
        s.store(true, Ordering::Relaxed);
    });
    let r = tell(args, stop.clone()).await;
    listener.abort();
    r
}

async fn tell(args: &DemoArgs, stop: Arc<AtomicBool>) -> Result<()> {
    let mut out = std::io::stdout();
    for ns in stage::remove_leftovers()? {
        writeln!(out, "removed {ns}, left over by an earlier demo")?;
    }
    let current = ctlab::read_max()?;
    let lower_to = match args.max {
        Some(v) => {
            stage::check_max(v, current)?;
            Some(v)
        }
        None => {
            let cost = current * fill::entry_bytes();
            match fill::mem_available() {
                Some(avail) if cost > avail / FILL_MEM_SHARE || current > fill::max_flows() => {
                    writeln!(out, "filling a {current}-entry table would take {} MiB of kernel memory ({} MiB available):", cost >> 20, avail >> 20)?;
                    writeln!(out, "  lowering nf_conntrack_max to {FALLBACK_MAX} instead, if no other namespace holds entries")?;
                    Some(FALLBACK_MAX)
                }
                _ => None,
            }
        }
    };
    writeln!(
        out,
        "ctdrop demo: the incident, in throwaway namespaces (about 40 s)"
    )?;
    writeln!(
        out,
        "  {CLIENTS} ({CLIENT_ADDR}) pings {SERVER} ({SERVER_ADDR}) twice a second,"
    )?;
    writeln!(
        out,
        "  each ping a new flow; {SERVER} tracks connections (a state rule)."
    )?;
    let st = stop.clone();
    let stage = tokio::task::spawn_blocking(move || Stage::build(lower_to, &st))
        .await
        .map_err(|_| anyhow!("demo set-up panicked"))??;
    match lower_to {
        Some(v) => writeln!(
            out,
            "  nf_conntrack_max is lowered to {v} for the demo (was {}; put back at the end).",
            stage.previous_max
        )?,
        None => {
            writeln!(
                out,
                "  Each namespace's entries count against the one nf_conntrack_max ({}),",
                stage.limit
            )?;
            writeln!(
                out,
                "  so the demo fills {SERVER}'s own table and changes no sysctl."
            )?;
        }
    }
    let server_netns = crate::conntrack::netns::resolve_netns_arg(SERVER)?;
    if stop.load(Ordering::Relaxed) {
        bail!("demo interrupted");
    }

    // The fill's time grows with the limit (~15 us a flow measured, twice
    // that allowed for a loaded machine); the story ends the session when
    // it is done, these only bound it.
    let total = BASELINE
        + FULL
        + RECOVERY
        + Duration::from_secs_f64(stage.limit as f64 * 30e-6)
        + Duration::from_secs(20);
    let pings = total.as_millis() as u64 / INTERVAL_MS;
    let live = LiveArgs::from_args(&[
        "--netns",
        SERVER,
        "--ping",
        &SERVER_ADDR.to_string(),
        "--from-netns",
        CLIENTS,
        "--interval",
        &format!("{INTERVAL_MS}ms"),
        "--timeout",
        "1s",
        "--count",
        &pings.to_string(),
    ])?;
    let log = Arc::new(Mutex::new(Log::default()));
    let (attached_tx, attached_rx) = mpsc::channel();
    let sinks: Vec<Box<dyn crate::output::Sink>> = vec![Box::new(DemoSink::new(
        log.clone(),
        server_netns,
        attached_tx,
    ))];

    // The story's clock runs on its own thread; the tracer runs here.
    let story_log = log.clone();
    let story_stop = stop.clone();
    let story = std::thread::Builder::new()
        .name("ctdemo-story".into())
        .spawn(move || {
            let told = story(stage, attached_rx, &story_log, &story_stop);
            // The story is told (or cannot go on): end the tracing session,
            // as Ctrl-C would.
            // SAFETY: raise(3) sends a signal to this process; the session
            // and the demo listen for SIGINT.
            unsafe { libc::raise(libc::SIGINT) };
            told
        })
        .context("starting the demo")?;

    let opts = SessionOptions {
        trace: &live.trace,
        probe: &live.probe,
        duration: Some(total + Duration::from_secs(10)),
        capture_headers: false,
        service: false,
    };
    let traced = session::run(&opts, sinks).await;
    // However the session ended, the story ends too.
    stop.store(true, Ordering::Relaxed);
    let told = story.join().map_err(|_| anyhow!("demo story panicked"));
    // The stage (namespaces, flood, sysctl) goes away here, before any
    // error is reported.
    let (stage, t) = match told {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return Err(e.context("demo")),
        Err(e) => return Err(e),
    };
    let delivered = stage.service_received.load(Ordering::Relaxed);
    let sent = stage.flood_sent.load(Ordering::Relaxed);
    let lowered = stage.lowered;
    drop(stage);
    traced.context("demo: tracing")?;
    if t.end == 0 {
        bail!(
            "demo interrupted; namespaces removed{}",
            if lowered {
                " and nf_conntrack_max restored"
            } else {
                ""
            }
        );
    }
    let log = log.lock().unwrap();
    compare(&log, &t, sent, delivered, lowered)
}

/// The story's clock: phases, the flood, the fix, and the kernel's drop
/// counter at each boundary. Gives the stage back for cleanup.
fn story(
    mut stage: Stage,
    attached: mpsc::Receiver<()>,
    log: &Mutex<Log>,
    stop: &AtomicBool,
) -> Result<(Stage, Timeline)> {
    let mut t = Timeline::default();
    // Wait for the tracer to attach (or the session to fail).
    if attached.recv().is_err() {
        return Ok((stage, t));
    }
    banner("1/5", "baseline: pings to a healthy server");
    if !pause(BASELINE, stop) {
        return Ok((stage, t));
    }
    t.drop_at_flood = server_counters()?.get("drop");
    t.flood_on = wall_ns();
    banner(
        "2/5",
        &format!(
            "{} clients open two-way UDP streams to port {SERVICE_PORT}; more keep coming",
            stage.limit
        ),
    );
    let (filled, entries) = stage.fill(stop)?;
    println!(
        "  {SERVER}'s table: {entries}/{} entries in {:.1} s, ~{} MiB kernel memory",
        stage.limit,
        filled.elapsed.as_secs_f64(),
        (entries * fill::entry_bytes()) >> 20
    );
    stage.start_flood(FLOOD_RATE)?;
    if !pause(FULL, stop) {
        return Ok((stage, t));
    }
    // The flood pauses while the windows change hands, so that ctdrop's
    // count (by timestamp) and the kernel's (by counter reads) cover the
    // same drops.
    stage.stop_flood();
    std::thread::sleep(Duration::from_millis(200));
    t.drop_at_fix_start = server_counters()?.get("drop");
    t.fix_start = wall_ns();
    explain_and_fix(log)?;
    stage.start_flood(FLOOD_RATE)?;
    t.drop_at_fix_done = server_counters()?.get("drop");
    t.fix_done = wall_ns();
    banner("5/5", "the flood goes on, untracked: do the pings recover?");
    let _ = pause(RECOVERY, stop);
    t.drop_at_end = server_counters()?.get("drop");
    t.end = wall_ns();
    stage.stop_flood();
    Ok((stage, t))
}

fn banner(step: &str, text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out);
    let _ = writeln!(out, "[{step}] {text}");
}

/// Snapshot, advice, and the NOTRACK rules applied. Holds stdout so the
/// ping lines wait until the explanation is printed.
fn explain_and_fix(log: &Mutex<Log>) -> Result<()> {
    let snap = occupancy::snapshot(
        &ns_path(SERVER),
        crate::conntrack::netns::resolve_netns_arg(SERVER).ok(),
        Some(SERVER.to_string()),
    )?;
    let (drops, flows, unreported) = {
        let mut l = log.lock().unwrap();
        (
            l.table_full_ns.len() as u64,
            l.flows_turned_away.len() as u64,
            l.flood.take_lines(),
        )
    };
    let limits = crate::conntrack::stats::CtLimits::read();
    let ev = NsEvidence {
        netns: snap.netns,
        netns_name: snap.netns_name.clone(),
        table_full_drops: drops,
        table_full_flows: flows,
        peak_entries: limits
            .map(|l| l.max)
            .unwrap_or(snap.entries)
            .max(snap.entries),
        occupancy: Some(&snap),
        limits,
        ..Default::default()
    };
    let adv = advice::for_namespace(&ev, &Host::detect());
    let mut out = std::io::stdout().lock();
    for l in unreported {
        writeln!(out, "{}", sink::fold_line(&l))?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "[3/5] who fills the table? a snapshot of {SERVER}'s conntrack table:"
    )?;
    snap.write_human(&mut out)?;
    writeln!(out)?;
    writeln!(out, "[4/5] what to change:")?;
    advice::write_human(&adv, &mut out)?;
    let notrack = adv
        .iter()
        .find(|a| a.topic == "notrack")
        .ok_or_else(|| anyhow!("no NOTRACK advice for the flood: the snapshot did not show it"))?;
    writeln!(out)?;
    writeln!(
        out,
        "the demo applies the NOTRACK advice in {SERVER} (its own namespace):"
    )?;
    for step in &notrack.steps {
        let advice::Step::Run {
            argv,
            in_netns: true,
        } = step
        else {
            continue;
        };
        let args: Vec<&str> = argv.iter().map(String::as_str).collect();
        let line = step.command_line().unwrap_or_default();
        match stage::in_ns(SERVER, &args) {
            Ok(_) => writeln!(out, "  $ {line}")?,
            // conntrack -D fails when nothing matched: nothing to remove.
            Err(_) if argv[0] == "conntrack" => writeln!(out, "  $ {line}  (nothing to remove)")?,
            Err(e) => return Err(e.context("applying the advice")),
        }
    }
    Ok(())
}

/// Before/after: the full-table window against the window after the fix.
fn compare(log: &Log, t: &Timeline, flood_sent: u64, delivered: u64, lowered: bool) -> Result<()> {
    let in_win = |ns: u64, a: u64, b: u64| ns >= a && ns < b;
    let pings = |a, b| {
        log.pings
            .iter()
            .filter(|p| in_win(p.sent_ns, a, b))
            .collect::<Vec<_>>()
    };
    let (before, after) = (pings(t.flood_on, t.fix_start), pings(t.fix_done, t.end));
    let lost = |v: &[&sink::PingRecord]| v.iter().filter(|p| p.lost).count();
    let explained = |v: &[&sink::PingRecord]| v.iter().filter(|p| p.explained).count();
    let drops = |a, b| {
        log.table_full_ns
            .iter()
            .filter(|n| in_win(**n, a, b))
            .count()
    };
    let (d_before, d_after) = (drops(t.flood_on, t.fix_start), drops(t.fix_done, t.end));
    let (k_before, k_after) = (
        t.drop_at_fix_start - t.drop_at_flood,
        t.drop_at_end - t.drop_at_fix_done,
    );
    let mut out = std::io::stdout().lock();
    writeln!(out)?;
    writeln!(
        out,
        "before/after ({:.0} s with the table full, {:.0} s after the fix):",
        secs(t.fix_start - t.flood_on),
        secs(t.end - t.fix_done)
    )?;
    writeln!(out, "  {:<36} {:>12} {:>12}", "", "table full", "NOTRACK")?;
    writeln!(
        out,
        "  {:<36} {:>12} {:>12}",
        "pings sent",
        before.len(),
        after.len()
    )?;
    writeln!(
        out,
        "  {:<36} {:>12} {:>12}",
        "pings lost",
        lost(&before),
        lost(&after)
    )?;
    writeln!(
        out,
        "  {:<36} {:>12} {:>12}",
        "  of those explained by ctdrop",
        explained(&before),
        explained(&after)
    )?;
    writeln!(
        out,
        "  {:<36} {:>12} {:>12}",
        "conntrack_table_full drops (ctdrop)", d_before, d_after
    )?;
    writeln!(
        out,
        "  {:<36} {:>12} {:>12}",
        format!("kernel drop counter ({SERVER})"),
        k_before,
        k_after
    )?;
    writeln!(
        out,
        "  flood: {flood_sent} packets sent, {delivered} reached the service"
    )?;
    if d_before == 0 || lost(&before) == 0 {
        bail!("demo: the table never turned the pings away ({d_before} drops, {} pings lost): nothing to fix", lost(&before));
    }
    if d_after > 0 || k_after > 0 || lost(&after) > 0 {
        writeln!(out, "the fix did not stop the drops")?;
        bail!("demo: drops went on after the NOTRACK rules ({d_after} seen, kernel counted {k_after}, {} pings lost)", lost(&after));
    }
    writeln!(
        out,
        "the fix worked: drops went from {d_before} to 0, lost pings from {} to 0.",
        lost(&before)
    )?;
    writeln!(
        out,
        "cleaned up: namespaces removed{}.",
        if lowered {
            ", nf_conntrack_max restored"
        } else {
            "; no sysctl was changed"
        }
    )?;
    Ok(())
}

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}
