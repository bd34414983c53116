//! Units as people read them: [`human_bytes`] (the one bytes formatter every crate uses;
//! `kiln_proto` re-exports it).

/// Bytes as people read them: `2.01 GiB` from 1 GiB up, `512.0 MiB`, `4.0 KiB`, `12 B`. Every
/// human-facing place (tables, log lines, kill records) uses this; JSON carries raw bytes.
pub fn human_bytes(bytes: u64) -> String {
    const KIB: f64 = 1024.0;
    let b = bytes as f64;
    if b >= KIB * KIB * KIB {
        format!("{:.2} GiB", b / (KIB * KIB * KIB))
    } else if b >= KIB * KIB {
        format!("{:.1} MiB", b / (KIB * KIB))
    } else if b >= KIB {
        format!("{:.1} KiB", b / KIB)
    } else {
        format!("{bytes} B")
    }
}

#[cfg(test)]
mod human_bytes_tests {
    use super::human_bytes;

    #[test]
    fn units_step_up_at_each_power_of_1024() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(4096), "4.0 KiB");
        assert_eq!(human_bytes(512 << 20), "512.0 MiB");
        assert_eq!(human_bytes((1 << 30) - 1), "1024.0 MiB");
        assert_eq!(human_bytes(1 << 30), "1.00 GiB");
        assert_eq!(human_bytes(113_158 << 20), "110.51 GiB");
    }
}
