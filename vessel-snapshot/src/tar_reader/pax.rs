//! PAX extended records and the decimal values they carry.

/// PAX records as (key, value), in archive order.
pub(super) type PaxRecords = Vec<(Vec<u8>, Vec<u8>)>;

/// Decimal digits only (Go also takes a sign; a negative value is refused by all).
pub(super) fn decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// `[-]secs[.frac]`, as Go parses PAX times; the fraction is cut to nanoseconds.
pub(super) fn pax_time(v: &[u8]) -> Option<(i64, i64)> {
    let s = std::str::from_utf8(v).ok()?;
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let digits = secs.strip_prefix('-').unwrap_or(secs);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: i64 = 0;
    for (i, d) in frac.bytes().take(9).enumerate() {
        nanos += i64::from(d - b'0') * 10i64.pow(8 - i as u32);
    }
    if s.starts_with('-') && nanos > 0 {
        // -1.25 is 1.25 s before the epoch: -2 s + 0.75 s.
        return Some((secs.checked_sub(1)?, 1_000_000_000 - nanos));
    }
    Some((secs, nanos))
}

pub(super) fn parse_list(s: &str, sep: u8) -> Option<Vec<u64>> {
    if s.is_empty() {
        return Some(Vec::new());
    }
    s.as_bytes().split(|b| *b == sep).map(decimal).collect()
}

/// PAX records, `"<len> <key>=<value>\n"`, split by their declared length so
/// values may hold any byte.
pub(super) fn parse_pax(mut data: &[u8]) -> Result<PaxRecords, &'static str> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let sp = data.iter().position(|b| *b == b' ').ok_or("a malformed PAX record")?;
        let len = decimal(&data[..sp]).and_then(|l| usize::try_from(l).ok()).ok_or("a malformed PAX record")?;
        if len <= sp + 1 || len > data.len() || data[len - 1] != b'\n' {
            return Err("a malformed PAX record");
        }
        let record = &data[sp + 1..len - 1];
        let eq = record.iter().position(|b| *b == b'=').ok_or("a malformed PAX record")?;
        if eq == 0 || record[..eq].contains(&0) {
            return Err("a malformed PAX key");
        }
        out.push((record[..eq].to_vec(), record[eq + 1..].to_vec()));
        data = &data[len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_records_are_split_by_length() {
        let mut data = Vec::new();
        for (k, v) in
            [(&b"path"[..], &b"a/b"[..]), (b"SCHILY.xattr.user.x", b"line1\nline2\0= \xff"), (b"mtime", b"1.5")]
        {
            let body = [k, b"=", v, b"\n"].concat();
            let mut len = body.len() + 2;
            while format!("{len} ").len() + body.len() != len {
                len += 1;
            }
            data.extend_from_slice(format!("{len} ").as_bytes());
            data.extend_from_slice(&body);
        }
        let recs = parse_pax(&data).unwrap();
        assert_eq!(recs[1], (b"SCHILY.xattr.user.x".to_vec(), b"line1\nline2\0= \xff".to_vec()));
        assert_eq!(recs.len(), 3);
        assert!(parse_pax(b"99 path=x\n").is_err(), "length past the end");
        assert!(parse_pax(b"10 pathx\n").is_err(), "no '='");
        assert!(parse_pax(b"x path=y\n").is_err(), "no length");
        assert!(parse_pax(b"7 =abc\n").is_err(), "empty key");
    }

    #[test]
    fn pax_times_parse_as_go_does() {
        assert_eq!(pax_time(b"1700000000.123456789"), Some((1_700_000_000, 123_456_789)));
        assert_eq!(pax_time(b"5.5"), Some((5, 500_000_000)));
        assert_eq!(pax_time(b"7"), Some((7, 0)));
        assert_eq!(pax_time(b"-1.25"), Some((-2, 750_000_000)));
        assert_eq!(pax_time(b"1.0000000019"), Some((1, 1)), "cut to nanoseconds");
        for bad in [&b"x"[..], b"1e9", b"", b"-", b"1.-5", b"+1", b"99999999999999999999", b"-9223372036854775808.1"] {
            assert_eq!(pax_time(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }
}
