//! Kernel addresses to `symbol+offset`, as pwru and retis print them.

use std::collections::HashMap;

pub struct Symbols {
    /// Sorted by address; empty when kallsyms hides addresses.
    table: Vec<(u64, String)>,
    cache: HashMap<u64, String>,
}

impl Symbols {
    pub fn load() -> Symbols {
        let mut table = Vec::new();
        if let Ok(text) = std::fs::read_to_string("/proc/kallsyms") {
            for line in text.lines() {
                let mut it = line.split_whitespace();
                let (Some(addr), Some(kind), Some(name)) = (it.next(), it.next(), it.next()) else {
                    continue;
                };
                if !matches!(kind, "t" | "T") {
                    continue;
                }
                if let Ok(a) = u64::from_str_radix(addr, 16) {
                    if a != 0 {
                        table.push((a, name.to_string()));
                    }
                }
            }
        }
        table.sort_unstable_by_key(|(a, _)| *a);
        Symbols {
            table,
            cache: HashMap::new(),
        }
    }

    pub fn empty() -> Symbols {
        Symbols {
            table: Vec::new(),
            cache: HashMap::new(),
        }
    }

    pub fn resolve(&mut self, addr: u64) -> &str {
        if !self.cache.contains_key(&addr) {
            let s = lookup(&self.table, addr);
            self.cache.insert(addr, s);
        }
        &self.cache[&addr]
    }
}

fn lookup(table: &[(u64, String)], addr: u64) -> String {
    let i = table.partition_point(|(a, _)| *a <= addr);
    if i == 0 {
        return format!("{addr:#x}");
    }
    let (base, name) = &table[i - 1];
    format!("{name}+{:#x}", addr - base)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbol_plus_offset() {
        let t = vec![
            (0x1000, "a".to_string()),
            (0x2000, "nf_hook_slow".to_string()),
        ];
        assert_eq!(lookup(&t, 0x209a), "nf_hook_slow+0x9a");
        assert_eq!(lookup(&t, 0x1000), "a+0x0");
        assert_eq!(lookup(&t, 0x10), "0x10");
    }
}
