//! `dynkv admin`: what a node sees of the cluster.

use super::client::{ConnectArgs, connect, report};
use anyhow::{Result, bail};
use clap::Subcommand;
use dynkv::protocol::{ClientRequest, ClientResponse};

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// This node's view of every member: id, addresses, up/down, phi, last heard, generation.
    Members {
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// This node's summary: partitions owned, keys, hints held, peers up and down.
    Status {
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

pub async fn run(command: AdminCommand) -> Result<()> {
    match command {
        AdminCommand::Members { connect: args } => {
            let client = connect(&args).await?;
            let ClientResponse::Members(members) = client
                .request(ClientRequest::Members)
                .await
                .map_err(report)?
            else {
                bail!("the node answered something other than a member list");
            };
            if args.json {
                println!("{}", serde_json::to_string(&members)?);
                return Ok(());
            }
            println!(
                "{:<12} {:<22} {:<22} {:<8} {:<5} {:>8} {:>12} {:>12} {:>8}",
                "NODE",
                "PEER",
                "CLIENT",
                "STATE",
                "STATUS",
                "PHI",
                "LAST HEARD",
                "GENERATION",
                "HINTS"
            );
            for member in members {
                let heard = match member.silent_ms {
                    None => "self".to_string(),
                    Some(ms) => format!("{:.1}s ago", ms as f64 / 1000.0),
                };
                println!(
                    "{:<12} {:<22} {:<22} {:<8} {:<5} {:>8.2} {:>12} {:>12} {:>8}",
                    member.node,
                    member.peer_addr,
                    member.client_addr,
                    member.state,
                    if member.up { "up" } else { "DOWN" },
                    member.phi.min(9999.0),
                    heard,
                    member.generation,
                    member.hints_held
                );
            }
        }
        AdminCommand::Status { connect: args } => {
            let client = connect(&args).await?;
            let ClientResponse::Status(status) = client
                .request(ClientRequest::Status)
                .await
                .map_err(report)?
            else {
                bail!("the node answered something other than a status");
            };
            if args.json {
                println!("{}", serde_json::to_string(&status)?);
                return Ok(());
            }
            println!("node:              {}", status.node);
            println!(
                "partitions owned:  {} of {}",
                status.partitions_owned, status.partition_count
            );
            println!("ring version:      {}", status.ring_version);
            println!(
                "members:           {} up, {} down",
                status.members_up, status.members_down
            );
            println!("keys (estimate):   {}", status.keys_estimate);
            println!("hints held:        {}", status.hints_held);
            println!("hints delivered:   {}", status.hints_delivered);
            println!("hint bytes:        {}", status.hint_bytes);
            println!(
                "hints skipped:     {} (primary silent past the hint window)",
                status.hints_skipped_past_window
            );
            println!(
                "hints refused:     {} (hint storage full)",
                status.hints_refused_full
            );
            println!("dot collisions:    {}", status.dot_collisions);
        }
    }
    Ok(())
}
