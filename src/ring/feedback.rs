//! The feedback frames a consumer sends to the producer on its attach connection
//! (docs/ring-format.md §9): per-sample losses (`REPORT`), "this lane has finished epoch e"
//! (`EPOCH_DONE`) and, on an on-demand ring (1.3), "serve me pass p from batch i" (`PASS`).
//!
//! Brief overview: [`encode_report`] / [`encode_epoch_done`] build a frame (consumer side);
//! [`FrameReader`] cuts a byte stream into [`Feedback`] messages (producer side), refusing a
//! malformed frame with a [`FrameError`] that names the field. Both are pure: no sockets here.

/// `RFBK` in ASCII: the first four bytes of every frame.
pub const FRAME_MAGIC: [u8; 4] = *b"RFBK";
/// Bytes of a frame header.
pub const FRAME_HEADER_BYTES: usize = 24;
/// Most samples one `REPORT` frame may carry.
pub const MAX_REPORT_SAMPLES: u32 = 1 << 16;
/// Frame kind 1: per-sample losses.
pub const KIND_REPORT: u16 = 1;
/// Frame kind 2: the lane has finished an epoch (every report of it was sent before).
pub const KIND_EPOCH_DONE: u16 = 2;

/// Frame kind 3 (since 1.3): start a pass over an on-demand ring (header flag bit 3).
pub const KIND_PASS: u16 = 3;
/// Bytes of a `PASS` frame: the header and the u64 index of its first batch.
pub const PASS_FRAME_BYTES: usize = FRAME_HEADER_BYTES + 8;

/// One decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Feedback {
    /// Losses of samples served in `epoch` (the epoch of the consumer's last batch).
    Report {
        /// Epoch the samples were served in, as the consumer saw it.
        epoch: u64,
        /// Sample ids (as in the `sample_ids` tensor).
        ids: Vec<u64>,
        /// One loss per id, unchecked (NaN and negatives are the receiver's business).
        losses: Vec<f32>,
    },
    /// Every report of `epoch` (and earlier) from this lane has been sent.
    EpochDone {
        /// The finished epoch.
        epoch: u64,
    },
    /// On an on-demand ring: serve one pass over the lane's share of the data, its batches
    /// published with slot `epoch = pass`, from batch `index` on (0 for a whole pass).
    Pass {
        /// The pass's number, chosen by the consumer (slot `epoch` of its batches).
        pass: u64,
        /// First batch of the pass to serve.
        index: u64,
    },
}

/// A malformed frame; the producer drops the connection that sent it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The first four bytes are not `RFBK`.
    #[error("feedback frame: bad magic {0:02x?}")]
    Magic([u8; 4]),
    /// An unknown `kind`.
    #[error("feedback frame: unknown kind {0}")]
    Kind(u16),
    /// `count` out of range for the kind.
    #[error("feedback frame: count {count} out of range for kind {kind} (REPORT: 1..={max})", max = MAX_REPORT_SAMPLES)]
    Count {
        /// The frame kind.
        kind: u16,
        /// The count it gave.
        count: u32,
    },
}

fn header(kind: u16, count: u32, epoch: u64) -> [u8; FRAME_HEADER_BYTES] {
    let mut h = [0u8; FRAME_HEADER_BYTES];
    h[0..4].copy_from_slice(&FRAME_MAGIC);
    h[4..6].copy_from_slice(&kind.to_le_bytes());
    h[8..12].copy_from_slice(&count.to_le_bytes());
    h[16..24].copy_from_slice(&epoch.to_le_bytes());
    h
}

/// Appends a `REPORT` frame to `out`. Panics if `ids` and `losses` differ in length or hold
/// more than [`MAX_REPORT_SAMPLES`] or no samples (callers split and check first).
pub fn encode_report(out: &mut Vec<u8>, epoch: u64, ids: &[u64], losses: &[f32]) {
    assert_eq!(ids.len(), losses.len(), "one loss per id");
    assert!(!ids.is_empty() && ids.len() <= MAX_REPORT_SAMPLES as usize);
    out.extend_from_slice(&header(KIND_REPORT, ids.len() as u32, epoch));
    out.reserve(ids.len() * 12);
    for id in ids {
        out.extend_from_slice(&id.to_le_bytes());
    }
    for loss in losses {
        out.extend_from_slice(&loss.to_le_bytes());
    }
}

/// Appends an `EPOCH_DONE` frame to `out`.
pub fn encode_epoch_done(out: &mut Vec<u8>, epoch: u64) {
    out.extend_from_slice(&header(KIND_EPOCH_DONE, 0, epoch));
}

/// Appends a `PASS` frame (kind 3, since 1.3) to `out`: serve pass `pass` from batch `index`.
pub fn encode_pass(out: &mut Vec<u8>, pass: u64, index: u64) {
    out.extend_from_slice(&header(KIND_PASS, 0, pass));
    out.extend_from_slice(&index.to_le_bytes());
}

/// Cuts a byte stream into frames: feed it what the socket gave, take the complete frames.
#[derive(Debug, Default)]
pub struct FrameReader {
    buffer: Vec<u8>,
    /// Start of the first unread frame in `buffer` (consumed bytes are dropped at the next
    /// push, so taking many frames from one large read stays linear).
    start: usize,
}

impl FrameReader {
    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.buffer.drain(..self.start);
            self.start = 0;
        }
        self.buffer.extend_from_slice(bytes);
    }

    /// Bytes received but not yet part of a complete frame.
    pub fn pending(&self) -> usize {
        self.buffer.len() - self.start
    }

    /// The next complete frame, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Feedback>, FrameError> {
        let b = &self.buffer[self.start..];
        if b.len() < FRAME_HEADER_BYTES {
            return Ok(None);
        }
        let magic: [u8; 4] = b[0..4].try_into().unwrap_or_default();
        if magic != FRAME_MAGIC {
            return Err(FrameError::Magic(magic));
        }
        let kind = u16::from_le_bytes([b[4], b[5]]);
        let count = u32::from_le_bytes(b[8..12].try_into().unwrap_or_default());
        let epoch = u64::from_le_bytes(b[16..24].try_into().unwrap_or_default());
        let (frame_len, message) = match kind {
            KIND_REPORT => {
                if count == 0 || count > MAX_REPORT_SAMPLES {
                    return Err(FrameError::Count { kind, count });
                }
                let n = count as usize;
                let len = FRAME_HEADER_BYTES + n * 12;
                if b.len() < len {
                    return Ok(None);
                }
                let body = &b[FRAME_HEADER_BYTES..len];
                let ids = body[..n * 8]
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
                    .collect();
                let losses = body[n * 8..]
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap_or_default()))
                    .collect();
                (len, Feedback::Report { epoch, ids, losses })
            }
            KIND_EPOCH_DONE => {
                if count != 0 {
                    return Err(FrameError::Count { kind, count });
                }
                (FRAME_HEADER_BYTES, Feedback::EpochDone { epoch })
            }
            KIND_PASS => {
                if count != 0 {
                    return Err(FrameError::Count { kind, count });
                }
                if b.len() < PASS_FRAME_BYTES {
                    return Ok(None);
                }
                let index = u64::from_le_bytes(
                    b[FRAME_HEADER_BYTES..PASS_FRAME_BYTES]
                        .try_into()
                        .unwrap_or_default(),
                );
                (PASS_FRAME_BYTES, Feedback::Pass { pass: epoch, index })
            }
            other => return Err(FrameError::Kind(other)),
        };
        self.start += frame_len;
        Ok(Some(message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_when_cut_anywhere() {
        let mut bytes = Vec::new();
        encode_report(&mut bytes, 3, &[1, 7, u64::MAX], &[0.5, f32::NAN, -1.0]);
        encode_epoch_done(&mut bytes, 3);
        encode_pass(&mut bytes, 9, u64::MAX);
        for cut in 0..bytes.len() {
            let mut r = FrameReader::default();
            r.push(&bytes[..cut]);
            let mut got = Vec::new();
            while let Some(f) = r.next_frame().unwrap() {
                got.push(f);
            }
            r.push(&bytes[cut..]);
            while let Some(f) = r.next_frame().unwrap() {
                got.push(f);
            }
            assert_eq!(got.len(), 3, "cut at {cut}");
            match &got[0] {
                Feedback::Report { epoch, ids, losses } => {
                    assert_eq!((*epoch, ids.as_slice()), (3, &[1, 7, u64::MAX][..]));
                    assert_eq!(losses[0], 0.5);
                    assert!(losses[1].is_nan());
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(got[1], Feedback::EpochDone { epoch: 3 });
            assert_eq!(
                got[2],
                Feedback::Pass {
                    pass: 9,
                    index: u64::MAX
                }
            );
            assert_eq!(r.pending(), 0);
        }
    }

    #[test]
    fn malformed_frames_are_named() {
        let mut r = FrameReader::default();
        r.push(b"GET / HTTP/1.1\r\n\r\n......");
        assert!(matches!(r.next_frame(), Err(FrameError::Magic(_))));
        let mut bytes = Vec::new();
        encode_epoch_done(&mut bytes, 0);
        bytes[4] = 9;
        let mut r = FrameReader::default();
        r.push(&bytes);
        assert_eq!(r.next_frame(), Err(FrameError::Kind(9)));
        let mut bytes = header(KIND_REPORT, MAX_REPORT_SAMPLES + 1, 0).to_vec();
        bytes.extend_from_slice(&[0; 64]);
        let mut r = FrameReader::default();
        r.push(&bytes);
        assert!(matches!(r.next_frame(), Err(FrameError::Count { .. })));
        let mut r = FrameReader::default();
        r.push(&header(KIND_REPORT, 0, 0));
        assert!(matches!(
            r.next_frame(),
            Err(FrameError::Count { count: 0, .. })
        ));
        // A PASS frame with a count is refused; one cut before its index waits for it.
        let mut r = FrameReader::default();
        r.push(&header(KIND_PASS, 3, 1));
        r.push(&[0; 8]);
        assert!(matches!(
            r.next_frame(),
            Err(FrameError::Count { count: 3, .. })
        ));
        let mut bytes = Vec::new();
        encode_pass(&mut bytes, 7, 2);
        let mut r = FrameReader::default();
        r.push(&bytes[..FRAME_HEADER_BYTES + 4]);
        assert_eq!(r.next_frame(), Ok(None));
        r.push(&bytes[FRAME_HEADER_BYTES + 4..]);
        assert_eq!(
            r.next_frame(),
            Ok(Some(Feedback::Pass { pass: 7, index: 2 }))
        );
    }
}
