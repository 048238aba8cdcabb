//! A closed-loop TCP load generator: many connections on one thread, each
//! sending a request (or a pipeline of them), waiting for the whole answer,
//! and sending the next.
//!
//! It speaks the protocols of shardloop's example servers:
//!
//! * echo: `size` bytes out, the same number back;
//! * lookup: a 4-byte big-endian id out; a 4-byte big-endian length and that
//!   many bytes back;
//! * memcached (text protocol): `get` of a random key, or one time in ten a
//!   `set` of a `size`-byte value, and the whole reply back.
//!
//! It runs on one thread with edge-triggered epoll (mio), so that it takes
//! as little of the machine as possible from the server it measures.
//!
//! The `shardloop-load` binary (`src/main.rs`, its arguments in [`cli`])
//! runs it from the command line.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

pub mod cli;

/// What the connections speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `size` bytes out, the same bytes back.
    Echo { size: usize },
    /// A 4-byte id drawn from `0..keys` out; a 4-byte length and a value back.
    Lookup { keys: u32 },
    /// memcached's text protocol: nine `get`s of a key drawn from `0..keys`
    /// to one `set` of a `size`-byte value.
    Memcached { keys: u32, size: usize },
}

impl Protocol {
    /// The protocol's name: `echo`, `lookup` or `memcached`.
    pub fn name(&self) -> &'static str {
        match self {
            Protocol::Echo { .. } => "echo",
            Protocol::Lookup { .. } => "lookup",
            Protocol::Memcached { .. } => "memcached",
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub addr: SocketAddr,
    pub protocol: Protocol,
    pub connections: usize,
    pub duration: Duration,
    /// Requests each connection sends at once before it waits for their
    /// answers (1: one at a time).
    pub pipeline: usize,
    /// Print a progress line on stderr every second.
    pub progress: bool,
}

/// What a run measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Answers received in full.
    pub requests: u64,
    /// Connections that failed to connect, were closed by the server, or
    /// got more than a whole answer.
    pub errors: u64,
    pub elapsed: Duration,
    /// Every request's latency, sorted.
    latencies: Vec<Duration>,
}

impl Report {
    /// Answers per second.
    pub fn rate(&self) -> f64 {
        if self.elapsed.is_zero() {
            return 0.0;
        }
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    /// The `p`-th percentile latency (`p` in 0..=100), if any request
    /// finished.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        let last = self.latencies.len().checked_sub(1)?;
        let index = ((p / 100.0 * self.latencies.len() as f64) as usize).min(last);
        Some(self.latencies[index])
    }
}

/// One connection's request in flight.
struct Conn {
    stream: TcpStream,
    request: Vec<u8>,
    written: usize,
    /// Bytes of the answer received so far, and its first four bytes.
    received: usize,
    header: [u8; 4],
    /// The answer so far, for protocols parsed as a whole (memcached).
    answer: Vec<u8>,
    /// Answers still to come for the requests sent.
    outstanding: usize,
    started: Instant,
}

impl Conn {
    /// Takes `bytes` of the answer; returns how many of them completed it,
    /// if they did.
    fn take(&mut self, protocol: Protocol, bytes: &[u8]) -> io::Result<Option<usize>> {
        if let Protocol::Memcached { .. } = protocol {
            self.answer.extend_from_slice(bytes);
            return Ok(memcached_answer_len(&self.answer)?
                .map(|len| bytes.len() - (self.answer.len() - len)));
        }
        for (i, &byte) in bytes.iter().enumerate() {
            if self.received < 4 {
                self.header[self.received] = byte;
            }
            self.received += 1;
            let expected = match protocol {
                Protocol::Echo { size } => Some(size),
                _ => (self.received >= 4).then(|| 4 + u32::from_be_bytes(self.header) as usize),
            };
            if expected == Some(self.received) {
                return Ok(Some(i + 1));
            }
        }
        Ok(None)
    }

    /// Writes what is left of the request; `Ok(())` also when the socket is
    /// full (the rest goes at the next writable event).
    fn flush(&mut self) -> io::Result<()> {
        while self.written < self.request.len() {
            match self.stream.write(&self.request[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }
}

/// The length of the memcached reply at the start of `buf`, once it is all
/// there: `VALUE` blocks up to `END`, or one status line (`STORED`, `END`,
/// `NOT_FOUND`, ...). An error line is an error.
fn memcached_answer_len(buf: &[u8]) -> io::Result<Option<usize>> {
    let mut at = 0;
    loop {
        let Some(eol) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = &buf[at..at + eol];
        let next = at + eol + 2;
        if let Some(rest) = line.strip_prefix(b"VALUE ") {
            // VALUE <key> <flags> <bytes> [<cas>]
            let len = rest
                .split(|&b| b == b' ')
                .nth(2)
                .and_then(|t| std::str::from_utf8(t).ok()?.parse::<usize>().ok())
                .ok_or_else(|| io::Error::other("a VALUE line without a length"))?;
            at = next + len + 2;
            if buf.len() < at {
                return Ok(None);
            }
            continue;
        }
        if line == b"ERROR"
            || line.starts_with(b"CLIENT_ERROR")
            || line.starts_with(b"SERVER_ERROR")
        {
            return Err(io::Error::other(format!(
                "the server answered {:?}",
                String::from_utf8_lossy(line)
            )));
        }
        return Ok(Some(next));
    }
}

/// `n` with thousands separators: 1234567 -> "1,234,567".
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// A small, fast generator of ids (xorshift64*).
struct Ids(u64);

impl Ids {
    fn next_below(&mut self, bound: u32) -> u32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (((x >> 32) * u64::from(bound)) >> 32) as u32
    }
}

struct Run {
    protocol: Protocol,
    pipeline: usize,
    ids: Ids,
    report: Report,
    scratch: Vec<u8>,
}

/// Sends the connection's next `pipeline` requests (echo requests are all
/// alike: built once).
fn next_requests(
    protocol: Protocol,
    ids: &mut Ids,
    pipeline: usize,
    conn: &mut Conn,
) -> io::Result<()> {
    if !matches!(protocol, Protocol::Echo { .. }) {
        conn.request.clear();
    }
    for _ in 0..pipeline {
        match protocol {
            Protocol::Echo { .. } => {}
            Protocol::Lookup { keys } => {
                let id = ids.next_below(keys.max(1));
                conn.request.extend_from_slice(&id.to_be_bytes());
            }
            Protocol::Memcached { keys, size } => {
                let id = ids.next_below(keys.max(1));
                if ids.next_below(10) == 0 {
                    let _ = write!(conn.request, "set key:{id} 0 0 {size}\r\n");
                    conn.request.resize(conn.request.len() + size, b'v');
                    conn.request.extend_from_slice(b"\r\n");
                } else {
                    let _ = write!(conn.request, "get key:{id}\r\n");
                }
            }
        }
    }
    conn.outstanding = pipeline;
    conn.written = 0;
    conn.received = 0;
    conn.answer.clear();
    conn.started = Instant::now();
    conn.flush()
}

impl Run {
    /// Reads until the socket is empty, counting each answer as it is
    /// whole and sending the next requests once all are in. `Err` ends the
    /// connection.
    fn read(&mut self, conn: &mut Conn) -> io::Result<()> {
        loop {
            let n = match conn.stream.read(&mut self.scratch) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err),
            };
            let mut rest = &self.scratch[..n];
            while let Some(used) = conn.take(self.protocol, rest)? {
                rest = &rest[used..];
                self.report.latencies.push(conn.started.elapsed());
                self.report.requests += 1;
                conn.received = 0;
                conn.answer.clear();
                conn.outstanding -= 1;
                if conn.outstanding == 0 {
                    if !rest.is_empty() {
                        return Err(io::Error::other("the server sent more answers than asked"));
                    }
                    next_requests(self.protocol, &mut self.ids, self.pipeline, conn)?;
                    break;
                }
                if rest.is_empty() {
                    break;
                }
            }
        }
    }
}

/// Connects, drives the server for `options.duration`, and reports.
/// Connections that fail count as errors; the run fails only if none
/// connects.
pub fn run(options: &Options) -> io::Result<Report> {
    let mut poll = Poll::new()?;
    if options.pipeline == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "pipeline must be at least 1",
        ));
    }
    let mut run = Run {
        protocol: options.protocol,
        pipeline: options.pipeline,
        ids: Ids(0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id())),
        report: Report::default(),
        scratch: vec![0; 64 * 1024],
    };
    let request = match options.protocol {
        Protocol::Echo { size } => vec![b'x'; size.max(1) * options.pipeline],
        Protocol::Lookup { .. } | Protocol::Memcached { .. } => Vec::new(),
    };
    if let Protocol::Echo { size: 0 } = options.protocol {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "echo size must be at least 1",
        ));
    }
    let mut conns: Vec<Option<Conn>> = Vec::with_capacity(options.connections);
    let mut last_error = None;
    for index in 0..options.connections {
        let connected = std::net::TcpStream::connect(options.addr).and_then(|stream| {
            stream.set_nodelay(true)?;
            stream.set_nonblocking(true)?;
            let mut stream = TcpStream::from_std(stream);
            poll.registry().register(
                &mut stream,
                Token(index),
                Interest::READABLE | Interest::WRITABLE,
            )?;
            Ok(stream)
        });
        match connected {
            Ok(stream) => conns.push(Some(Conn {
                stream,
                request: request.clone(),
                written: 0,
                received: 0,
                header: [0; 4],
                answer: Vec::new(),
                outstanding: 0,
                started: Instant::now(),
            })),
            Err(err) => {
                run.report.errors += 1;
                last_error = Some(err);
                conns.push(None);
            }
        }
    }
    if conns.iter().all(Option::is_none) {
        return Err(last_error.unwrap_or_else(|| io::Error::other("no connections asked for")));
    }

    let start = Instant::now();
    let deadline = start + options.duration;
    for slot in &mut conns {
        if let Some(conn) = slot {
            if next_requests(run.protocol, &mut run.ids, run.pipeline, conn).is_err() {
                run.report.errors += 1;
                *slot = None;
            }
        }
    }
    let mut events = Events::with_capacity(1024);
    let mut next_tick = start + Duration::from_secs(1);
    let mut at_last_tick = 0;
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if options.progress && now >= next_tick {
            let done = run.report.requests;
            eprint!(
                "\r  {:4.1}/{:.0}s  {:>9} req/s  {:>11} requests",
                (now - start).as_secs_f64(),
                options.duration.as_secs_f64(),
                grouped(done - at_last_tick),
                grouped(done)
            );
            at_last_tick = done;
            next_tick += Duration::from_secs(1);
        }
        let wait = deadline.min(next_tick).saturating_duration_since(now);
        match poll.poll(&mut events, Some(wait)) {
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            other => other?,
        }
        for event in events.iter() {
            let slot = &mut conns[event.token().0];
            let Some(conn) = slot else { continue };
            let mut outcome = Ok(());
            if event.is_writable() {
                outcome = conn.flush();
            }
            if outcome.is_ok() && (event.is_readable() || event.is_read_closed()) {
                outcome = run.read(conn);
            }
            if outcome.is_err() || event.is_error() {
                run.report.errors += 1;
                let _ = poll.registry().deregister(&mut conn.stream);
                *slot = None;
            }
        }
        if conns.iter().all(Option::is_none) {
            break;
        }
    }
    if options.progress {
        eprintln!();
    }
    run.report.elapsed = start.elapsed();
    run.report.latencies.sort_unstable();
    Ok(run.report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    /// A blocking lookup server for one connection: answers id N with N
    /// bytes' worth of value, capped.
    fn lookup_server(listener: TcpListener) {
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_nodelay(true).unwrap();
        let mut id = [0; 4];
        while stream.read_exact(&mut id).is_ok() {
            let len = (u32::from_be_bytes(id) % 50) as usize;
            let mut answer = (len as u32).to_be_bytes().to_vec();
            answer.extend(std::iter::repeat_n(b'v', len));
            if stream.write_all(&answer).is_err() {
                break;
            }
        }
    }

    /// One connection to `addr` for `duration`, without a progress line.
    fn one_connection(
        addr: std::net::SocketAddr,
        protocol: Protocol,
        duration: Duration,
        pipeline: usize,
    ) -> io::Result<Report> {
        run(&Options {
            addr,
            protocol,
            connections: 1,
            duration,
            pipeline,
            progress: false,
        })
    }

    /// A lookup server for one connection, on a thread, and its address.
    fn start_lookup_server() -> (std::net::SocketAddr, thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        (addr, thread::spawn(move || lookup_server(listener)))
    }

    #[test]
    fn memcached_replies_are_found_whole() {
        let len = |buf: &[u8]| memcached_answer_len(buf).unwrap();
        assert_eq!(len(b"STORED\r\n"), Some(8));
        assert_eq!(len(b"STOR"), None);
        assert_eq!(len(b"END\r\n"), Some(5));
        let hit = b"VALUE key:1 0 5\r\nEND\r\n\r\nEND\r\n";
        assert_eq!(len(hit), Some(hit.len()), "a value may hold END");
        assert_eq!(len(&hit[..hit.len() - 1]), None);
        assert_eq!(len(b"VALUE key:1 0 5 42\r\nvalue\r\n"), None);
        assert!(memcached_answer_len(b"SERVER_ERROR out of memory\r\n").is_err());
        assert!(memcached_answer_len(b"VALUE key:1 0 x\r\n").is_err());
    }

    #[test]
    fn counts_are_grouped_by_thousands() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(grouped(1_234_567), "1,234,567");
    }

    #[test]
    fn drives_a_lookup_server_and_counts_every_answer() {
        let (addr, server) = start_lookup_server();
        let lookups = Protocol::Lookup { keys: 1000 };
        let report = one_connection(addr, lookups, Duration::from_millis(300), 1).unwrap();
        assert!(report.requests > 10, "{report:?}");
        assert_eq!(report.errors, 0);
        let p50 = report.percentile(50.0).unwrap();
        assert!(p50 <= report.percentile(99.0).unwrap());
        drop(server);
    }

    #[test]
    fn pipelined_requests_are_each_counted() {
        let (addr, server) = start_lookup_server();
        let lookups = Protocol::Lookup { keys: 1000 };
        let report = one_connection(addr, lookups, Duration::from_millis(300), 8).unwrap();
        assert_eq!(report.errors, 0, "{report:?}");
        assert!(report.requests > 80, "{report:?}");
        drop(server);
    }

    #[test]
    fn a_server_that_closes_counts_as_an_error() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = thread::spawn(move || drop(listener.accept().unwrap()));
        let echoes = Protocol::Echo { size: 8 };
        let report = one_connection(addr, echoes, Duration::from_secs(5), 1).unwrap();
        server.join().unwrap();
        assert_eq!(report.requests, 0);
        assert_eq!(report.errors, 1);
        assert!(
            report.elapsed < Duration::from_secs(5),
            "stops once no connection is left"
        );
    }

    #[test]
    fn nothing_listening_is_an_error() {
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let result = run(&Options {
            addr,
            protocol: Protocol::Echo { size: 8 },
            connections: 2,
            duration: Duration::from_millis(100),
            pipeline: 1,
            progress: false,
        });
        assert!(result.is_err());
    }
}
