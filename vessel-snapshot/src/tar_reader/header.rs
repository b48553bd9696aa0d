//! The ustar/GNU header block and its numeric fields.

use super::BLOCK;

pub(super) fn cut_nul(v: &[u8]) -> &[u8] {
    v.iter().position(|b| *b == 0).map_or(v, |i| &v[..i])
}

/// Old GNU sparse slots (12-byte offset, 12-byte length); stops at the
/// first empty slot, as Go does, and refuses anything but zeros after it
/// (Python reads every slot, and stops the whole archive at a bad one).
pub(super) fn old_sparse_entries(area: &[u8], slots: usize, out: &mut Vec<(u64, u64)>) -> Result<(), &'static str> {
    for i in 0..slots {
        let slot = &area[i * 24..i * 24 + 24];
        if slot[0] == 0 {
            if area[i * 24..slots * 24].iter().any(|b| *b != 0) {
                return Err("data after the end of a sparse map");
            }
            break;
        }
        let off = number(&slot[..12])?;
        let len = number(&slot[12..])?;
        out.push((off, len));
    }
    Ok(())
}

/// One header block, parsed.
#[derive(Debug, Clone)]
pub(super) struct Header {
    pub(super) name: Vec<u8>,
    pub(super) link: Vec<u8>,
    pub(super) typeflag: u8,
    pub(super) mode: u64,
    pub(super) uid: u64,
    pub(super) gid: u64,
    pub(super) size: u64,
    pub(super) mtime: i64,
    pub(super) devmajor: u32,
    pub(super) devminor: u32,
    pub(super) old_sparse: Vec<(u64, u64)>,
    pub(super) old_extended: bool,
    pub(super) old_realsize: u64,
}

impl Header {
    pub(super) fn parse(b: &[u8; BLOCK]) -> Result<Self, &'static str> {
        let stored = number(&b[148..156]).map_err(|_| "a bad header checksum field")?;
        let (mut unsigned, mut signed) = (0u64, 0i64);
        for (i, byte) in b.iter().enumerate() {
            let byte = if (148..156).contains(&i) { b' ' } else { *byte };
            unsigned += u64::from(byte);
            signed += i64::from(byte as i8);
        }
        if stored != unsigned && i64::try_from(stored).ok() != Some(signed) {
            return Err("a bad header checksum");
        }
        let ustar = &b[257..263] == b"ustar\0" && &b[263..265] == b"00";
        let gnu = &b[257..263] == b"ustar " && &b[263..265] == b" \0";
        let typeflag = b[156];
        let mut name = cut_nul(&b[0..100]).to_vec();
        if ustar {
            let prefix = cut_nul(&b[345..500]);
            if &b[508..512] == b"tar\0" && cut_nul(&b[345..476]) != prefix {
                return Err("a star prefix that parsers read differently");
            }
            if !prefix.is_empty() {
                name = [prefix, b"/", &name].concat();
            }
        } else if typeflag != b'S' && b[345..500].iter().any(|x| *x != 0) {
            // Python joins this area as a ustar prefix whatever the magic; Go does not.
            return Err("a prefix area that parsers read differently");
        }
        let size = number(&b[124..136]).map_err(|_| "a bad size")?;
        let mut h = Self {
            name,
            link: cut_nul(&b[157..257]).to_vec(),
            typeflag,
            mode: number(&b[100..108]).map_err(|_| "a bad mode")?,
            uid: number(&b[108..116]).map_err(|_| "a bad uid")?,
            gid: number(&b[116..124]).map_err(|_| "a bad gid")?,
            size,
            mtime: signed_number(&b[136..148]).ok_or("a bad mtime")?,
            devmajor: 0,
            devminor: 0,
            old_sparse: Vec::new(),
            old_extended: false,
            old_realsize: 0,
        };
        if ustar || gnu {
            let dev = |f: &[u8]| number(f).ok().and_then(|n| u32::try_from(n).ok()).ok_or("a bad device number");
            h.devmajor = dev(&b[329..337])?;
            h.devminor = dev(&b[337..345])?;
        }
        if typeflag == b'S' {
            if !gnu {
                return Err("a GNU sparse entry without the GNU magic");
            }
            old_sparse_entries(&b[386..482], 4, &mut h.old_sparse)?;
            h.old_extended = b[482] != 0;
            h.old_realsize = number(&b[483..495]).map_err(|_| "a bad sparse size")?;
        }
        Ok(h)
    }
}

/// A non-negative numeric field: octal (spaces and NULs around it, as Go
/// trims them) or base-256.
fn number(f: &[u8]) -> Result<u64, &'static str> {
    match signed_number(f) {
        Some(n) if n >= 0 => Ok(n as u64),
        Some(_) => Err("a negative number"),
        None => Err("a bad number"),
    }
}

fn signed_number(f: &[u8]) -> Option<i64> {
    if f[0] & 0x80 != 0 {
        // Base-256, two's complement: 0x80 marks positive, 0xff negative.
        let neg = f[0] & 0x40 != 0;
        let inv = if neg { 0xff } else { 0 };
        let mut n: u64 = 0;
        for (i, byte) in f.iter().enumerate() {
            let mut byte = *byte ^ inv;
            if i == 0 {
                byte &= 0x7f;
            }
            if n >> 56 != 0 {
                return None;
            }
            n = n << 8 | u64::from(byte);
        }
        if n >> 63 != 0 {
            return None;
        }
        return Some(if neg { -(n as i64) - 1 } else { n as i64 });
    }
    let t = trim(f);
    if t.is_empty() {
        return Some(0);
    }
    if !t.iter().all(|b| (b'0'..=b'7').contains(b)) {
        return None;
    }
    i64::from_str_radix(std::str::from_utf8(t).ok()?, 8).ok()
}

fn trim(f: &[u8]) -> &[u8] {
    let pad = |b: &u8| *b == b' ' || *b == 0;
    let start = f.iter().position(|b| !pad(b)).unwrap_or(f.len());
    let end = f.iter().rposition(|b| !pad(b)).map_or(start, |i| i + 1);
    &f[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_slots_end_at_the_first_empty_one_and_only_zeros_follow() {
        let mut area = [0u8; 96];
        area[..12].copy_from_slice(b"00000000000\0");
        area[12..24].copy_from_slice(b"00000000010\0");
        let mut map = Vec::new();
        assert_eq!(old_sparse_entries(&area, 4, &mut map), Ok(()));
        assert_eq!(map, [(0, 8)]);
        // Found by the property tests: a byte past the end that Python reads as a slot.
        area[48] = 1;
        assert!(old_sparse_entries(&area, 4, &mut Vec::new()).is_err());
    }

    #[test]
    fn numbers_are_octal_or_base_256() {
        assert_eq!(number(b"0000644\0"), Ok(0o644));
        assert_eq!(number(b"  644 \0"), Ok(0o644));
        assert_eq!(number(b"\0\0\0\0"), Ok(0));
        assert!(number(b"12\x0034 ").is_err(), "an embedded NUL");
        assert!(number(b"0000009\0").is_err(), "not octal");
        assert!(number(b"+000001\0").is_err(), "a sign");
        let mut f = [0u8; 12];
        f[0] = 0x80;
        f[11] = 5;
        assert_eq!(number(&f), Ok(5));
        assert_eq!(signed_number(&[0xff; 12]), Some(-1));
        assert!(number(&[0xff; 12]).is_err(), "negative");
        let mut huge = [0xffu8; 12];
        huge[0] = 0x80;
        assert_eq!(signed_number(&huge), None, "past i64");
    }
}
