//! Byte counts in human units for messages (plan's disk check, status, run's progress).
//!
//! Owns the one formatting of sizes so every command prints them alike. It must never parse
//! sizes from users: the spec takes plain byte counts, PostgreSQL's own settings are read
//! through `pg_size_bytes`.

/// `b` in binary units with one decimal ("1.5 MB"), plain bytes below 1 kB ("512 B").
pub fn human_bytes(b: i64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut u = 0;
    while v.abs() >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 kB");
        assert_eq!(human_bytes(64 << 20), "64.0 MB");
        assert_eq!(human_bytes(-2048), "-2.0 kB");
        assert_eq!(human_bytes(5 << 40), "5.0 TB");
        assert_eq!(human_bytes(i64::MAX), "8388608.0 TB");
    }
}
