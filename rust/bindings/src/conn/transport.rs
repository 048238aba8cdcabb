//! `Transport`: asyncio's socket transport for a shard loop, with its I/O in
//! Rust. It is what `loop.create_server`, `loop.create_connection`,
//! `loop.connect_accepted_socket` and the streams API built on them hand a
//! protocol on a shard (`ShardLoop._make_socket_transport`).
//!
//! A Rust task of the shard reads while the protocol wants data, with the
//! GIL released, and the driver hands what arrived to the protocol
//! (`data_received`, or `get_buffer`/`buffer_updated`) in the pass that
//! follows the poll: no selector event, no handle, no turn of the loop.
//! `write` queues, and when the loop's turn ends every transport's bytes are
//! sent (the GIL released; a buffer past the high water mark goes at once);
//! a Rust task sends what the socket did not take. Everything else follows
//! asyncio's `_SelectorSocketTransport`: its messages, its flow control (the
//! high and low water marks, `pause_writing`/`resume_writing`), and the
//! order of the protocol's callbacks (`connection_made` and
//! `connection_lost` scheduled with `call_soon`, `connection_lost` only once
//! what was written is sent). Two differences a protocol can see:
//! `get_write_buffer_size()` counts a small write until its turn ends, and
//! the `connection_lost` of a transport closed with bytes pending comes one
//! pass of the loop after the last byte is sent, not in the same one.
//!
//! The Python socket owns the descriptor; the transport registers it with
//! the shard's reactor and deregisters it before the socket is closed, as
//! asyncio removes its reader before it closes.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyMemoryView};
use shardloop_core::Async;

use super::buffer::{ReadBuffer, WriteBuffer, READ_CHUNK};
use crate::context::{self, EndOfTurn, Incoming, PythonWork};
use crate::errors;
use crate::future::in_context;
use crate::home::Home;

/// asyncio's default high water mark for writing; the low one is a quarter.
const HIGH_WATER: usize = 64 * 1024;
/// At most this much is read for one delivery (asyncio's `max_size`).
const MAX_READ: usize = 256 * 1024;
/// Writes after the connection is lost are dropped; from this many on,
/// each is logged (asyncio's `LOG_THRESHOLD_FOR_CONNLOST_WRITES`).
const LOST_WRITES_LOGGED: u32 = 5;

/// The descriptor of the Python socket that owns it.
struct Socket(RawFd);

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

fn syscall_result(n: isize) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

fn recv(fd: RawFd, into: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `into` is valid for writes of its length for the call.
    syscall_result(unsafe { libc::recv(fd, into.as_mut_ptr().cast(), into.len(), 0) })
}

fn send(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is valid for reads of its length for the call; no
    // SIGPIPE for a peer that went away (the error says it).
    syscall_result(unsafe { libc::send(fd, data.as_ptr().cast(), data.len(), libc::MSG_NOSIGNAL) })
}

fn shutdown_write(fd: RawFd) {
    // SAFETY: shutdown only acts on the descriptor; a bad one fails.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
}

/// The Python objects a transport holds while its connection lives.
struct Objects {
    /// The transport itself, which stays alive until its connection is
    /// lost (or its loop closes), as asyncio's selector keeps a reading
    /// transport alive.
    me: Option<Py<Transport>>,
    /// The `contextvars` context the protocol's callbacks run in: a copy
    /// of the one the transport was made in.
    context: Py<PyAny>,
    event_loop: Py<PyAny>,
    sock: Py<PyAny>,
    protocol: Py<PyAny>,
    /// The protocol is an `asyncio.BufferedProtocol`.
    buffered: bool,
    server: Option<Py<PyAny>>,
}

/// A transport's state; lives on its shard's thread.
struct Inner {
    fd: RawFd,
    /// Registered with the reactor until the connection is lost.
    io: RefCell<Option<Async<Socket>>>,
    input: RefCell<ReadBuffer>,
    output: RefCell<WriteBuffer>,
    /// The peer closed its side: `eof_received` is due once the bytes
    /// before it are delivered.
    read_eof: Cell<bool>,
    eof_delivered: Cell<bool>,
    read_error: RefCell<Option<io::Error>>,
    write_error: RefCell<Option<io::Error>>,
    /// `pause_reading` was called.
    paused: Cell<bool>,
    /// `close` (or a fatal error) was called, or the connection is lost.
    closing: Closing,
    /// `write_eof` was called (asyncio's `_eof`): the sending side is shut
    /// down once the buffer is sent.
    eof_written: Cell<bool>,
    /// asyncio's `_conn_lost`: `connection_lost` is scheduled (and writes
    /// after it are counted and dropped).
    conn_lost: Cell<u32>,
    /// The descriptor is deregistered: `connection_lost` ran, or the
    /// transport was released with its loop or dropped.
    lost: Cell<bool>,
    protocol_paused: Cell<bool>,
    high: Cell<usize>,
    low: Cell<usize>,
    /// The reader task, parked until the protocol wants data again (or
    /// the socket is readable).
    reader: RefCell<Option<Waker>>,
    /// The writer task, parked until the socket is writable.
    writer: RefCell<Option<Waker>>,
    reader_started: Cell<bool>,
    /// The writer task is sending what the socket did not take at once.
    writing: Cell<bool>,
    /// Registered to be sent when the turn ends.
    queued: Cell<bool>,
    /// Waiting in the inbox for the driver (see `PythonWork`).
    notified: Cell<bool>,
    /// `Server._attach`/`_detach` take the transport (3.13 on).
    detach_with_transport: bool,
    objects: RefCell<Option<Objects>>,
}

/// Whether a transport is closing: shared with its Python object, which
/// any thread may ask (a `StreamWriter` collected elsewhere asks its
/// transport `is_closing()`).
#[derive(Clone, Default)]
struct Closing(Arc<AtomicBool>);

impl Closing {
    fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, closing: bool) {
        self.0.store(closing, Ordering::Relaxed);
    }

    fn replace(&self, closing: bool) -> bool {
        self.0.swap(closing, Ordering::Relaxed)
    }
}

impl Inner {
    /// Whether something read waits for the protocol: bytes, the end of
    /// the stream or a read error.
    fn has_undelivered(&self) -> bool {
        !self.input.borrow().buffered().is_empty()
            || (self.read_eof.get() && !self.eof_delivered.get())
            || self.read_error.borrow().is_some()
    }

    /// Whether the protocol wants what arrives.
    fn wants_data(&self) -> bool {
        !self.paused.get() && !self.closing.get() && self.conn_lost.get() == 0 && !self.lost.get()
    }

    /// Clones what `f` picks from the objects, or `None` once they are gone
    /// (no borrow is held when it returns).
    fn object<T>(&self, f: impl FnOnce(&Objects) -> T) -> Option<T> {
        self.objects.borrow().as_ref().map(f)
    }

    fn protocol(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.object(|o| o.protocol.clone_ref(py))
    }

    fn event_loop(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.object(|o| o.event_loop.clone_ref(py))
    }

    fn me(&self, py: Python<'_>) -> Option<Py<Transport>> {
        self.object(|o| o.me.as_ref().map(|me| me.clone_ref(py)))
            .flatten()
    }

    /// Has the driver run `PythonWork::run` at its next pass.
    fn notify(self: &Rc<Self>) {
        if !self.notified.replace(true) {
            context::arrive(Incoming::Work(self.clone()));
        }
    }

    fn wake_reader(&self) {
        let waker = self.reader.borrow_mut().take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Stops watching the descriptor, and wakes the tasks that waited on
    /// it so that they end (and let go of the transport's state).
    fn deregister(&self) {
        self.lost.set(true);
        self.closing.set(true);
        let io = self.io.borrow_mut().take();
        drop(io);
        self.wake_reader();
        let writer = self.writer.borrow_mut().take();
        if let Some(waker) = writer {
            waker.wake();
        }
    }

    // ---- the reader task (no GIL) ----

    fn start_reader(self: &Rc<Self>) {
        if self.reader_started.replace(true) {
            return;
        }
        let inner = self.clone();
        drop(shardloop_core::spawn_local(async move {
            std::future::poll_fn(|cx| inner.poll_read(cx)).await;
        }));
    }

    /// Reads while the protocol wants data and what was read is delivered;
    /// ends when the connection is lost.
    fn poll_read(self: &Rc<Self>, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.lost.get() {
                return Poll::Ready(());
            }
            let idle = !self.wants_data() || self.read_eof.get() || self.has_undelivered();
            if idle {
                *self.reader.borrow_mut() = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let io = self.io.borrow();
            let Some(io) = io.as_ref() else {
                return Poll::Ready(());
            };
            if io.poll_readable(cx).is_pending() {
                // Kept here too: a lost connection wakes the task to end it
                // (the reactor forgets its waker when the descriptor goes).
                *self.reader.borrow_mut() = Some(cx.waker().clone());
                return Poll::Pending;
            }
            if self.fill(io) {
                self.notify();
            }
        }
    }

    /// Reads what the socket has, up to `MAX_READ`. Returns whether it made
    /// progress (data, end of stream or an error).
    fn fill(&self, io: &Async<Socket>) -> bool {
        let mut input = self.input.borrow_mut();
        let mut total = 0;
        loop {
            let spare = input.spare(READ_CHUNK);
            let offered = spare.len();
            match recv(self.fd, spare) {
                Ok(0) => {
                    self.read_eof.set(true);
                    return true;
                }
                Ok(n) => {
                    input.filled(n);
                    total += n;
                    if n < offered {
                        // A short read from a stream socket drained it.
                        io.clear_readable();
                        return true;
                    }
                    if total >= MAX_READ {
                        return true;
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    io.clear_readable();
                    return total > 0;
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    *self.read_error.borrow_mut() = Some(err);
                    return true;
                }
            }
        }
    }

    // ---- sending (no GIL) ----

    /// Sends from the write buffer until it is empty or the socket is full.
    fn flush(&self) -> io::Result<()> {
        self.output
            .borrow_mut()
            .send_with(|data| send(self.fd, data))
    }

    /// Sends what was queued; leaves the rest to the writer task.
    fn send_queued(self: &Rc<Self>) {
        self.queued.set(false);
        if self.writing.get() || self.lost.get() {
            return;
        }
        match self.flush() {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => self.start_writer(),
            result => self.sent(result),
        }
    }

    /// What follows a send that finished (`Ok`: everything is sent).
    fn sent(self: &Rc<Self>, result: io::Result<()>) {
        match result {
            Ok(()) => {
                if self.eof_written.get() {
                    shutdown_write(self.fd);
                }
                if self.closing.get() || self.protocol_paused.get() {
                    // connection_lost, or resume_writing.
                    self.notify();
                }
            }
            Err(err) => {
                *self.write_error.borrow_mut() = Some(err);
                self.notify();
            }
        }
    }

    fn start_writer(self: &Rc<Self>) {
        if self.writing.replace(true) {
            return;
        }
        if self.protocol_paused.get() {
            // Python may resume the protocol as the buffer drains.
            self.notify();
        }
        let inner = self.clone();
        drop(shardloop_core::spawn_local(async move {
            let result = std::future::poll_fn(|cx| inner.poll_send(cx)).await;
            inner.writing.set(false);
            if !inner.lost.get() {
                inner.sent(result);
            }
        }));
    }

    fn poll_send(self: &Rc<Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let io = self.io.borrow();
            let Some(io) = io.as_ref() else {
                return Poll::Ready(Ok(()));
            };
            match self.flush() {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    io.clear_writable();
                    if self.protocol_paused.get()
                        && self.output.borrow().pending() <= self.low.get()
                    {
                        // resume_writing is due at the low water mark,
                        // not once everything is sent.
                        self.notify();
                    }
                    if io.poll_writable(cx).is_pending() {
                        *self.writer.borrow_mut() = Some(cx.waker().clone());
                        return Poll::Pending;
                    }
                }
                result => return Poll::Ready(result),
            }
        }
    }

    fn send_at_end_of_turn(self: &Rc<Self>) {
        if !self.writing.get() && !self.queued.replace(true) {
            context::at_end_of_turn(self.clone());
        }
    }

    // ---- the protocol's side (GIL held) ----

    /// Hands what arrived to the protocol while it wants it, then the end of
    /// the stream or the read error.
    fn deliver(self: &Rc<Self>, py: Python<'_>) -> PyResult<()> {
        while self.wants_data() {
            let Some((protocol, buffered)) =
                self.object(|o| (o.protocol.clone_ref(py), o.buffered))
            else {
                return Ok(());
            };
            let protocol = protocol.bind(py);
            if !self.input.borrow().buffered().is_empty() {
                if buffered {
                    self.deliver_into_buffer(py, protocol)?;
                } else {
                    let data = {
                        let mut input = self.input.borrow_mut();
                        let data = PyBytes::new(py, input.buffered());
                        input.consume(data.as_bytes().len());
                        data
                    };
                    if let Err(err) = protocol.call_method1(intern!(py, "data_received"), (data,)) {
                        return self.protocol_failed(
                            py,
                            err,
                            "Fatal error: protocol.data_received() call failed.",
                        );
                    }
                }
                continue;
            }
            let read_error = self.read_error.borrow_mut().take();
            if let Some(err) = read_error {
                return self.fatal_error(py, err.into(), "Fatal read error on socket transport");
            }
            if self.read_eof.get() && !self.eof_delivered.replace(true) {
                match protocol
                    .call_method0(intern!(py, "eof_received"))
                    .and_then(|keep_open| keep_open.is_truthy())
                {
                    // Kept open: nothing more is read (asyncio removes its
                    // reader), and the protocol may still write.
                    Ok(true) => {}
                    Ok(false) => self.close(py)?,
                    Err(err) => {
                        return self.protocol_failed(
                            py,
                            err,
                            "Fatal error: protocol.eof_received() call failed.",
                        )
                    }
                }
            }
            break;
        }
        Ok(())
    }

    /// A `BufferedProtocol`'s delivery: what arrived is copied into the
    /// buffers it gives, as much as each takes.
    fn deliver_into_buffer(
        self: &Rc<Self>,
        py: Python<'_>,
        protocol: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        // asyncio's two steps and their messages: the protocol's call,
        // then `recv_into` the buffer it gave.
        let given = protocol
            .call_method1(intern!(py, "get_buffer"), (-1,))
            .and_then(|buffer| {
                if buffer.len()? == 0 {
                    return Err(PyRuntimeError::new_err(
                        "get_buffer() returned an empty buffer",
                    ));
                }
                Ok(buffer)
            });
        let buffer = match given {
            Ok(buffer) => buffer,
            Err(err) => {
                return self.protocol_failed(
                    py,
                    err,
                    "Fatal error: protocol.get_buffer() call failed.",
                )
            }
        };
        let view = match writable_bytes(&buffer) {
            Ok(view) => view,
            Err(err) => {
                return self.protocol_failed(py, err, "Fatal read error on socket transport")
            }
        };
        let copied = {
            let mut input = self.input.borrow_mut();
            let data = input.buffered();
            let n = data.len().min(view.len_bytes());
            // SAFETY: the view is held (so the buffer stays put), writable,
            // contiguous and at least `n` bytes long; `data` is ours, so the
            // two cannot overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(data.as_ptr(), view.buf_ptr().cast::<u8>(), n);
            }
            input.consume(n);
            n
        };
        drop(view);
        if let Err(err) = protocol.call_method1(intern!(py, "buffer_updated"), (copied,)) {
            return self.protocol_failed(
                py,
                err,
                "Fatal error: protocol.buffer_updated() call failed.",
            );
        }
        Ok(())
    }

    /// What the sending side left for Python: a write error, the
    /// `connection_lost` of a transport closed with bytes still to send,
    /// or `resume_writing`.
    fn after_sending(self: &Rc<Self>, py: Python<'_>) -> PyResult<()> {
        let write_error = self.write_error.borrow_mut().take();
        if let Some(err) = write_error {
            *self.output.borrow_mut() = WriteBuffer::default();
            return self.fatal_error(py, err.into(), "Fatal write error on socket transport");
        }
        if self.writing.get() || self.queued.get() {
            return self.maybe_resume_protocol(py);
        }
        if self.output.borrow().pending() == 0 {
            self.maybe_resume_protocol(py)?;
            if self.closing.get() && self.conn_lost.get() == 0 && !self.lost.get() {
                self.conn_lost.set(1);
                self.schedule_connection_lost(py, None)?;
            }
        }
        Ok(())
    }

    /// A protocol method raised `err`: what stops a loop goes on, anything
    /// else is the transport's fatal error.
    fn protocol_failed(self: &Rc<Self>, py: Python<'_>, err: PyErr, message: &str) -> PyResult<()> {
        if errors::stops_a_loop(py, &err) {
            return Err(err);
        }
        self.fatal_error(py, err, message)
    }

    /// asyncio's `_fatal_error`: reported (an `OSError` only in debug mode,
    /// as the peer's doing), then the transport is closed at once.
    fn fatal_error(self: &Rc<Self>, py: Python<'_>, err: PyErr, message: &str) -> PyResult<()> {
        let exc = errors::exception_with_traceback(py, err);
        if let Some(event_loop) = self.event_loop(py) {
            let event_loop = event_loop.bind(py);
            if exc.is_instance_of::<pyo3::exceptions::PyOSError>() {
                let debug = event_loop
                    .call_method0(intern!(py, "get_debug"))
                    .and_then(|d| d.is_truthy())
                    .unwrap_or(false);
                if debug {
                    let logger = py.import("asyncio.log")?.getattr("logger")?;
                    let kwargs = PyDict::new(py);
                    kwargs.set_item("exc_info", &exc)?;
                    let me = self.me(py);
                    logger.call_method("debug", ("%r: %s", me, message), Some(&kwargs))?;
                }
            } else {
                let context = PyDict::new(py);
                context.set_item("message", message)?;
                context.set_item("exception", &exc)?;
                context.set_item("transport", self.me(py))?;
                context.set_item("protocol", self.protocol(py))?;
                event_loop.call_method1(intern!(py, "call_exception_handler"), (context,))?;
            }
        }
        self.force_close(py, Some(exc.into_any().unbind()))
    }

    /// asyncio's `_force_close`: what is buffered is dropped and
    /// `connection_lost(exc)` is scheduled.
    fn force_close(self: &Rc<Self>, py: Python<'_>, exc: Option<Py<PyAny>>) -> PyResult<()> {
        if self.conn_lost.get() > 0 || self.lost.get() {
            return Ok(());
        }
        *self.output.borrow_mut() = WriteBuffer::default();
        self.closing.set(true);
        self.conn_lost.set(self.conn_lost.get() + 1);
        self.schedule_connection_lost(py, exc)
    }

    fn schedule_connection_lost(&self, py: Python<'_>, exc: Option<Py<PyAny>>) -> PyResult<()> {
        let (Some(event_loop), Some(me)) = (self.event_loop(py), self.me(py)) else {
            return Ok(());
        };
        let lost = me.bind(py).getattr(intern!(py, "_call_connection_lost"))?;
        event_loop
            .bind(py)
            .call_method1(intern!(py, "call_soon"), (lost, exc))?;
        Ok(())
    }

    fn close(self: &Rc<Self>, py: Python<'_>) -> PyResult<()> {
        if self.closing.replace(true) {
            return Ok(());
        }
        if self.output.borrow().pending() == 0 {
            self.conn_lost.set(self.conn_lost.get() + 1);
            self.schedule_connection_lost(py, None)?;
        }
        // Otherwise the send that empties the buffer loses the connection.
        Ok(())
    }

    /// Stops watching the descriptor and lets go of the Python objects;
    /// returns them for the caller to use and drop with nothing borrowed.
    fn release(&self) -> Option<Objects> {
        self.deregister();
        self.objects.borrow_mut().take()
    }

    /// asyncio's `_call_connection_lost`: the protocol hears of it, then the
    /// socket is closed and the server counts the connection gone.
    fn connection_lost(&self, py: Python<'_>, exc: Option<Py<PyAny>>) -> PyResult<()> {
        if self.lost.get() {
            return Ok(());
        }
        let Some(objects) = self.release() else {
            return Ok(());
        };
        let told = objects
            .protocol
            .bind(py)
            .call_method1(intern!(py, "connection_lost"), (exc,));
        let closed = objects.sock.bind(py).call_method0(intern!(py, "close"));
        let detached = match (&objects.server, &objects.me) {
            (Some(server), Some(me)) if self.detach_with_transport => server
                .bind(py)
                .call_method1(intern!(py, "_detach"), (me,))
                .map(drop),
            (Some(server), _) => server
                .bind(py)
                .call_method0(intern!(py, "_detach"))
                .map(drop),
            _ => Ok(()),
        };
        drop(objects);
        told?;
        closed?;
        detached
    }

    /// asyncio's `_maybe_pause_protocol`.
    fn maybe_pause_protocol(&self, py: Python<'_>) -> PyResult<()> {
        if self.output.borrow().pending() <= self.high.get() || self.protocol_paused.replace(true) {
            return Ok(());
        }
        self.call_flow_control(py, "pause_writing")
    }

    /// asyncio's `_maybe_resume_protocol`.
    fn maybe_resume_protocol(&self, py: Python<'_>) -> PyResult<()> {
        if !self.protocol_paused.get() || self.output.borrow().pending() > self.low.get() {
            return Ok(());
        }
        self.protocol_paused.set(false);
        self.call_flow_control(py, "resume_writing")
    }

    fn call_flow_control(&self, py: Python<'_>, method: &str) -> PyResult<()> {
        let Some(protocol) = self.protocol(py) else {
            return Ok(());
        };
        let Err(err) = protocol.bind(py).call_method0(method) else {
            return Ok(());
        };
        if errors::stops_a_loop(py, &err) {
            return Err(err);
        }
        let Some(event_loop) = self.event_loop(py) else {
            return Ok(());
        };
        let context = PyDict::new(py);
        context.set_item("message", format!("protocol.{method}() failed"))?;
        context.set_item("exception", errors::exception_with_traceback(py, err))?;
        context.set_item("transport", self.me(py))?;
        context.set_item("protocol", protocol)?;
        event_loop
            .bind(py)
            .call_method1(intern!(py, "call_exception_handler"), (context,))?;
        Ok(())
    }

    /// Appends `data` to what is to be sent (asyncio's `write`, after its
    /// checks). A buffer past the high water mark is sent at once, as
    /// asyncio sends every write at once; a smaller one when the turn ends.
    fn write(self: &Rc<Self>, py: Python<'_>, data: &[u8]) -> PyResult<()> {
        if data.is_empty() || !self.may_write(py)? {
            return Ok(());
        }
        let mut output = self.output.borrow_mut();
        output.compact();
        output.data.extend_from_slice(data);
        drop(output);
        self.written(py)
    }

    fn written(self: &Rc<Self>, py: Python<'_>) -> PyResult<()> {
        if self.output.borrow().pending() > self.high.get() && !self.writing.get() {
            // (`write` refuses data after `write_eof`: no shutdown is due
            // here. A send registered for the end of the turn finds
            // nothing left, and then does what follows a finished send.)
            match self.flush() {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => self.start_writer(),
                Err(err) => {
                    return self.fatal_error(
                        py,
                        err.into(),
                        "Fatal write error on socket transport",
                    )
                }
            }
        } else {
            self.send_at_end_of_turn();
        }
        self.maybe_pause_protocol(py)
    }

    /// Whether a write may go on; counts (and past a few, logs) the writes
    /// made after the connection was lost, which are dropped.
    fn may_write(&self, py: Python<'_>) -> PyResult<bool> {
        let dropped = self.conn_lost.get();
        if dropped == 0 && !self.lost.get() {
            return Ok(true);
        }
        if dropped >= LOST_WRITES_LOGGED {
            py.import("asyncio.log")?
                .getattr("logger")?
                .call_method1("warning", ("socket.send() raised exception.",))?;
        }
        self.conn_lost.set(dropped + 1);
        Ok(false)
    }
}

impl PythonWork for Inner {
    /// Delivers what arrived and handles what the sends left, in the
    /// context the transport was made in (as asyncio runs its reader's and
    /// writer's callbacks). Whatever happens, the reader is woken again if
    /// the protocol still wants data; an error other than one that stops
    /// the loop is reported and closes the transport.
    fn run(self: Rc<Self>, py: Python<'_>) -> PyResult<()> {
        self.notified.set(false);
        let Some(context) = self.object(|o| o.context.clone_ref(py)) else {
            return Ok(());
        };
        let done = in_context(py, context.bind(py), || {
            let delivered = self.deliver(py);
            let handled = self.after_sending(py);
            delivered.and(handled)
        });
        if self.wants_data() {
            self.wake_reader();
        }
        match done {
            Err(err) if !errors::stops_a_loop(py, &err) => {
                self.fatal_error(py, err, "Fatal error on socket transport")
            }
            done => done,
        }
    }
}

impl EndOfTurn for Inner {
    fn end_turn(self: Rc<Self>) {
        self.send_queued();
    }
}

/// What a `Transport` object does when it goes: nothing is left to do but
/// stop watching its descriptor (the Python side is gone with it).
fn forget(inner: Rc<Inner>) {
    inner.deregister();
}

const A_TRANSPORT: &str = "a Transport";

/// Transport(loop, sock, protocol, extra, server, detach_with_transport, /)
/// --
///
/// asyncio's socket transport on a shard loop, with its reads, writes and
/// the protocol's delivery in Rust. Made by the loop (``create_server``,
/// ``create_connection``, ``connect_accepted_socket``), not by hand.
#[pyclass(module = "shardloop._shardloop", frozen, weakref)]
pub(crate) struct Transport {
    home: Home<Inner>,
    /// What `get_extra_info` knows (any thread may ask).
    extra: Py<PyDict>,
    closing: Closing,
}

impl Transport {
    /// The state, on its shard's thread. A transport whose runtime ended
    /// was released with its loop: it is lost, and its methods act as on
    /// any closed transport.
    fn inner(&self) -> PyResult<&Rc<Inner>> {
        self.home.local()
    }
}

#[pymethods]
impl Transport {
    /// The transport of `sock` (a connected stream socket, which it takes
    /// over) for `protocol`, on the running shard loop `event_loop`; the
    /// loop's `_make_socket_transport` schedules the rest of asyncio's
    /// start (`connection_made`, then `_start_reading`).
    #[staticmethod]
    #[pyo3(signature = (event_loop, sock, protocol, extra, server, detach_with_transport, /))]
    fn make(
        py: Python<'_>,
        event_loop: Py<PyAny>,
        sock: Py<PyAny>,
        protocol: &Bound<'_, PyAny>,
        extra: Py<PyDict>,
        server: Option<Py<PyAny>>,
        detach_with_transport: bool,
    ) -> PyResult<Py<Self>> {
        let shard = shardloop_core::shard_id().ok_or_else(errors::not_on_shard)?;
        let fd: RawFd = sock
            .bind(py)
            .call_method0(intern!(py, "fileno"))?
            .extract()?;
        if fd < 0 {
            return Err(PyValueError::new_err("the socket is closed"));
        }
        let io = Async::new(Socket(fd))?;
        let closing = Closing::default();
        let inner = Rc::new(Inner {
            fd,
            io: RefCell::new(Some(io)),
            input: RefCell::new(ReadBuffer::new()),
            output: RefCell::default(),
            read_eof: Cell::new(false),
            eof_delivered: Cell::new(false),
            read_error: RefCell::new(None),
            write_error: RefCell::new(None),
            paused: Cell::new(false),
            closing: closing.clone(),
            eof_written: Cell::new(false),
            conn_lost: Cell::new(0),
            lost: Cell::new(false),
            protocol_paused: Cell::new(false),
            high: Cell::new(HIGH_WATER),
            low: Cell::new(HIGH_WATER / 4),
            reader: RefCell::new(None),
            writer: RefCell::new(None),
            reader_started: Cell::new(false),
            writing: Cell::new(false),
            queued: Cell::new(false),
            notified: Cell::new(false),
            detach_with_transport,
            objects: RefCell::new(Some(Objects {
                me: None,
                context: py
                    .import("contextvars")?
                    .call_method0("copy_context")?
                    .unbind(),
                event_loop,
                sock,
                protocol: protocol.clone().unbind(),
                buffered: is_buffered(protocol)?,
                server,
            })),
        });
        let transport = Py::new(
            py,
            Self {
                home: Home::new(inner.clone(), shard, forget, A_TRANSPORT),
                extra,
                closing,
            },
        )?;
        if let Some(objects) = inner.objects.borrow_mut().as_mut() {
            objects.me = Some(transport.clone_ref(py));
        }
        Ok(transport)
    }

    /// Starts reading (scheduled after ``connection_made``, as asyncio adds
    /// its reader).
    fn _start_reading(&self) -> PyResult<()> {
        let inner = self.inner()?;
        if inner.lost.get() {
            return Ok(());
        }
        inner.start_reader();
        if inner.has_undelivered() {
            inner.notify();
        }
        Ok(())
    }

    /// asyncio's ``_call_connection_lost``.
    fn _call_connection_lost(&self, py: Python<'_>, exc: Option<Py<PyAny>>) -> PyResult<()> {
        self.inner()?.connection_lost(py, exc)
    }

    /// Lets go of what keeps the transport alive and of its descriptor's
    /// registration, for a loop that closes with it open; the socket then
    /// closes (with a ``ResourceWarning``) when the transport is collected.
    fn _release(&self, py: Python<'_>) -> PyResult<()> {
        let inner = self.inner()?;
        if !inner.lost.get() {
            inner.deregister();
            // The protocol usually holds the transport: without it, the
            // transport goes as soon as nothing else holds it.
            let let_go = inner.objects.borrow_mut().as_mut().map(|o| {
                let protocol = std::mem::replace(&mut o.protocol, py.None());
                (o.me.take(), protocol, o.server.take())
            });
            drop(let_go);
        }
        Ok(())
    }

    /// Answers on any thread, as does `is_closing`.
    #[pyo3(signature = (name, default=None))]
    fn get_extra_info(
        &self,
        py: Python<'_>,
        name: &Bound<'_, PyAny>,
        default: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        match self.extra.bind(py).get_item(name)? {
            Some(value) => Ok(value.unbind()),
            None => Ok(default.unwrap_or_else(|| py.None())),
        }
    }

    fn is_closing(&self) -> bool {
        self.closing.get()
    }

    /// Closes the transport: what was written is still sent, then
    /// ``connection_lost(None)`` is called (with ``call_soon``).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let inner = self.inner()?;
        if inner.lost.get() {
            return Ok(());
        }
        inner.close(py)
    }

    /// Closes the transport at once: what is buffered is dropped.
    fn abort(&self, py: Python<'_>) -> PyResult<()> {
        self.inner()?.force_close(py, None)
    }

    fn set_protocol(&self, protocol: &Bound<'_, PyAny>) -> PyResult<()> {
        let inner = self.inner()?;
        let buffered = is_buffered(protocol)?;
        let old = inner.objects.borrow_mut().as_mut().map(|o| {
            o.buffered = buffered;
            std::mem::replace(&mut o.protocol, protocol.clone().unbind())
        });
        drop(old);
        Ok(())
    }

    fn get_protocol(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(self.inner()?.protocol(py).unwrap_or_else(|| py.None()))
    }

    fn is_reading(&self) -> PyResult<bool> {
        let inner = self.inner()?;
        Ok(!inner.paused.get() && !inner.closing.get() && !inner.lost.get())
    }

    fn pause_reading(&self) -> PyResult<()> {
        let inner = self.inner()?;
        if inner.closing.get() || inner.lost.get() {
            return Ok(());
        }
        inner.paused.set(true);
        Ok(())
    }

    fn resume_reading(&self) -> PyResult<()> {
        let inner = self.inner()?;
        if inner.closing.get() || inner.lost.get() || !inner.paused.replace(false) {
            return Ok(());
        }
        if inner.reader_started.get() {
            if inner.has_undelivered() {
                // What was read before the pause is delivered first.
                inner.notify();
            }
            inner.wake_reader();
        }
        Ok(())
    }

    #[pyo3(signature = (high=None, low=None))]
    fn set_write_buffer_limits(
        &self,
        py: Python<'_>,
        high: Option<f64>,
        low: Option<f64>,
    ) -> PyResult<()> {
        let inner = self.inner()?;
        let high = high.unwrap_or_else(|| low.map_or(HIGH_WATER as f64, |low| 4.0 * low));
        let low = low.unwrap_or((high / 4.0).floor());
        if !(high >= low && low >= 0.0) {
            return Err(PyValueError::new_err(format!(
                "high ({high}) must be >= low ({low}) must be >= 0"
            )));
        }
        // (A float past usize's range saturates, as a limit should.)
        inner.high.set(high as usize);
        inner.low.set(low as usize);
        inner.maybe_pause_protocol(py)
    }

    fn get_write_buffer_size(&self) -> PyResult<usize> {
        Ok(self.inner()?.output.borrow().pending())
    }

    fn get_write_buffer_limits(&self) -> PyResult<(usize, usize)> {
        let inner = self.inner()?;
        Ok((inner.low.get(), inner.high.get()))
    }

    /// Queues `data` (bytes, bytearray or memoryview) to be sent.
    fn write(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let inner = self.inner()?;
        check_bytes_like(data)?;
        if inner.eof_written.get() {
            return Err(PyRuntimeError::new_err(
                "Cannot call write() after write_eof()",
            ));
        }
        if let Ok(bytes) = data.cast::<PyBytes>() {
            return inner.write(py, bytes.as_bytes());
        }
        inner.write(py, &copy_bytes(data)?)
    }

    /// Queues every item of `list_of_data`, as one write.
    fn writelines(&self, py: Python<'_>, list_of_data: &Bound<'_, PyAny>) -> PyResult<()> {
        let inner = self.inner()?;
        if inner.eof_written.get() {
            return Err(PyRuntimeError::new_err(
                "Cannot call writelines() after write_eof()",
            ));
        }
        let mut joined = Vec::new();
        for item in list_of_data.try_iter()? {
            let item = item?;
            match item.cast::<PyBytes>() {
                Ok(bytes) => joined.extend_from_slice(bytes.as_bytes()),
                Err(_) => joined.extend(copy_bytes(&item)?),
            }
        }
        inner.write(py, &joined)
    }

    /// Closes the sending side once what was written is sent.
    fn write_eof(&self) -> PyResult<()> {
        let inner = self.inner()?;
        if inner.closing.get() || inner.lost.get() || inner.eof_written.replace(true) {
            return Ok(());
        }
        if inner.output.borrow().pending() == 0 {
            shutdown_write(inner.fd);
        }
        Ok(())
    }

    fn can_write_eof(&self) -> bool {
        true
    }

    /// asyncio's ``loop.start_tls`` works on this transport.
    #[classattr]
    fn _start_tls_compatible() -> bool {
        true
    }

    /// Whether the protocol is paused for writing (asyncio's attribute,
    /// which ``loop.sendfile`` reads).
    #[getter]
    fn _protocol_paused(&self) -> PyResult<bool> {
        Ok(self.inner()?.protocol_paused.get())
    }

    /// ``loop.sendfile`` sends through ``write`` (asyncio's fallback).
    #[getter]
    fn _sendfile_compatible(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        Ok(py
            .import("asyncio.constants")?
            .getattr("_SendfileMode")?
            .getattr("FALLBACK")?
            .unbind())
    }

    fn __repr__(&self) -> String {
        let Ok(inner) = self.home.local() else {
            return format!("<shardloop Transport of shard {}>", self.home.shard());
        };
        if inner.lost.get() {
            return "<shardloop Transport closed>".to_owned();
        }
        let state = if inner.closing.get() { " closing" } else { "" };
        let read = if inner.paused.get() {
            "paused"
        } else {
            "polling"
        };
        let pending = inner.output.borrow().pending();
        let write = if pending > 0 { "polling" } else { "idle" };
        format!(
            "<shardloop Transport fd={}{state} read={read} write=<{write}, bufsize={pending}>>",
            inner.fd
        )
    }
}

impl Drop for Transport {
    /// A transport that goes while its connection is open (its loop closed
    /// without closing it) closes its socket, with a `ResourceWarning`, as
    /// asyncio's does.
    fn drop(&mut self) {
        let Ok(inner) = self.home.local() else {
            return;
        };
        let Some(objects) = inner.release() else {
            return;
        };
        Python::attach(|py| {
            let message = format!("unclosed transport <shardloop Transport fd={}>", inner.fd);
            let warned = py
                .get_type::<pyo3::exceptions::PyResourceWarning>()
                .into_any();
            if let Err(err) = PyErr::warn(
                py,
                &warned,
                &std::ffi::CString::new(message).unwrap_or_default(),
                1,
            ) {
                err.write_unraisable(py, None);
            }
            if let Err(err) = objects.sock.bind(py).call_method0(intern!(py, "close")) {
                err.write_unraisable(py, None);
            }
            drop(objects);
        });
    }
}

/// asyncio's check of what `write` takes.
fn check_bytes_like(data: &Bound<'_, PyAny>) -> PyResult<()> {
    if data.is_instance_of::<PyBytes>()
        || data.is_instance_of::<PyByteArray>()
        || data.is_instance_of::<PyMemoryView>()
    {
        return Ok(());
    }
    let name = data.get_type().name()?;
    Err(PyTypeError::new_err(format!(
        "data argument must be a bytes-like object, not '{name}'"
    )))
}

/// A writable, contiguous buffer as bytes, whatever its item type (as
/// `socket.recv_into` takes it).
fn writable_bytes(buffer: &Bound<'_, PyAny>) -> PyResult<PyBuffer<u8>> {
    let view = match PyBuffer::<u8>::get(buffer) {
        Ok(view) => view,
        Err(_) => {
            let bytes =
                PyMemoryView::from(buffer)?.call_method1(intern!(buffer.py(), "cast"), ("B",))?;
            PyBuffer::<u8>::get(&bytes)?
        }
    };
    if view.readonly() {
        return Err(PyTypeError::new_err(
            "recv_into() argument must be read-write bytes-like object",
        ));
    }
    if !view.is_c_contiguous() {
        return Err(PyTypeError::new_err(
            "recv_into() argument must be a contiguous buffer",
        ));
    }
    Ok(view)
}

/// The bytes of a bytearray or memoryview (of any item type, seen as bytes,
/// as `socket.send` sees it).
fn copy_bytes(data: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    let py = data.py();
    let view = match PyBuffer::<u8>::get(data) {
        Ok(view) => view,
        Err(_) => {
            let bytes = PyMemoryView::from(data)?.call_method1(intern!(py, "cast"), ("B",))?;
            PyBuffer::<u8>::get(&bytes)?
        }
    };
    view.to_vec(py)
}

fn is_buffered(protocol: &Bound<'_, PyAny>) -> PyResult<bool> {
    let py = protocol.py();
    let class = py
        .import("asyncio")?
        .getattr(intern!(py, "BufferedProtocol"))?;
    protocol.is_instance(&class)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Transport>()
}
