//! [`ReadAhead`]: a reader that runs its source on a thread of its own, a
//! few buffers ahead, so that decompressing and hashing a layer overlaps
//! with parsing its tar and writing the filesystem.

use crossbeam_channel::{bounded, Receiver};
use std::io::{self, Read};
use std::thread::Scope;

/// Bytes read from the source per buffer.
const PIECE: usize = 1 << 20;
/// Buffers the source may run ahead of the reader.
const AHEAD: usize = 4;

/// The consuming end (see the module docs). Errors of the source, among
/// them the digest checks of a layer stream at its end, reach the reader
/// in order, after the bytes before them.
pub struct ReadAhead {
    rx: Receiver<io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    at: usize,
}

impl ReadAhead {
    /// Reads `src` on a thread of `scope`. The thread stops at the source's
    /// end or error, or once this reader is dropped.
    pub fn spawn<'scope, R: Read + Send + 'scope>(
        scope: &'scope Scope<'scope, '_>,
        mut src: R,
    ) -> Self {
        let (tx, rx) = bounded(AHEAD);
        scope.spawn(move || loop {
            let mut piece = vec![0u8; PIECE];
            let mut n = 0;
            let end = loop {
                match src.read(&mut piece[n..]) {
                    Ok(0) => break Ok(true),
                    Ok(k) => {
                        n += k;
                        if n == PIECE {
                            break Ok(false);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(e),
                }
            };
            piece.truncate(n);
            // A send fails only once the reader is gone: then stop.
            let sent = n == 0 || tx.send(Ok(piece)).is_ok();
            match end {
                Ok(false) if sent => {}
                Err(e) if sent => {
                    let _ = tx.send(Err(e));
                    return;
                }
                _ => return,
            }
        });
        ReadAhead {
            rx,
            buf: Vec::new(),
            at: 0,
        }
    }
}

impl Read for ReadAhead {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        while self.at == self.buf.len() {
            match self.rx.recv() {
                Ok(Ok(piece)) => (self.buf, self.at) = (piece, 0),
                Ok(Err(e)) => return Err(e),
                // The source ended.
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source that yields `data` in odd-sized reads, then `fail` if set.
    struct Source {
        data: Vec<u8>,
        at: usize,
        fail: Option<io::ErrorKind>,
    }

    impl Read for Source {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            if self.at == self.data.len() {
                return match self.fail {
                    Some(kind) => Err(io::Error::new(kind, "digest mismatch")),
                    None => Ok(0),
                };
            }
            let n = out.len().min(7919).min(self.data.len() - self.at);
            out[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn passes_every_byte_in_order_then_the_error() {
        for len in [0, 1, PIECE - 1, PIECE, 3 * PIECE + 17] {
            let d = data(len);
            let got = std::thread::scope(|s| {
                let mut r = ReadAhead::spawn(
                    s,
                    Source {
                        data: d.clone(),
                        at: 0,
                        fail: None,
                    },
                );
                let mut got = Vec::new();
                r.read_to_end(&mut got).map(|_| got)
            });
            assert!(got.unwrap() == d, "length {len}");
            let err = std::thread::scope(|s| {
                let src = Source {
                    data: d.clone(),
                    at: 0,
                    fail: Some(io::ErrorKind::InvalidData),
                };
                let mut r = ReadAhead::spawn(s, src);
                let mut got = Vec::new();
                let e = r.read_to_end(&mut got).unwrap_err();
                (got, e)
            });
            assert!(err.0 == d, "the bytes before the error arrive first");
            assert_eq!(err.1.kind(), io::ErrorKind::InvalidData);
        }
    }

    #[test]
    fn dropping_the_reader_stops_the_thread() {
        let d = data(20 * PIECE);
        std::thread::scope(|s| {
            let mut r = ReadAhead::spawn(
                s,
                Source {
                    data: d,
                    at: 0,
                    fail: None,
                },
            );
            let mut first = [0u8; 10];
            r.read_exact(&mut first).unwrap();
            drop(r);
        });
    }
}
