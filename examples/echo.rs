//! The echo service (RFC 862) on every shard, written on `shardloop-core`
//! alone: the floor against which the Python servers can be measured.
//!
//!     cargo run --release --example echo -- --port 7008 [--shards N] [--idle-poll-us U]
//!
//! `SHARDLOOP_OVERPROVISIONED=1` builds the runtime overprovisioned.
//!
//! Every shard has its own listening socket on the port (`SO_REUSEPORT`),
//! accepts its own connections and serves them as local tasks.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};

use shardloop_core::{shard_count, shard_id, spawn_local, submit_to, Async, Runtime};
use socket2::{Domain, Socket, Type};

fn listener(port: u16) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

async fn echo(stream: Async<TcpStream>) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let read = stream.read_with(|mut s| s.read(&mut buf)).await?;
        if read == 0 {
            return Ok(());
        }
        let mut written = 0;
        while written < read {
            written += stream
                .write_with(|mut s| s.write(&buf[written..read]))
                .await?;
        }
    }
}

async fn serve(port: u16) -> io::Result<()> {
    let listener = Async::new(listener(port)?)?;
    loop {
        let (stream, _) = listener.read_with(|l| l.accept()).await?;
        stream.set_nonblocking(true)?;
        stream.set_nodelay(true)?;
        let stream = Async::new(stream)?;
        drop(spawn_local(async move {
            let _ = echo(stream).await;
        }));
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut port, mut shards, mut idle_poll) = (7008u16, None, None);
    while let Some(arg) = args.next() {
        let value = args.next();
        match (arg.as_str(), value) {
            ("--port", Some(v)) => port = v.parse().expect("--port takes a number"),
            ("--shards", Some(v)) => shards = Some(v.parse().expect("--shards takes a number")),
            ("--idle-poll-us", Some(v)) => {
                idle_poll = Some(std::time::Duration::from_micros(
                    v.parse().expect("--idle-poll-us takes a number"),
                ))
            }
            _ => {
                eprintln!("usage: echo [--port PORT] [--shards N] [--idle-poll-us U]");
                std::process::exit(2);
            }
        }
    }
    // As the Python package does: the shards share their cores with other
    // busy threads (a load generator on this machine).
    let overprovisioned = std::env::var_os("SHARDLOOP_OVERPROVISIONED").is_some_and(|v| v != "0");
    let mut builder = Runtime::builder().overprovisioned(overprovisioned);
    if let Some(shards) = shards {
        builder = builder.shards(shards);
    }
    if let Some(idle_poll) = idle_poll {
        builder = builder.idle_poll(idle_poll);
    }
    let runtime = builder.build().expect("a runtime");
    runtime.block_on(async move {
        for shard in 0..shard_count().unwrap_or(1) {
            submit_to(shard, move || {
                drop(spawn_local(async move {
                    if let Err(err) = serve(port).await {
                        eprintln!("shard {:?}: {err}", shard_id());
                    }
                }));
            })
            .await
            .expect("every shard starts its listener");
        }
        println!(
            "echo server on 127.0.0.1:{port}, {} shards",
            shard_count().unwrap_or(1)
        );
        std::future::pending::<()>().await
    });
}
