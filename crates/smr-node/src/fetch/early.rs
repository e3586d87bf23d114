//! Early delivery: the chunks of one request handed out while its answer
//! arrives, each as soon as its own bytes are in.

use super::{Batch, Done};
use smr_store::Progress;
use std::sync::{Arc, Mutex, PoisonError};

/// The chunks of a running request, in the order of the answer.
pub(super) struct Early {
    /// Each chunk's place in the answer and where its waiters wait.
    parts: Vec<(usize, usize, Arc<Done>)>,
    /// Chunks handed out so far (a prefix of `parts`).
    next: Mutex<usize>,
}

impl Early {
    /// The progress callback of `batch`'s request, or `None` when there
    /// is nothing to hand out early (a single chunk, or a whole object).
    pub(super) fn of(batch: &Batch) -> Option<Progress> {
        if batch.slots.len() < 2 || batch.end.is_none() {
            return None;
        }
        let parts = batch
            .slots
            .iter()
            .map(|s| {
                let len = s.range.len?;
                let from = usize::try_from(s.range.offset.checked_sub(batch.start)?).ok()?;
                Some((from, usize::try_from(len).ok()?, s.done.clone()))
            })
            .collect::<Option<Vec<_>>>()?;
        let early = Early {
            parts,
            next: Mutex::new(0),
        };
        Some(Arc::new(move |got: &[u8]| early.arrived(got)))
    }

    /// Hands out every chunk that `got` (the answer's first bytes) now
    /// holds whole. A retry starts `got` again from empty: chunks handed
    /// out stay so, the rest wait for their bytes to come again.
    fn arrived(&self, got: &[u8]) {
        let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some((from, len, done)) = self.parts.get(*next) {
            let Some(bytes) = got.get(*from..from + len) else {
                return;
            };
            done.post(Ok(Arc::new(bytes.to_vec())));
            *next += 1;
        }
    }
}
