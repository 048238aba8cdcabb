//! A connection's buffers: received bytes not yet taken, with the
//! separator search of `read_until`, and bytes written but not yet sent.
//! Pure Rust, no I/O and no Python.

/// How much a read asks the socket for at least.
pub(crate) const READ_CHUNK: usize = 16 * 1024;

/// An emptied read buffer larger than this goes back to `READ_CHUNK`.
const SHRINK_ABOVE: usize = 4 * READ_CHUNK;

/// What [`ReadBuffer::until`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Until {
    /// The line is buffered: take this many bytes (the separator included).
    Found(usize),
    /// The separator is not within the limit (or not yet, and more than the
    /// limit is buffered).
    Overrun,
    /// Not yet: read more.
    NotYet,
}

/// Received bytes not yet taken: `data[start..end]`, with `data` kept
/// initialised so that reads need no zeroing.
pub(crate) struct ReadBuffer {
    data: Vec<u8>,
    start: usize,
    end: usize,
    /// How many buffered bytes are known not to hold `searched_for`: a line
    /// that arrives in many reads is searched once, not once per read.
    searched: usize,
    searched_for: Vec<u8>,
}

impl ReadBuffer {
    pub(crate) fn new() -> Self {
        Self {
            data: vec![0; READ_CHUNK],
            start: 0,
            end: 0,
            searched: 0,
            searched_for: Vec::new(),
        }
    }

    pub(crate) fn buffered(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    /// Where `separator` starts in the buffered bytes, searching only what
    /// arrived since the last search for it (`separator` is not empty).
    pub(crate) fn find(&mut self, separator: &[u8]) -> Option<usize> {
        if self.searched_for != separator {
            self.searched_for = separator.to_vec();
            self.searched = 0;
        }
        // Back up by all but one byte: a separator may straddle the boundary.
        let from = self.searched.saturating_sub(separator.len() - 1);
        let found = find(&self.buffered()[from..], separator).map(|at| from + at);
        self.searched = if found.is_some() {
            0
        } else {
            self.end - self.start
        };
        found
    }

    /// Where a line ending in `separator` ends, for a `read_until` that
    /// allows `limit` bytes before the separator.
    pub(crate) fn until(&mut self, separator: &[u8], limit: usize) -> Until {
        match self.find(separator) {
            Some(at) if at <= limit => Until::Found(at + separator.len()),
            Some(_) => Until::Overrun,
            None if self.buffered().len() > limit => Until::Overrun,
            None => Until::NotYet,
        }
    }

    /// Counts `n` bytes just read into [`spare`](Self::spare).
    pub(crate) fn filled(&mut self, n: usize) {
        self.end += n;
    }

    /// Lets go of the first `n` buffered bytes.
    pub(crate) fn consume(&mut self, n: usize) {
        self.searched = 0;
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.data.len() > SHRINK_ABOVE {
                // One large message must not hold its buffer for the rest
                // of the connection's life.
                self.data = vec![0; READ_CHUNK];
            }
        }
    }

    /// Free space after what is buffered, of at least `at_least` bytes:
    /// the buffered bytes move to the front if that makes room, and the
    /// buffer grows (to a power of two) if not.
    pub(crate) fn spare(&mut self, at_least: usize) -> &mut [u8] {
        if self.data.len() - self.end < at_least && self.start > 0 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.data.len() - self.end < at_least {
            let size = (self.end + at_least).next_power_of_two();
            self.data.resize(size, 0);
        }
        &mut self.data[self.end..]
    }
}

/// Bytes accepted by `write` that the socket has not taken yet.
#[derive(Default)]
pub(crate) struct WriteBuffer {
    pub(crate) data: Vec<u8>,
    /// How much of `data` the socket took.
    pub(crate) sent: usize,
}

impl WriteBuffer {
    /// Bytes written and not sent yet.
    pub(crate) fn pending(&self) -> usize {
        self.data.len() - self.sent
    }

    /// Hands the unsent bytes to `send` (a non-blocking write that says how
    /// much it took) until they are all sent or it fails; an interrupted
    /// call is retried. Emptied, the buffer keeps its allocation.
    pub(crate) fn send_with(
        &mut self,
        mut send: impl FnMut(&[u8]) -> std::io::Result<usize>,
    ) -> std::io::Result<()> {
        while self.pending() > 0 {
            match send(&self.data[self.sent..]) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => self.sent += n,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        self.data.clear();
        self.sent = 0;
        Ok(())
    }

    /// Lets go of what was sent once it is at least half the buffer, so
    /// that a buffer that never empties (a peer that keeps up just short
    /// of the writer) does not grow without bound.
    pub(crate) fn compact(&mut self) {
        if self.sent > 0 && self.sent >= self.data.len() / 2 {
            self.data.drain(..self.sent);
            self.sent = 0;
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    match needle {
        [byte] => haystack.iter().position(|b| b == byte),
        _ => haystack.windows(needle.len()).position(|w| w == needle),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(buffer: &mut ReadBuffer, bytes: &[u8]) {
        let spare = buffer.spare(bytes.len());
        spare[..bytes.len()].copy_from_slice(bytes);
        buffer.filled(bytes.len());
    }

    #[test]
    fn a_large_message_does_not_keep_its_buffer() {
        let mut buffer = ReadBuffer::new();
        let large = vec![7u8; 1 << 20];
        fill(&mut buffer, &large);
        assert!(buffer.data.len() >= 1 << 20);
        buffer.consume(large.len() - 1);
        assert!(buffer.data.len() > SHRINK_ABOVE, "kept while bytes remain");
        buffer.consume(1);
        assert_eq!(buffer.data.len(), READ_CHUNK);
        fill(&mut buffer, b"next");
        assert_eq!(buffer.buffered(), b"next");
    }

    #[test]
    fn a_separator_split_over_two_reads_is_found() {
        let mut buffer = ReadBuffer::new();
        fill(&mut buffer, b"abc\r");
        assert_eq!(buffer.find(b"\r\n"), None);
        fill(&mut buffer, b"\ndef");
        assert_eq!(buffer.find(b"\r\n"), Some(3));
        assert_eq!(buffer.until(b"\r\n", 100), Until::Found(5));
    }

    #[test]
    fn a_line_arriving_in_many_reads_is_searched_once_and_found_after_a_consume() {
        let mut buffer = ReadBuffer::new();
        fill(&mut buffer, b"first\nsec");
        assert_eq!(buffer.until(b"\n", 100), Until::Found(6));
        buffer.consume(6);
        assert_eq!(buffer.until(b"\n", 100), Until::NotYet);
        fill(&mut buffer, b"ond");
        assert_eq!(buffer.until(b"\n", 100), Until::NotYet);
        fill(&mut buffer, b"\n");
        assert_eq!(buffer.until(b"\n", 100), Until::Found(7));
        assert_eq!(&buffer.buffered()[..7], b"second\n");
    }

    #[test]
    fn a_search_for_another_separator_starts_over() {
        let mut buffer = ReadBuffer::new();
        fill(&mut buffer, b"a;b\n");
        assert_eq!(buffer.find(b"\r\n"), None);
        assert_eq!(buffer.find(b";"), Some(1));
        assert_eq!(buffer.find(b"\n"), Some(3));
    }

    #[test]
    fn taken_bytes_move_to_the_front_when_that_makes_room() {
        let mut buffer = ReadBuffer::new();
        let chunk = vec![1u8; READ_CHUNK - 8];
        fill(&mut buffer, &chunk);
        buffer.consume(READ_CHUNK - 16);
        // 8 bytes left at the end of the buffer, 8 buffered: asking for 64
        // moves the 8 to the front instead of growing.
        let spare = buffer.spare(64).len();
        assert_eq!(buffer.data.len(), READ_CHUNK, "no growth");
        assert_eq!(spare, READ_CHUNK - 8);
        assert_eq!(buffer.buffered(), &[1u8; 8]);
    }

    #[test]
    fn the_buffer_grows_to_a_power_of_two_when_moving_is_not_enough() {
        let mut buffer = ReadBuffer::new();
        fill(&mut buffer, &vec![2u8; READ_CHUNK]);
        let spare = buffer.spare(100).len();
        assert_eq!(buffer.data.len(), (READ_CHUNK + 100).next_power_of_two());
        assert!(spare >= 100);
        assert_eq!(buffer.buffered().len(), READ_CHUNK, "nothing lost");
    }

    #[test]
    fn the_limit_counts_the_bytes_before_the_separator() {
        let mut buffer = ReadBuffer::new();
        fill(&mut buffer, b"12345\n");
        assert_eq!(buffer.until(b"\n", 5), Until::Found(6), "at the limit");
        assert_eq!(buffer.until(b"\n", 4), Until::Overrun, "past it");
        let mut buffer = ReadBuffer::new();
        fill(&mut buffer, b"12345");
        assert_eq!(buffer.until(b"\n", 5), Until::NotYet, "may still come");
        fill(&mut buffer, b"6");
        assert_eq!(buffer.until(b"\n", 5), Until::Overrun, "can no longer fit");
    }

    #[test]
    fn pending_counts_what_the_socket_has_not_taken() {
        let mut output = WriteBuffer::default();
        output.data.extend_from_slice(b"hello");
        output.sent = 2;
        assert_eq!(output.pending(), 3);
    }

    #[test]
    fn a_write_buffer_sends_in_pieces_retries_interrupts_and_keeps_what_was_refused() {
        let mut buffer = WriteBuffer::default();
        buffer.data.extend_from_slice(b"abcdefgh");
        let mut calls = 0;
        let mut taken = Vec::new();
        let refused = buffer.send_with(|data| {
            calls += 1;
            match calls {
                1 => Err(std::io::ErrorKind::Interrupted.into()),
                2 | 3 => {
                    taken.extend_from_slice(&data[..3]);
                    Ok(3)
                }
                _ => Err(std::io::ErrorKind::WouldBlock.into()),
            }
        });
        assert_eq!(refused.unwrap_err().kind(), std::io::ErrorKind::WouldBlock);
        assert_eq!(taken, b"abcdef");
        assert_eq!(buffer.pending(), 2);
        buffer.send_with(|data| Ok(data.len())).unwrap();
        assert_eq!(
            (buffer.pending(), buffer.data.len(), buffer.sent),
            (0, 0, 0)
        );
        buffer.data.extend_from_slice(b"x");
        let stuck = buffer.send_with(|_| Ok(0));
        assert_eq!(stuck.unwrap_err().kind(), std::io::ErrorKind::WriteZero);
    }

    #[test]
    fn a_write_buffer_lets_go_of_what_was_sent_once_it_is_half() {
        let mut buffer = WriteBuffer {
            data: b"0123456789".to_vec(),
            sent: 4,
        };
        buffer.compact();
        assert_eq!(
            (buffer.data.as_slice(), buffer.sent),
            (&b"0123456789"[..], 4)
        );
        buffer.sent = 5;
        buffer.compact();
        assert_eq!((buffer.data.as_slice(), buffer.sent), (&b"56789"[..], 0));
    }
}
