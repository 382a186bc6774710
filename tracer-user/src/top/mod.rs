//! `ctdrop top`: one screen during an incident. It is the live session
//! with one more sink: [`TopSink`] keeps what the screen shows
//! ([`state::TopState`]), reads keys between events ([`Sink::poll`]) and
//! asks the session to stop on `q` ([`Sink::wants_stop`]); SIGINT, SIGTERM
//! and --duration end it through the session as for `live`.

pub mod state;
pub mod term;
pub mod view;

use std::{
    io::Write,
    sync::mpsc::Receiver,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use ratatui::{backend::CrosstermBackend, Terminal};

use crate::{
    cli::TopArgs,
    conntrack::{occupancy::Occupancy, stats::CtLimits},
    output::{human::HumanSink, ProbeShown, Progress, Shown, Sink},
    session::{self, SessionOptions},
    summary::Summary,
};
use state::TopState;
use term::Input;
use view::FlowLine;

/// At most 4 frames a second; between ticks nothing changes unless a key
/// is pressed, so an idle screen costs one frame a second.
const FRAME_GAP: Duration = Duration::from_millis(250);
/// Flows examined each second for the flows table (the filter picks from these).
const FLOWS_CONSIDERED: usize = 200;

pub async fn run(args: &TopArgs) -> Result<()> {
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(1) } != 1 {
        bail!("top draws on a terminal and stdout is not a terminal: use `ctdrop live` (or `live --json`) to pipe or redirect");
    }
    let opts = SessionOptions {
        trace: &args.trace,
        probe: &args.probe,
        duration: args.duration,
        capture_headers: false,
        service: false,
    };
    session::run(&opts, vec![Box::new(TopSink::default())]).await
}

#[derive(Default)]
pub struct TopSink {
    state: TopState,
    flows: Vec<FlowLine>,
    screen: Option<Screen>,
    dirty: bool,
    /// A key was pressed since the last frame: draw even when paused.
    answer_key: bool,
    last_draw: Option<Instant>,
}

struct Screen {
    term: Terminal<CrosstermBackend<std::io::Stdout>>,
    keys: Receiver<Input>,
    stderr: Receiver<String>,
}

impl TopSink {
    fn draw(&mut self) -> std::io::Result<()> {
        let Some(sc) = &mut self.screen else {
            return Ok(());
        };
        let (state, flows) = (&self.state, &self.flows);
        sc.term.draw(|f| view::draw(f, state, flows))?;
        self.last_draw = Some(Instant::now());
        self.dirty = false;
        self.answer_key = false;
        Ok(())
    }

    /// Gives the terminal back; the notes shown on screen go to stderr.
    fn leave(&mut self) {
        if self.screen.take().is_some() {
            term::restore();
            for m in &self.state.messages {
                eprintln!("{m}");
            }
        }
    }
}

impl Drop for TopSink {
    fn drop(&mut self) {
        self.leave();
    }
}

impl Sink for TopSink {
    fn start(&mut self, info: &session::SessionInfo) -> std::io::Result<()> {
        self.state.max = info.limits.map(|l| l.max);
        let (keys, stderr) = term::enter()?;
        let term = match Terminal::new(CrosstermBackend::new(std::io::stdout())) {
            Ok(t) => t,
            Err(e) => {
                term::restore();
                return Err(e);
            }
        };
        self.screen = Some(Screen { term, keys, stderr });
        self.draw()
    }

    fn drop_event(&mut self, s: &Shown) -> std::io::Result<()> {
        let port =
            s.ev.flow
                .as_ref()
                .and_then(|f| f.ports.map(|(_, dport)| (f.proto, dport)));
        self.state
            .drop_seen(s.ev.netns, s.netns_name, s.cause, port);
        Ok(())
    }

    fn probe(&mut self, p: &ProbeShown) -> std::io::Result<()> {
        self.state.probe(p.label, p.sent, p.lost, &p.outcome.status);
        self.dirty = true;
        Ok(())
    }

    fn occupancy(&mut self, o: &Occupancy) -> std::io::Result<()> {
        let top = o
            .top_dst_ports
            .first()
            .map(|p| format!(", most to {}/{} ({} entries)", p.proto, p.port, p.entries))
            .unwrap_or_default();
        self.state.note(format!(
            "table snapshot of {}: {} entries{top}",
            o.label(),
            o.entries
        ));
        self.dirty = true;
        Ok(())
    }

    fn tick(&mut self, p: &Progress) -> std::io::Result<()> {
        let s = &mut self.state;
        s.roll();
        // Test hook (tests/tests/see.rs): a bug while the screen is ours
        // must still give the terminal back and leave nothing attached.
        if s.seconds() >= 2
            && std::env::var_os("CTDROP_TEST_PANIC_IN_TOP").is_some_and(|v| v == "1")
        {
            panic!("deliberate panic in top (CTDROP_TEST_PANIC_IN_TOP=1)");
        }
        s.events_lost = p.stats.lost;
        s.events_sent = p.stats.sent;
        s.elapsed_s = p.elapsed.as_secs_f64();
        // nf_conntrack_max is global and may be changed during the incident.
        if let Some(l) = CtLimits::read() {
            s.max = Some(l.max);
        }
        for (ns, (name, c)) in p.counters {
            s.entries(*ns, name.as_deref(), c.entries());
        }
        if !s.paused {
            self.flows = p
                .tally
                .top_flows(FLOWS_CONSIDERED)
                .into_iter()
                .filter(|(id, _)| s.filter_shows(id.netns))
                .take(20)
                .map(|(id, st)| {
                    let (src, dst) = crate::report::text::flow_ends(id);
                    FlowLine {
                        drops: st.drops,
                        proto: id.proto,
                        src,
                        dst,
                        cause: st.main_cause(),
                        idle_s: p.mono_ns.saturating_sub(st.last_ns) as f64 / 1e9,
                    }
                })
                .collect();
        }
        self.dirty = true;
        Ok(())
    }

    fn wants_counters(&self) -> bool {
        true
    }

    fn poll(&mut self) -> std::io::Result<()> {
        let Some(sc) = &self.screen else {
            return Ok(());
        };
        while let Ok(i) = sc.keys.try_recv() {
            match i {
                Input::Key(k) => {
                    self.state.key(k);
                    self.answer_key = true;
                    self.dirty = true;
                }
                Input::Resize => self.dirty = true,
            }
        }
        while let Ok(line) = sc.stderr.try_recv() {
            self.state.note(line);
            self.dirty = true;
        }
        if self.state.quit {
            // Leave at once: the session may still wait for outstanding
            // probes, and the operator asked for the shell back.
            self.leave();
            return Ok(());
        }
        let due = self.last_draw.is_none_or(|t| t.elapsed() >= FRAME_GAP);
        // Paused: the screen stands still, except to answer a key.
        if self.dirty && (self.answer_key || !self.state.paused) && due {
            self.draw()?;
        }
        Ok(())
    }

    fn wants_stop(&self) -> bool {
        self.state.quit
    }

    fn summary(&mut self, s: &Summary) -> std::io::Result<()> {
        self.leave();
        let color = self.screen.is_none() && std::env::var_os("NO_COLOR").is_none();
        let mut human = HumanSink::new(std::io::stdout(), color);
        human.summary(s)?;
        human.flush()
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.screen.is_none() {
            std::io::stdout().flush()?;
        }
        Ok(())
    }
}
