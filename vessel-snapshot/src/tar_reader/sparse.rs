//! Sparse maps: the PAX 1.0 map read from an entry's data, and the checks
//! every format's map passes.

use std::io::Read;

use super::pax::decimal;
use super::{BLOCK, MAX_META, Reader};
use crate::SnapshotError;

impl<R: Read> Reader<R> {
    /// Reads the PAX 1.0 sparse map at the start of the data: decimal
    /// numbers, one a line, the count first, padded to a block.
    pub(super) fn sparse_map_1_0(&mut self, at: u64) -> Result<Vec<u64>, SnapshotError> {
        let mut text = Vec::new();
        let mut lines = 0u64;
        let mut want: Option<u64> = None;
        loop {
            if want.is_some_and(|w| lines >= w) {
                break;
            }
            if self.left < BLOCK as u64 || text.len() as u64 >= MAX_META {
                return Err(self.bad(at, "a bad sparse map"));
            }
            let mut blk = [0u8; BLOCK];
            if !self.fill(&mut blk)? {
                return Err(self.bad(self.offset, "the archive ends inside a sparse map"));
            }
            self.left -= BLOCK as u64;
            for &b in &blk {
                if want.is_some_and(|w| lines >= w) {
                    break;
                }
                text.push(b);
                if b == b'\n' {
                    lines += 1;
                    if want.is_none() {
                        let count = decimal(&text[..text.len() - 1]).ok_or_else(|| self.bad(at, "a bad sparse map"))?;
                        want = Some(
                            count
                                .checked_mul(2)
                                .and_then(|c| c.checked_add(1))
                                .ok_or_else(|| self.bad(at, "a bad sparse map"))?,
                        );
                    }
                }
            }
        }
        let mut numbers: Vec<u64> = Vec::new();
        for line in text.split(|b| *b == b'\n').skip(1).take(want.unwrap_or(1) as usize - 1) {
            numbers.push(decimal(line).ok_or_else(|| self.bad(at, "a bad sparse map"))?);
        }
        Ok(numbers)
    }
}

/// Segments are sorted, disjoint, inside the file, and hold exactly the stored data.
pub(super) fn validate_sparse(map: &[(u64, u64)], logical: u64, stored: u64) -> Result<(), &'static str> {
    let mut end = 0u64;
    let mut total = 0u64;
    for &(off, len) in map {
        let seg_end = off.checked_add(len).ok_or("a sparse segment past the end of the file")?;
        if off < end {
            return Err("sparse segments that overlap or are out of order");
        }
        if seg_end > logical {
            return Err("a sparse segment past the end of the file");
        }
        end = seg_end;
        total = total.checked_add(len).ok_or("a sparse map that does not match the data")?;
    }
    if total != stored {
        return Err("a sparse map that does not match the data");
    }
    if end != logical {
        // GNU tar sizes the file by its map's end, Go and Python by the
        // recorded size; GNU's writers end every map at the size.
        return Err("a sparse map that ends before the file does");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_maps_are_checked() {
        assert_eq!(validate_sparse(&[(0, 5), (10, 5), (20, 0)], 20, 10), Ok(()));
        assert!(validate_sparse(&[(0, 5), (3, 5)], 8, 10).is_err(), "overlap");
        assert!(validate_sparse(&[(10, 5), (0, 5)], 15, 10).is_err(), "order");
        assert!(validate_sparse(&[(0, 5)], 20, 5).is_err(), "ends early");
        assert!(validate_sparse(&[(0, 5)], 5, 6).is_err(), "data left over");
        assert!(validate_sparse(&[(u64::MAX, 5)], 5, 5).is_err(), "overflow");
    }
}
