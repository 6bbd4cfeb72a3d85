//! Facts about this host that go into the node table: processor model and flags, memory.

/// Processor model name and sorted feature flags, from `/proc/cpuinfo`.
pub fn cpu() -> (String, Vec<String>) {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    parse_cpuinfo(&text)
}

/// Parses the first processor's `model name` and `flags` lines.
pub fn parse_cpuinfo(text: &str) -> (String, Vec<String>) {
    let field = |name: &str| {
        text.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let model = field("model name").unwrap_or_else(|| "unknown".into());
    let mut flags: Vec<String> = field("flags")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect();
    flags.sort();
    flags.dedup();
    (model, flags)
}

/// Physical memory in bytes, from `/proc/meminfo`.
pub fn memory_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    parse_meminfo_total(&text)
}

/// Parses `MemTotal:  N kB`.
pub fn parse_meminfo_total(text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_cpuinfo_first_processor() {
        let text = "processor\t: 0\nmodel name\t: Test CPU @ 2GHz\nflags\t\t: sse2 avx sse2 aes\n\nprocessor\t: 1\nmodel name\t: Other\n";
        let (model, flags) = parse_cpuinfo(text);
        assert_eq!(model, "Test CPU @ 2GHz");
        assert_eq!(flags, vec!["aes", "avx", "sse2"]);
        assert_eq!(parse_cpuinfo("").0, "unknown");
    }

    #[test]
    fn test_parse_meminfo() {
        assert_eq!(
            parse_meminfo_total("MemTotal:       2048 kB\nMemFree: 1 kB\n"),
            2048 * 1024
        );
        assert_eq!(parse_meminfo_total("garbage"), 0);
    }
}
