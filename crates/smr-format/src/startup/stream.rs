//! zstd streams across the chunks of a startup pack (docs/FORMAT.md §6).
//!
//! A start's blocks are mostly one runtime's code and data, which repeat
//! across the pack: compressed one 256 KiB piece at a time, a piece finds
//! nothing of what the pieces before it hold. So a pack's pieces are
//! compressed as zstd streams of up to [`STREAM_PIECES`] pieces, flushed at
//! every piece boundary: a pack chunk still holds exactly the compressed
//! bytes of its piece (and is sealed and named like any chunk), but a chunk
//! after the first of its stream decodes only in a decoder that has just
//! decoded the chunk before it ([`PackDecoder`]). On a Node.js start's
//! 29.5 MB of blocks at level 19, streams of 32 pieces store 7.41 MB,
//! pieces one by one 8.18 MB (8.28 MB at level 14). Streams are
//! independent of each other, so they are sealed in parallel and a read
//! out of order decodes at most a stream's chunks again.

use crate::chunk::compress;
use std::io::{self, Write};
use zstd::zstd_safe::{CParameter, DCtx, DParameter, InBuffer, OutBuffer, ResetDirective};

/// Pieces per zstd stream: 8 MiB of plaintext at the default piece size,
/// the stream's whole window.
pub const STREAM_PIECES: usize = 32;
/// zstd window of a pack stream (2^23 = 8 MiB): what a decoder holds while
/// it decodes one, and the most it accepts.
pub const PACK_WINDOW_LOG: u32 = 23;

/// One piece as encoded for its pack chunk.
#[derive(Debug)]
pub(crate) struct Encoded {
    /// The bytes to encrypt.
    pub data: Vec<u8>,
    /// Whether they are zstd data.
    pub compressed: bool,
    /// Whether they continue the zstd stream of the piece before.
    pub continues: bool,
}

/// Encodes the pieces of one stream at zstd `level`. A stream of one piece
/// is a zstd frame of its own, or the piece as it is when compressing does
/// not make it smaller.
pub(crate) fn encode_stream(pieces: &[&[u8]], level: i32) -> io::Result<Vec<Encoded>> {
    if let [piece] = pieces {
        let (data, compressed) = compress(piece, Some(level));
        return Ok(vec![Encoded {
            data,
            compressed,
            continues: false,
        }]);
    }
    let Some((last, rest)) = pieces.split_last() else {
        return Ok(Vec::new());
    };
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), level)?;
    enc.set_parameter(CParameter::WindowLog(PACK_WINDOW_LOG))?;
    enc.include_checksum(false)?;
    let mut out = Vec::with_capacity(pieces.len());
    for piece in rest {
        enc.write_all(piece)?;
        enc.flush()?;
        out.push(std::mem::take(enc.get_mut()));
    }
    enc.write_all(last)?;
    out.push(enc.finish()?);
    Ok(out
        .into_iter()
        .enumerate()
        .map(|(k, data)| Encoded {
            data,
            compressed: true,
            continues: k > 0,
        })
        .collect())
}

/// zstd level of [`smaller`]'s trial: fast, and ranks two encodings of
/// the same bytes as level 19 does.
const TRIAL_LEVEL: i32 = 3;

/// Whether the pieces `a` compress to fewer bytes than the pieces `b`, as
/// one stream at a fast level ([`TRIAL_LEVEL`]): how a pack's encoder
/// chooses between a stream's pieces with and without the x86 filter at a
/// tenth of the cost of compressing both at level 19.
pub(crate) fn smaller(a: &[&[u8]], b: &[&[u8]]) -> bool {
    match (trial_size(a), trial_size(b)) {
        (Ok(a), Ok(b)) => a < b,
        _ => false,
    }
}

/// Bytes of `pieces` compressed as one stream at [`TRIAL_LEVEL`].
fn trial_size(pieces: &[&[u8]]) -> io::Result<u64> {
    let mut enc = zstd::stream::write::Encoder::new(Counter(0), TRIAL_LEVEL)?;
    enc.set_parameter(CParameter::WindowLog(PACK_WINDOW_LOG))?;
    for piece in pieces {
        enc.write_all(piece)?;
    }
    Ok(enc.finish()?.0)
}

/// A writer that keeps only the count of the bytes written to it.
struct Counter(u64);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Decodes a pack's compressed chunks in pack order, keeping the zstd
/// stream's state from one chunk to the next. It holds a window
/// ([`PACK_WINDOW_LOG`]) only while inside a stream.
#[derive(Default)]
pub struct PackDecoder {
    dctx: Option<DCtx<'static>>,
    /// The chunk that continues what was decoded last, if any.
    next: Option<usize>,
}

impl std::fmt::Debug for PackDecoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackDecoder")
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl PackDecoder {
    /// A decoder at no stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// The chunk this decoder can take next without starting its stream
    /// over: the one after the chunk it decoded last, inside its stream.
    pub fn next(&self) -> Option<usize> {
        self.next
    }

    /// Decodes chunk `i` of a stream from its decrypted bytes `data` into
    /// exactly `plain_len` bytes. `continues`: whether the chunk continues
    /// the stream of chunk `i - 1`, which this decoder must then have
    /// decoded last; `more`: whether chunk `i + 1` continues it (if not,
    /// the window is let go). Any failure leaves the decoder at no stream.
    pub fn decode(
        &mut self,
        i: usize,
        continues: bool,
        more: bool,
        data: &[u8],
        plain_len: usize,
    ) -> Result<Vec<u8>, String> {
        let r = self.decode_inner(i, continues, data, plain_len);
        self.next = (r.is_ok() && more).then_some(i + 1);
        if self.next.is_none() {
            self.dctx = None;
        }
        r
    }

    fn decode_inner(
        &mut self,
        i: usize,
        continues: bool,
        data: &[u8],
        plain_len: usize,
    ) -> Result<Vec<u8>, String> {
        if continues && self.next != Some(i) {
            return Err(format!(
                "continues the zstd stream of pack chunk {}, which was not decoded just before it",
                i.wrapping_sub(1)
            ));
        }
        let zerr = |e: usize| format!("zstd: {}", zstd::zstd_safe::get_error_name(e));
        let dctx = match &mut self.dctx {
            Some(d) if continues => d,
            slot => {
                let mut d = DCtx::try_create().ok_or("zstd: cannot allocate a decoder")?;
                d.set_parameter(DParameter::WindowLogMax(PACK_WINDOW_LOG))
                    .map_err(zerr)?;
                d.reset(ResetDirective::SessionOnly).map_err(zerr)?;
                slot.insert(d)
            }
        };
        let mut plain = vec![0u8; plain_len];
        let mut input = InBuffer::around(data);
        let mut out = OutBuffer::around(&mut plain[..]);
        loop {
            let (was_in, was_out) = (input.pos(), out.pos());
            dctx.decompress_stream(&mut out, &mut input).map_err(zerr)?;
            if (input.pos(), out.pos()) == (was_in, was_out) {
                break;
            }
        }
        let (used, wrote) = (input.pos(), out.pos());
        if used < data.len() {
            return Err(format!(
                "decodes to more than {plain_len} bytes ({} of {} input bytes left)",
                data.len() - used,
                data.len()
            ));
        }
        if wrote != plain_len {
            return Err(format!("decoded to {wrote} bytes, expected {plain_len}"));
        }
        // The piece's data must end where its plaintext does: nothing more
        // may come out of it.
        let mut extra = [0u8; 1];
        let mut out = OutBuffer::around(&mut extra[..]);
        dctx.decompress_stream(&mut out, &mut InBuffer::around(&[]))
            .map_err(zerr)?;
        if out.pos() > 0 {
            return Err(format!("decodes to more than {plain_len} bytes"));
        }
        Ok(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> Vec<u8> {
        // Text that repeats across pieces, with some noise.
        (0..n)
            .map(|i| b"the same runtime code "[i % 22] ^ u8::from(i % 4099 == 0))
            .collect()
    }

    #[test]
    fn a_stream_decodes_piece_by_piece_and_beats_pieces_alone() {
        let plain = sample(10 * 4096);
        let pieces: Vec<&[u8]> = plain.chunks(4096).collect();
        let enc = encode_stream(&pieces, 19).unwrap();
        assert_eq!(enc.len(), 10);
        assert!(!enc[0].continues && enc[1..].iter().all(|e| e.continues && e.compressed));
        let alone: usize = pieces.iter().map(|p| compress(p, Some(19)).0.len()).sum();
        let streamed: usize = enc.iter().map(|e| e.data.len()).sum();
        assert!(streamed < alone, "{streamed} vs {alone}");
        let mut d = PackDecoder::new();
        for (i, (e, p)) in enc.iter().zip(&pieces).enumerate() {
            let more = i + 1 < enc.len();
            assert_eq!(
                d.decode(i, e.continues, more, &e.data, p.len()).unwrap(),
                *p
            );
            assert_eq!(d.next(), more.then_some(i + 1));
        }
        assert!(d.dctx.is_none(), "the window is let go at the stream's end");
    }

    #[test]
    fn out_of_order_wrong_length_and_garbage_are_errors() {
        let plain = sample(4 * 4096);
        let pieces: Vec<&[u8]> = plain.chunks(4096).collect();
        let enc = encode_stream(&pieces, 3).unwrap();
        let mut d = PackDecoder::new();
        let e = d.decode(2, true, true, &enc[2].data, 4096).unwrap_err();
        assert!(e.contains("not decoded just before"), "{e}");
        d.decode(0, false, true, &enc[0].data, 4096).unwrap();
        let e = d.decode(1, true, true, &enc[1].data, 4095).unwrap_err();
        assert!(e.contains("more than 4095"), "{e}");
        assert_eq!(d.next(), None, "a failure ends the stream");
        d.decode(0, false, true, &enc[0].data, 4096).unwrap();
        let e = d.decode(1, true, true, &enc[1].data, 8192).unwrap_err();
        assert!(e.contains("decoded to 4096 bytes, expected 8192"), "{e}");
        let e = d
            .decode(0, false, true, b"not zstd at all", 4096)
            .unwrap_err();
        assert!(e.starts_with("zstd: "), "{e}");
        // A restart from the stream's first chunk works after all of it.
        d.decode(0, false, true, &enc[0].data, 4096).unwrap();
        assert_eq!(
            d.decode(1, true, true, &enc[1].data, 4096).unwrap(),
            pieces[1]
        );
    }

    #[test]
    fn a_lone_piece_that_does_not_shrink_stays_plain() {
        use sha2::{Digest, Sha256};
        let noise: Vec<u8> = (0..128u32)
            .flat_map(|i| Sha256::digest(i.to_le_bytes()))
            .collect();
        let enc = encode_stream(&[&noise], 19).unwrap();
        assert!(!enc[0].compressed && !enc[0].continues);
        assert_eq!(enc[0].data, noise);
    }

    #[test]
    fn encoding_is_deterministic() {
        let plain = sample(6 * 4096);
        let pieces: Vec<&[u8]> = plain.chunks(4096).collect();
        let a: Vec<Vec<u8>> = encode_stream(&pieces, 19)
            .unwrap()
            .into_iter()
            .map(|e| e.data)
            .collect();
        let b: Vec<Vec<u8>> = encode_stream(&pieces, 19)
            .unwrap()
            .into_iter()
            .map(|e| e.data)
            .collect();
        assert_eq!(a, b);
    }
}
