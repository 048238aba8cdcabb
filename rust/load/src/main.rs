//! `shardloop-load`: drives an echo, lookup or memcached server and reports
//! requests/s and latency (`shardloop-load --help`).

use std::process::ExitCode;

use shardloop_load::cli::{self, Command};

fn main() -> ExitCode {
    let args = std::env::args_os()
        .skip(1)
        .map(|arg| arg.to_string_lossy().into_owned());
    let args = match cli::parse(args) {
        Ok(Command::Help) => {
            print!("{}", cli::USAGE);
            return ExitCode::SUCCESS;
        }
        Ok(Command::Run(args)) => args,
        Err(message) => {
            eprintln!("shardloop-load: {message}");
            eprintln!("Try 'shardloop-load --help' for the options.");
            return ExitCode::from(2);
        }
    };
    match cli::run(&args) {
        Ok(report) if args.json => println!("{}", cli::json_line(&args, &report)),
        Ok(report) => println!("{}", cli::human_line(&args, &report)),
        Err(err) => {
            eprintln!(
                "shardloop-load: cannot drive {}:{}: {err}",
                args.host, args.port
            );
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
