//! Compression detection for layer and image streams.

use std::io::{BufRead, BufReader, Read};

use crate::SnapshotError;

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// The stream's uncompressed bytes, told apart by magic: zstd, gzip or plain.
pub(crate) fn decompressed<'a>(input: impl Read + 'a) -> Result<Box<dyn Read + 'a>, SnapshotError> {
    let mut r = BufReader::with_capacity(256 * 1024, input);
    let head = r.fill_buf().map_err(|e| SnapshotError::Stream("layer", e))?;
    Ok(if head.starts_with(&ZSTD_MAGIC) {
        Box::new(zstd::stream::read::Decoder::with_buffer(r).map_err(|e| SnapshotError::Stream("layer", e))?)
    } else if head.starts_with(&GZIP_MAGIC) {
        Box::new(flate2::bufread::MultiGzDecoder::new(r))
    } else {
        Box::new(r)
    })
}
