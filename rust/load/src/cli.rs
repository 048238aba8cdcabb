//! The command line of the `shardloop-load` binary: its arguments, and the
//! two ways it reports a run (a human line, or one JSON object).

use std::io;
use std::net::ToSocketAddrs;
use std::time::Duration;

use crate::{grouped, Options, Protocol, Report};

/// What `--help` prints.
pub const USAGE: &str = "\
Usage: shardloop-load --port PORT [options]

Drives an echo, lookup or memcached server with closed-loop TCP connections
(each sends a request, or --pipeline N of them, waits for the whole answer,
and sends the next) for a fixed time, all on one thread, and reports
requests/s and the p50/p99/p999 latency.

Options:
  --port PORT        the server's TCP port (required)
  --host HOST        the server's host [default: 127.0.0.1]
  --protocol NAME    echo, lookup or memcached [default: lookup]
  --connections N    connections to open [default: 64]
  --seconds S        how long to drive the server [default: 5]
  --size N           echo payload bytes; memcached value bytes [default: 64]
  --keys N           lookup ids and memcached keys drawn from 0..N [default: 100000]
  --pipeline N       requests each connection sends at once [default: 1]
  --json             print one JSON object (requests, errors, seconds,
                     requests_per_second, p50_us, p99_us, p999_us, protocol,
                     connections, pipeline) and no progress
  --progress         print the progress line on stderr even with --json
  -h, --help         print this help

Exit status: 0 after a run (its errors are in the report), 1 if the run
failed (no connection could be made), 2 for bad arguments.
";

/// A run, as the command line asks for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Args {
    pub host: String,
    pub port: u16,
    pub protocol: Protocol,
    pub connections: usize,
    pub duration: Duration,
    pub pipeline: usize,
    /// Report as one JSON object instead of a human line.
    pub json: bool,
    /// Print the progress line on stderr every second.
    pub progress: bool,
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Help,
    Run(Args),
}

/// `value` as a `T`, or an error naming the option.
fn number<T: std::str::FromStr>(option: &str, value: &str, what: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("{option} must be {what}, not {value:?}"))
}

/// Parses the arguments (without the program's name). `--name value` and
/// `--name=value` are both accepted; a later option overrides an earlier
/// one. The error is a message for the user.
pub fn parse<I, S>(args: I) -> Result<Command, String>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut host = "127.0.0.1".to_string();
    let mut port = None;
    let mut protocol = "lookup".to_string();
    let mut connections = "64".to_string();
    let mut seconds = "5".to_string();
    let mut size = "64".to_string();
    let mut keys = "100000".to_string();
    let mut pipeline = "1".to_string();
    let mut json = false;
    let mut progress = None;

    let mut args = args.into_iter().map(Into::into);
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((name, value)) if name.starts_with("--") => (name.to_string(), Some(value)),
            _ => (arg.clone(), None),
        };
        let flag = match name.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "--json" => Some(&mut json),
            "--progress" => Some(progress.insert(false)),
            _ => None,
        };
        if let Some(flag) = flag {
            if inline.is_some() {
                return Err(format!("{name} takes no value"));
            }
            *flag = true;
            continue;
        }
        let slot = match name.as_str() {
            "--host" => &mut host,
            "--port" => port.insert(String::new()),
            "--protocol" => &mut protocol,
            "--connections" => &mut connections,
            "--seconds" => &mut seconds,
            "--size" => &mut size,
            "--keys" => &mut keys,
            "--pipeline" => &mut pipeline,
            other if other.starts_with('-') => return Err(format!("unknown option {other:?}")),
            other => return Err(format!("unexpected argument {other:?}")),
        };
        *slot = match inline {
            Some(value) => value.to_string(),
            None => args.next().ok_or_else(|| format!("{name} needs a value"))?,
        };
    }

    let port = port.ok_or("--port is required (the port the server listens on)")?;
    let port = match number::<u16>("--port", &port, "a port number (1-65535)")? {
        0 => return Err("--port must be a port number (1-65535), not \"0\"".to_string()),
        port => port,
    };
    let size: usize = number("--size", &size, "a whole number of bytes")?;
    let keys: u32 = number("--keys", &keys, "a whole number (1-4294967295)")?;
    let protocol = match protocol.as_str() {
        "echo" if size == 0 => return Err("--size must be at least 1 for echo".to_string()),
        "echo" => Protocol::Echo { size },
        "lookup" | "memcached" if keys == 0 => {
            return Err("--keys must be at least 1".to_string());
        }
        "lookup" => Protocol::Lookup { keys },
        "memcached" => Protocol::Memcached { keys, size },
        other => {
            return Err(format!(
                "--protocol must be 'echo', 'lookup' or 'memcached', not {other:?}"
            ));
        }
    };
    let connections = number("--connections", &connections, "a whole number")?;
    let pipeline = number("--pipeline", &pipeline, "a whole number")?;
    for (option, value) in [("--connections", connections), ("--pipeline", pipeline)] {
        if value == 0 {
            return Err(format!("{option} must be at least 1"));
        }
    }
    let seconds: f64 = number("--seconds", &seconds, "a number of seconds")?;
    if !(seconds > 0.0 && seconds.is_finite()) {
        return Err(format!("--seconds must be positive, not {seconds}"));
    }
    let duration = Duration::try_from_secs_f64(seconds)
        .map_err(|_| format!("--seconds is out of range: {seconds}"))?;
    Ok(Command::Run(Args {
        host,
        port,
        protocol,
        connections,
        duration,
        pipeline,
        json,
        progress: progress.unwrap_or(!json),
    }))
}

/// Resolves the host and drives the server as `args` say.
pub fn run(args: &Args) -> io::Result<Report> {
    let addr = (args.host.as_str(), args.port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::other(format!("no address for {}", args.host)))?;
    crate::run(&Options {
        addr,
        protocol: args.protocol,
        connections: args.connections,
        duration: args.duration,
        pipeline: args.pipeline,
        progress: args.progress,
    })
}

/// The `p`-th percentile latency in microseconds, if any request finished.
fn micros(report: &Report, p: f64) -> Option<f64> {
    report.percentile(p).map(|d| d.as_secs_f64() * 1e6)
}

/// A JSON number rounded to `decimals` places: `null` when there is none
/// (or it is not finite).
fn json_number(value: Option<f64>, decimals: i32) -> String {
    let scale = 10f64.powi(decimals);
    match value.map(|value| (value * scale).round() / scale) {
        // Debug keeps a decimal point or an exponent: always a JSON number.
        Some(value) if value.is_finite() => format!("{value:?}"),
        _ => "null".to_string(),
    }
}

/// The report as one line of JSON: requests per second rounded to a whole
/// number, seconds to the millisecond, latencies to a tenth of a
/// microsecond (`null` if no request finished).
pub fn json_line(args: &Args, report: &Report) -> String {
    format!(
        "{{\"protocol\": \"{}\", \"connections\": {}, \"pipeline\": {}, \"requests\": {}, \
         \"errors\": {}, \"seconds\": {}, \"requests_per_second\": {}, \"p50_us\": {}, \
         \"p99_us\": {}, \"p999_us\": {}}}",
        args.protocol.name(),
        args.connections,
        args.pipeline,
        report.requests,
        report.errors,
        json_number(Some(report.elapsed.as_secs_f64()), 3),
        report.rate().round() as u64,
        json_number(micros(report, 50.0), 1),
        json_number(micros(report, 99.0), 1),
        json_number(micros(report, 99.9), 1),
    )
}

/// The report as a line for people.
pub fn human_line(args: &Args, report: &Report) -> String {
    let latency = |p| micros(report, p).map_or("n/a".to_string(), |us| format!("{us:.1}"));
    format!(
        "{}: {} requests/s over {} connections (pipeline {}), {:.1}s; latency p50 {} us, \
         p99 {} us, p999 {} us; errors {}",
        args.protocol.name(),
        grouped(report.rate().round() as u64),
        args.connections,
        args.pipeline,
        report.elapsed.as_secs_f64(),
        latency(50.0),
        latency(99.0),
        latency(99.9),
        report.errors,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> Args {
        match parse(args.iter().copied()) {
            Ok(Command::Run(args)) => args,
            other => panic!("{args:?} gave {other:?}"),
        }
    }

    fn error(args: &[&str]) -> String {
        match parse(args.iter().copied()) {
            Err(message) => message,
            other => panic!("{args:?} gave {other:?}"),
        }
    }

    #[test]
    fn defaults_need_only_the_port() {
        let args = run_args(&["--port", "7000"]);
        assert_eq!(
            args,
            Args {
                host: "127.0.0.1".to_string(),
                port: 7000,
                protocol: Protocol::Lookup { keys: 100_000 },
                connections: 64,
                duration: Duration::from_secs(5),
                pipeline: 1,
                json: false,
                progress: true,
            }
        );
    }

    #[test]
    fn every_option_is_read_in_both_forms() {
        let args = run_args(&[
            "--host=localhost",
            "--port",
            "11211",
            "--protocol",
            "memcached",
            "--connections=8",
            "--seconds",
            "0.5",
            "--size",
            "1024",
            "--keys=10000",
            "--pipeline",
            "16",
            "--json",
        ]);
        assert_eq!(args.host, "localhost");
        assert_eq!(args.port, 11211);
        assert_eq!(
            args.protocol,
            Protocol::Memcached {
                keys: 10_000,
                size: 1024
            }
        );
        assert_eq!((args.connections, args.pipeline), (8, 16));
        assert_eq!(args.duration, Duration::from_millis(500));
        assert!(args.json && !args.progress, "--json is quiet");
        let echo = run_args(&[
            "--protocol=echo",
            "--size=8",
            "--port=1",
            "--json",
            "--progress",
        ]);
        assert_eq!(echo.protocol, Protocol::Echo { size: 8 });
        assert!(echo.json && echo.progress);
        assert_eq!(
            run_args(&["--port=1", "--port=2"]).port,
            2,
            "the last one wins"
        );
    }

    #[test]
    fn help_wins() {
        assert_eq!(parse(["--port", "1", "--help"]), Ok(Command::Help));
        assert_eq!(parse(["-h"]), Ok(Command::Help));
    }

    #[test]
    fn bad_arguments_are_named() {
        assert!(error(&[]).contains("--port is required"));
        assert!(error(&["--protocol", "gopher", "--port", "1"])
            .contains("--protocol must be 'echo', 'lookup' or 'memcached', not \"gopher\""));
        assert!(error(&["--port", "http"]).contains("--port must be a port number"));
        assert!(error(&["--port", "0"]).contains("--port must be a port number"));
        assert!(error(&["--port", "70000"]).contains("--port must be a port number"));
        assert_eq!(
            error(&["--port", "1", "--connections", "many"]),
            "--connections must be a whole number, not \"many\""
        );
        assert_eq!(
            error(&["--port", "1", "--connections", "-1"]),
            "--connections must be a whole number, not \"-1\""
        );
        assert_eq!(
            error(&["--port", "1", "--connections", "0"]),
            "--connections must be at least 1"
        );
        assert_eq!(
            error(&["--port", "1", "--pipeline=0"]),
            "--pipeline must be at least 1"
        );
        for seconds in ["0", "-1", "nan", "inf"] {
            let message = error(&["--port", "1", "--seconds", seconds]);
            assert!(
                message.starts_with("--seconds must be positive"),
                "{message}"
            );
        }
        assert!(error(&["--port", "1", "--seconds", "1e300"]).contains("out of range"));
        assert_eq!(
            error(&["--port", "1", "--protocol", "echo", "--size", "0"]),
            "--size must be at least 1 for echo"
        );
        assert_eq!(
            error(&["--port", "1", "--keys", "0"]),
            "--keys must be at least 1"
        );
        assert_eq!(
            error(&["--port", "1", "--verbose"]),
            "unknown option \"--verbose\""
        );
        assert_eq!(
            error(&["--port", "1", "7000"]),
            "unexpected argument \"7000\""
        );
        assert_eq!(error(&["--port"]), "--port needs a value");
        assert_eq!(error(&["--port=1", "--json=yes"]), "--json takes no value");
    }

    #[test]
    fn reports_read_as_json_and_as_a_line() {
        let args = run_args(&["--port", "1", "--connections", "8"]);
        let empty = Report {
            errors: 8,
            elapsed: Duration::from_millis(1500),
            ..Report::default()
        };
        assert_eq!(
            json_line(&args, &empty),
            "{\"protocol\": \"lookup\", \"connections\": 8, \"pipeline\": 1, \"requests\": 0, \
             \"errors\": 8, \"seconds\": 1.5, \"requests_per_second\": 0, \"p50_us\": null, \
             \"p99_us\": null, \"p999_us\": null}",
            "no latencies: null, not NaN"
        );
        assert!(human_line(&args, &empty).ends_with("p999 n/a us; errors 8"));

        let full = Report {
            requests: 3000,
            errors: 0,
            elapsed: Duration::from_secs(2),
            latencies: (1..=3000).map(Duration::from_micros).collect(),
        };
        let json = json_line(&args, &full);
        assert!(json.contains("\"requests\": 3000,"), "{json}");
        assert!(json.contains("\"requests_per_second\": 1500,"), "{json}");
        assert!(json.contains("\"p50_us\": 1501.0,"), "{json}");
        let odd = Report {
            requests: 29_172,
            errors: 0,
            elapsed: Duration::from_nanos(1_000_511_039),
            latencies: vec![Duration::from_nanos(125_777)],
        };
        let json = json_line(&args, &odd);
        assert!(
            json.contains(
                "\"seconds\": 1.001, \"requests_per_second\": 29157, \"p50_us\": 125.8, \
                 \"p99_us\": 125.8,"
            ),
            "rounded as the summary shows them: {json}"
        );
        assert_eq!(
            human_line(&args, &full),
            "lookup: 1,500 requests/s over 8 connections (pipeline 1), 2.0s; latency p50 \
             1501.0 us, p99 2971.0 us, p999 2998.0 us; errors 0"
        );
    }
}
