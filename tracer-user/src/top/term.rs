//! The terminal while `top` runs: raw mode, the alternate screen, keys
//! read on their own thread, and ctdrop's own stderr lines caught so they
//! do not scribble over the screen. Restored on every way out: `q`,
//! Ctrl-C, SIGTERM (the session ends and the sink is finished or
//! dropped), an error (the sink is dropped), a panic (the hook restores
//! before the panic line is printed).

use std::{
    io::{BufRead, BufReader, Write},
    os::fd::{FromRawFd, RawFd},
    sync::{
        atomic::{AtomicBool, AtomicI32, Ordering},
        mpsc::{self, Receiver},
        Once,
    },
    time::Duration,
};

use ratatui::crossterm::{
    cursor,
    event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers},
    execute,
    terminal::{self, EnterAlternateScreen, LeaveAlternateScreen},
};

use super::state::Key;

/// Whether the screen is ours now (raw mode, alternate screen).
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// The real stderr while ours goes into a pipe; -1 when not redirected.
static SAVED_STDERR: AtomicI32 = AtomicI32::new(-1);
static PANIC_HOOK: Once = Once::new();

/// What the input thread hands over.
pub enum Input {
    Key(Key),
    /// The window changed size: draw again now.
    Resize,
}

/// Takes the screen, starts the key thread, and catches stderr. The
/// returned receivers deliver keys and stderr lines.
pub fn enter() -> std::io::Result<(Receiver<Input>, Receiver<String>)> {
    PANIC_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
    });
    terminal::enable_raw_mode()?;
    ACTIVE.store(true, Ordering::SeqCst);
    if let Err(e) = execute!(std::io::stdout(), EnterAlternateScreen, cursor::Hide) {
        restore();
        return Err(e);
    }
    let lines = catch_stderr();
    let (tx, keys) = mpsc::channel();
    std::thread::Builder::new()
        .name("top-keys".into())
        .spawn(move || loop {
            // poll with a timeout, so the thread stops reading once the screen
            // is given back (it must not eat what the operator types next).
            match event::poll(Duration::from_millis(200)) {
                Ok(true) => {}
                Ok(false) if ACTIVE.load(Ordering::SeqCst) => continue,
                Ok(false) => return,
                // A signal landed on this thread: not a reason to go deaf.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return gone(&tx),
            }
            let sent = match event::read() {
                Ok(Event::Key(k)) => match key(k) {
                    Some(k) => tx.send(Input::Key(k)),
                    None => Ok(()),
                },
                Ok(Event::Resize(..)) => tx.send(Input::Resize),
                Ok(_) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(()),
                Err(_) => return gone(&tx),
            };
            if sent.is_err() {
                return;
            }
        })?;
    Ok((keys, lines))
}

/// The terminal cannot be read any more (hung up, closed): nobody can press
/// `q`, and raw mode keeps Ctrl-C from becoming SIGINT, so quit.
fn gone(tx: &mpsc::Sender<Input>) {
    if ACTIVE.load(Ordering::SeqCst) {
        let _ = tx.send(Input::Key(Key::Quit));
    }
}

/// q, Esc and Ctrl-C quit (raw mode turns Ctrl-C into a key, not SIGINT).
fn key(k: KeyEvent) -> Option<Key> {
    if k.kind == KeyEventKind::Release {
        return None;
    }
    Some(match k.code {
        KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => Key::Quit,
        KeyCode::Char('q') | KeyCode::Esc => Key::Quit,
        KeyCode::Char('s') => Key::Sort,
        KeyCode::Char('n') | KeyCode::Tab => Key::NextNamespace,
        KeyCode::Char('a') => Key::AllNamespaces,
        KeyCode::Char('p') | KeyCode::Char(' ') => Key::Pause,
        _ => return None,
    })
}

/// Sends fd 2 into a pipe whose lines come out of the receiver; the real
/// stderr is kept to put back in [`restore`].
fn catch_stderr() -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return rx;
    }
    // SAFETY: dup of our own open fd 2; the copy is owned by SAVED_STDERR.
    let saved = unsafe { libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3) };
    // SAFETY: fds[1] is the pipe's write end we just made; dup2 onto 2
    // replaces stderr, whose original is kept in `saved`.
    if saved < 0 || unsafe { libc::dup2(fds[1], 2) } < 0 {
        // SAFETY: closing fds this function opened and owns.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
            if saved >= 0 {
                libc::close(saved);
            }
        }
        return rx;
    }
    // SAFETY: fd 2 now refers to the pipe; this copy is ours to close.
    unsafe { libc::close(fds[1]) };
    SAVED_STDERR.store(saved, Ordering::SeqCst);
    // SAFETY: fds[0] is the pipe's read end, owned by nothing else; the
    // File takes it over.
    let read = unsafe { std::fs::File::from_raw_fd(fds[0]) };
    let _ = std::thread::Builder::new()
        .name("top-stderr".into())
        .spawn(move || {
            for line in BufReader::new(read).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
    rx
}

/// Gives the terminal back as it was. Safe to call from any path, any
/// number of times.
pub fn restore() {
    if ACTIVE.swap(false, Ordering::SeqCst) {
        let _ = execute!(std::io::stdout(), LeaveAlternateScreen, cursor::Show);
        let _ = terminal::disable_raw_mode();
        let _ = std::io::stdout().flush();
    }
    let saved = SAVED_STDERR.swap(-1, Ordering::SeqCst);
    if saved >= 0 {
        // SAFETY: `saved` is the original stderr kept by catch_stderr;
        // dup2 puts it back on fd 2 (closing the pipe's write end, which
        // ends the reader thread), then the spare copy is closed.
        unsafe {
            libc::dup2(saved, 2);
            libc::close(saved);
        }
    }
}
