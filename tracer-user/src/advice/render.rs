//! Advice as an operator reads it: text at 80 columns, Markdown for a
//! ticket, JSON for tools.

use std::io::Write;

use super::{label, Advice, Step};

/// Word-wraps `text` to `width` columns after `indent`.
fn wrap(text: &str, indent: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut cur = String::from(indent);
    for w in text.split_whitespace() {
        if cur.len() > indent.len() && cur.len() + 1 + w.len() > width {
            lines.push(std::mem::replace(&mut cur, String::from(indent)));
        }
        if cur.len() > indent.len() {
            cur.push(' ');
        }
        cur.push_str(w);
    }
    if cur.len() > indent.len() {
        lines.push(cur);
    }
    lines
}

/// `    $ cmd`, continued with ` \` on lines of at most `width` columns
/// (still pastes into a shell as one command).
pub(super) fn wrap_command(cmd: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    // Words as the shell sees them: never break inside single quotes.
    let mut words: Vec<String> = Vec::new();
    let mut quoted = false;
    for w in cmd.split(' ') {
        match words.last_mut() {
            Some(last) if quoted => {
                last.push(' ');
                last.push_str(w);
            }
            _ => words.push(w.to_string()),
        }
        quoted ^= w.matches('\'').count() % 2 == 1;
    }
    let mut cur = String::from("    $");
    for w in &words {
        if cur.len() > 6 && cur.len() + 1 + w.len() + 2 > width {
            cur.push_str(" \\");
            lines.push(std::mem::replace(&mut cur, String::from("       ")));
        }
        cur.push(' ');
        cur.push_str(w);
    }
    lines.push(cur);
    lines
}

/// Human rendering, readable at 80 columns.
pub fn write_human(advice: &[Advice], out: &mut dyn Write) -> std::io::Result<()> {
    if advice.is_empty() {
        return Ok(());
    }
    writeln!(out, "advice (ctdrop changes nothing itself):")?;
    for a in advice {
        let head = format!(
            "[{}] {}: {}",
            a.topic,
            label(a.netns, &a.netns_name),
            a.headline
        );
        for (i, l) in wrap(&head, "  ", 80).into_iter().enumerate() {
            writeln!(out, "{}{}", if i == 0 { "" } else { "  " }, l)?;
        }
        for n in &a.notes {
            let lines = wrap(n, "      ", 80);
            for (i, l) in lines.into_iter().enumerate() {
                if i == 0 {
                    writeln!(out, "    - {}", l.trim_start())?;
                } else {
                    writeln!(out, "{l}")?;
                }
            }
        }
        let ns = label(a.netns, &a.netns_name);
        let mut said_ns = false;
        for s in &a.steps {
            match s {
                Step::Run { in_netns, .. } => {
                    if *in_netns && !said_ns && a.netns_name.is_some() {
                        writeln!(out, "    in {ns} (ip netns exec {ns} ...):")?;
                        said_ns = true;
                    }
                    for l in wrap_command(&s.command_line().unwrap_or_default(), 80) {
                        writeln!(out, "{l}")?;
                    }
                }
                Step::Persist { file, line } => {
                    writeln!(out, "    persist in {file}:")?;
                    writeln!(out, "      {line}")?;
                }
                Step::Nft { script } => {
                    writeln!(out, "    or with nft (nft -f FILE):")?;
                    for l in script.lines() {
                        writeln!(out, "      {l}")?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Markdown for a ticket: a paragraph per item, notes as bullets, commands
/// and file lines in fenced blocks.
pub fn write_markdown(advice: &[Advice], out: &mut dyn Write) -> std::io::Result<()> {
    for a in advice {
        writeln!(
            out,
            "**{}** in {}: {}\n",
            a.topic,
            label(a.netns, &a.netns_name),
            a.headline
        )?;
        for n in &a.notes {
            writeln!(out, "- {n}")?;
        }
        if !a.notes.is_empty() {
            writeln!(out)?;
        }
        let ns = label(a.netns, &a.netns_name);
        let runs: Vec<&Step> = a
            .steps
            .iter()
            .filter(|s| matches!(s, Step::Run { .. }))
            .collect();
        if !runs.is_empty() {
            if runs
                .iter()
                .any(|s| matches!(s, Step::Run { in_netns: true, .. }))
                && a.netns_name.is_some()
            {
                writeln!(out, "in {ns} (`ip netns exec {ns} ...`):\n")?;
            }
            writeln!(out, "```sh")?;
            for s in runs {
                writeln!(out, "{}", s.command_line().unwrap_or_default())?;
            }
            writeln!(out, "```\n")?;
        }
        for s in &a.steps {
            match s {
                Step::Persist { file, line } => {
                    writeln!(out, "persist in `{file}`:\n\n```\n{line}\n```\n")?
                }
                Step::Nft { script } => {
                    writeln!(out, "or with nft (`nft -f FILE`):\n\n```\n{}```\n", script)?
                }
                Step::Run { .. } => {}
            }
        }
    }
    Ok(())
}

pub fn to_json(advice: &[Advice]) -> serde_json::Value {
    serde_json::to_value(advice).unwrap_or_default()
}
