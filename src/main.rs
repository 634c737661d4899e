//! The `sluice` binary.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "sluice", version, about = "A fair, multi-tenant query scheduler")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the protocol version and frame limits this build speaks.
    Info,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Info => {
            let limits = sluice_protocol::Limits::default();
            println!(
                "sluice {} — protocol version {}, max frame {} bytes",
                env!("CARGO_PKG_VERSION"),
                sluice_protocol::PROTOCOL_VERSION,
                limits.max_frame_len
            );
        }
    }
    Ok(())
}
