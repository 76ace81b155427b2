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
    /// The ring this node holds: version, ownership per node, member states, staged
    /// changes, pending transfers, and a picture of which node owns each partition.
    Ring {
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Handoffs of the committed ring change, cluster-wide: each active and queued one
    /// (key partition, from, to, keys and bytes sent, rate, ETA), or exactly `no transfers`.
    Transfers {
        /// Show progress bars, redrawn every second, and exit once none remain.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Set how many handoffs each node sends at once (`transfer_limit`), on every member,
    /// until they restart; 0 pauses transfers.
    TransferLimit {
        limit: u32,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Staged ring changes, as Riak's `cluster` commands: stage, look at the plan, clear.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Active anti-entropy on this node: each partition's tree (built, building), the last
    /// exchange with each peer and its result (in sync / N keys repaired), the next one due.
    /// `aae repair [PARTITION]` runs this node's exchanges now (after a remove or a restore).
    Aae {
        #[command(subcommand)]
        action: Option<AaeAction>,
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum AaeAction {
    /// Exchange PARTITION (default: every partition this node first-owns) with its other
    /// primaries now, repairing what differs; then show the state.
    Repair {
        partition: Option<u32>,
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Stage the join of the node given with --node; it owns nothing until a committed plan
    /// gives it partitions. A node started alone names a member of the cluster to join as
    /// PEER (`n1=10.0.0.1:8710`, the member's id and peer address, as `--member` takes
    /// them); a node started with `--member` seeds of the cluster needs none.
    Join {
        /// A member of the cluster to join: its peer address (PEER_ADDR, an IPv4 address its
        /// certificate names), or ID=PEER_ADDR.
        peer: Option<String>,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Stage the leave of NODE (default: the node given with --node).
    Leave {
        node: Option<String>,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Stage the removal of NODE, gone for good: its partitions are rebuilt from the others.
    Remove {
        node: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Stage the replacement of OLD by NEW (a joining node), which takes OLD's partitions.
    Replace {
        old: String,
        new: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Every partition the staged changes would move, from and to, and the ownership after.
    Plan {
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Drop every staged change.
    Clear {
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Take the plan last shown by `plan`: joiners become owners and leavers hand over, as
    /// handoffs complete (`admin transfers`). Fails if the plan changed, a member is down or
    /// has not caught up with the ring, or a change is still moving data.
    Commit {
        /// Commit the plan made on this ring version instead of the last one shown.
        #[arg(long)]
        ring_version: Option<u64>,
        #[command(flatten)]
        connect: ConnectArgs,
    },
}

/// `admin transfers`: one line per handoff; with `bars`, a progress bar each.
fn print_transfers(ring_version: u64, transfers: &[dynkv::protocol::TransferInfo], bars: bool) {
    let active = transfers.iter().filter(|t| t.state == "active").count();
    let keys: u64 = transfers.iter().map(|t| t.keys_sent).sum();
    let bytes: u64 = transfers.iter().map(|t| t.bytes_sent).sum();
    println!(
        "{} transfers pending for ring version {ring_version}: {active} active; {keys} keys, {} sent by the active ones",
        transfers.len(),
        human_bytes(bytes)
    );
    println!(
        "{:>9}  {:<10} {:<10} {:<8} {:>9} {:>10} {:>11} {:>7}",
        "PARTITION", "FROM", "TO", "STATE", "KEYS", "BYTES", "RATE", "ETA"
    );
    for transfer in transfers {
        let seconds = transfer.elapsed_ms as f64 / 1000.0;
        let rate = if seconds > 0.0 {
            transfer.bytes_sent as f64 / seconds
        } else {
            0.0
        };
        let key_rate = if seconds > 0.0 {
            transfer.keys_sent as f64 / seconds
        } else {
            0.0
        };
        let eta = if transfer.state == "active"
            && key_rate > 0.0
            && transfer.keys_estimated > transfer.keys_sent
        {
            format!(
                "{:.0}s",
                (transfer.keys_estimated - transfer.keys_sent) as f64 / key_rate
            )
        } else {
            "-".to_string()
        };
        println!(
            "{:>9}  {:<10} {:<10} {:<8} {:>9} {:>10} {:>9}/s {:>7}",
            transfer.partition,
            transfer.from,
            transfer.to,
            transfer.state,
            transfer.keys_sent,
            human_bytes(transfer.bytes_sent),
            human_bytes(rate as u64),
            eta
        );
        if bars && transfer.state == "active" {
            // The record estimate counts overwrites until compaction, so the bar may end
            // short of full when the handoff completes.
            let share = if transfer.keys_estimated == 0 {
                0.0
            } else {
                (transfer.keys_sent as f64 / transfer.keys_estimated as f64).min(1.0)
            };
            let filled = (share * 40.0).round() as usize;
            println!(
                "           [{}{}] {:>3.0}%",
                "#".repeat(filled),
                ".".repeat(40 - filled),
                share * 100.0
            );
        }
    }
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn print_ring(ring: &dynkv::protocol::RingInfo) {
    if ring.version == 0 {
        println!("ring version:  0 (provisional: this node has not joined a cluster yet)");
    } else {
        println!("ring version:  {} (cluster {})", ring.version, ring.cluster);
    }
    println!("partitions:    {}", ring.owners.len());
    println!("{:<12} {:<9} {:>10}", "NODE", "STATE", "PARTITIONS");
    for member in &ring.members {
        println!(
            "{:<12} {:<9} {:>10}",
            member.node, member.state, member.partitions
        );
    }
    if ring.staged.is_empty() {
        println!("staged:        none");
    } else {
        for (node, change) in &ring.staged {
            println!("staged:        {node}: {change}");
        }
    }
    if ring.transfers.is_empty() && ring.pending_owners.is_empty() {
        println!("transfers:     none");
    } else {
        println!(
            "transfers:     {} handoffs pending for the committed change (`dynkv admin transfers`)",
            ring.transfers.len()
        );
    }
    print!("{}", ring_picture(ring));
}

fn print_plan(plan: &dynkv::protocol::PlanInfo) {
    println!("plan on ring version {}", plan.ring_version);
    for (node, change) in &plan.staged {
        println!("  {change:<16} {node}");
    }
    println!("{} partitions move:", plan.transfers.len());
    let mut total = (0u64, 0u64);
    for (partition, from, to) in &plan.transfers {
        match plan.sizes.iter().find(|(sized, ..)| sized == partition) {
            Some((_, records, bytes)) => {
                total = (total.0 + records, total.1 + bytes);
                println!(
                    "  {partition:>5}  {from} -> {to}  ~{records} records, ~{bytes} bytes on disk"
                );
            }
            None => {
                println!("  {partition:>5}  {from} -> {to}  (size unknown: {from} did not answer)")
            }
        }
    }
    println!(
        "estimated: ~{} records, ~{} bytes on the current owners' disks \
         (compressed; writes not yet flushed from memory are not counted)",
        total.0, total.1
    );
    println!("{:<12} {:>7} {:>7}", "NODE", "BEFORE", "AFTER");
    for (node, before, after) in &plan.ownership {
        println!("{node:<12} {before:>7} {after:>7}");
    }
}

/// The ring as text: a legend of one letter per member, then one letter per partition
/// (64 to a line); a partition with a pending transfer shows its new owner's letter in
/// lower case.
fn ring_picture(ring: &dynkv::protocol::RingInfo) -> String {
    const LETTERS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let letter = |node: &str| {
        ring.members
            .iter()
            .position(|member| member.node == node)
            .and_then(|index| LETTERS.get(index))
            .map_or('?', |&byte| byte as char)
    };
    let mut picture = String::new();
    for (index, member) in ring.members.iter().enumerate().take(LETTERS.len()) {
        picture.push_str(&format!("  {}={}", LETTERS[index] as char, member.node));
    }
    picture.push('\n');
    for (partition, owner) in ring.owners.iter().enumerate() {
        if partition % 64 == 0 {
            picture.push_str(&format!("  {partition:>4} "));
        }
        let moving = ring
            .transfers
            .iter()
            .find(|(moving, _, _)| *moving as usize == partition);
        picture.push(match moving {
            Some((_, _, to)) => letter(to).to_ascii_lowercase(),
            None => letter(owner),
        });
        if partition % 64 == 63 {
            picture.push('\n');
        }
    }
    picture
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
                "{:<12} {:<22} {:<22} {:<8} {:<5} {:>8} {:>12} {:>12} {:>8} {:>6}",
                "NODE",
                "PEER",
                "CLIENT",
                "STATE",
                "STATUS",
                "PHI",
                "LAST HEARD",
                "GENERATION",
                "HINTS",
                "RING"
            );
            for member in members {
                let heard = match member.silent_ms {
                    None => "self".to_string(),
                    Some(ms) => format!("{:.1}s ago", ms as f64 / 1000.0),
                };
                println!(
                    "{:<12} {:<22} {:<22} {:<8} {:<5} {:>8.2} {:>12} {:>12} {:>8} {:>6}",
                    member.node,
                    member.peer_addr,
                    member.client_addr,
                    member.state,
                    if member.up { "up" } else { "DOWN" },
                    member.phi.min(9999.0),
                    heard,
                    member.generation,
                    member.hints_held,
                    member.ring_version
                );
            }
        }
        AdminCommand::Ring { connect: args } => {
            let client = connect(&args).await?;
            let ClientResponse::Ring(ring) =
                client.request(ClientRequest::Ring).await.map_err(report)?
            else {
                bail!("the node answered something other than a ring");
            };
            if args.json {
                println!("{}", serde_json::to_string(&ring)?);
                return Ok(());
            }
            print_ring(&ring);
        }
        AdminCommand::Transfers {
            watch,
            connect: args,
        } => {
            let client = connect(&args).await?;
            let mut first = true;
            loop {
                let ClientResponse::Transfers {
                    ring_version,
                    transfers,
                    pending,
                } = client
                    .request(ClientRequest::Transfers)
                    .await
                    .map_err(report)?
                else {
                    bail!("the node answered something other than transfers");
                };
                let done = transfers.is_empty() && !pending;
                if args.json {
                    println!("{}", serde_json::to_string(&transfers)?);
                } else if done {
                    println!("no transfers");
                } else if transfers.is_empty() {
                    println!(
                        "no handoff is left in ring version {ring_version}; a newer version (the flip, or a change this node has not heard of yet) is on its way"
                    );
                } else {
                    if watch && !first {
                        // Redraw in place: clear the screen and go home.
                        print!("\x1b[2J\x1b[H");
                    }
                    print_transfers(ring_version, &transfers, watch);
                }
                first = false;
                if !watch || done {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
        AdminCommand::TransferLimit {
            limit,
            connect: args,
        } => {
            let client = connect(&args).await?;
            let request =
                ClientRequest::Cluster(dynkv::protocol::ClusterRequest::TransferLimit { limit });
            match client.request(request).await.map_err(report)? {
                ClientResponse::Ring(_) => {
                    println!("transfer limit set to {limit} on every member")
                }
                other => bail!("the node answered something unexpected: {other:?}"),
            }
        }
        AdminCommand::Aae {
            action,
            connect: node_args,
        } => {
            let (request, args) = match action {
                None => (ClientRequest::Aae, node_args),
                Some(AaeAction::Repair {
                    partition,
                    connect: repair_args,
                }) => (ClientRequest::AaeRepair { partition }, repair_args),
            };
            let client = connect(&args).await?;
            let ClientResponse::Aae(info) = client.request(request).await.map_err(report)? else {
                bail!("the node answered something other than its anti-entropy state");
            };
            if args.json {
                println!("{}", serde_json::to_string(&info)?);
            } else {
                print_aae(&info);
            }
        }
        AdminCommand::Cluster(command) => {
            use dynkv::protocol::ClusterRequest;
            let (request, args) = match command {
                ClusterCommand::Join {
                    peer: None,
                    connect,
                } => (ClusterRequest::Join { node: None }, connect),
                ClusterCommand::Join {
                    peer: Some(peer),
                    connect,
                } => {
                    let (peer, peer_addr) = parse_peer(&peer)?;
                    (ClusterRequest::JoinVia { peer, peer_addr }, connect)
                }
                ClusterCommand::Leave { node, connect } => {
                    (ClusterRequest::Leave { node }, connect)
                }
                ClusterCommand::Remove { node, connect } => {
                    (ClusterRequest::Remove { node }, connect)
                }
                ClusterCommand::Replace { old, new, connect } => {
                    (ClusterRequest::Replace { old, new }, connect)
                }
                ClusterCommand::Plan { connect } => (ClusterRequest::Plan, connect),
                ClusterCommand::Clear { connect } => (ClusterRequest::Clear, connect),
                ClusterCommand::Commit {
                    ring_version,
                    connect,
                } => (ClusterRequest::Commit { ring_version }, connect),
            };
            let client = connect(&args).await?;
            // A change staged a moment ago may not have reached every member yet: a commit
            // refused for that is tried again for a while (one gossip round is 500 ms).
            let converge_deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
            let response = loop {
                match client
                    .request(ClientRequest::Cluster(request.clone()))
                    .await
                {
                    Err(dynkv::client::ClientLibError::Server(error))
                        if matches!(request, ClusterRequest::Commit { .. })
                            && error.message.contains("has not converged")
                            && std::time::Instant::now() < converge_deadline =>
                    {
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    }
                    other => break other.map_err(report)?,
                }
            };
            match response {
                ClientResponse::Ring(ring) if args.json => {
                    println!("{}", serde_json::to_string(&ring)?)
                }
                ClientResponse::Ring(ring) => print_ring(&ring),
                ClientResponse::Plan(plan) if args.json => {
                    println!("{}", serde_json::to_string(&plan)?)
                }
                ClientResponse::Plan(plan) => print_plan(&plan),
                other => bail!("the node answered something unexpected: {other:?}"),
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
            println!("transfers pending: {}", status.transfers_pending);
            println!(
                "handoff sent:      {} keys, {}",
                status.handoff_keys_sent,
                human_bytes(status.handoff_bytes_sent)
            );
            println!(
                "strays deleted:    {}, {} of them first sent to a replica that lacked them",
                status.stray_keys_deleted, status.stray_keys_handed
            );
            println!(
                "anti-entropy:      {} exchanges, {} segments differing, {} keys repaired ({}), {} of hashes and digests received",
                status.aae_exchanges,
                status.aae_segments_differing,
                status.aae_keys_repaired,
                human_bytes(status.aae_bytes_repaired),
                human_bytes(status.aae_bytes_exchanged)
            );
            println!(
                "tombstones:        {} held, {} reaped",
                status.tombstones_held, status.tombstones_reaped
            );
            println!(
                "retired actors:    {} clock entries of key actors that coordinate no more",
                status.actors_retired
            );
        }
    }
    Ok(())
}

/// `ID=HOST:PORT`, `ID@HOST:PORT` or `HOST:PORT`: a member's id (its certificate name, which
/// the TLS handshake checks; asked of the member when not given) and its peer address.
fn parse_peer(text: &str) -> Result<(String, String)> {
    // A bare address: the node asks the member its id.
    let (id, address) = text
        .split_once('=')
        .or_else(|| text.split_once('@'))
        .unwrap_or(("", text));
    if let Err(error) = address.parse::<std::net::SocketAddr>() {
        bail!("{address:?} is not a peer address (IP:PORT): {error}");
    }
    Ok((id.to_string(), address.to_string()))
}

fn print_aae(info: &dynkv::protocol::AaeInfo) {
    if !info.enabled {
        println!("anti-entropy is off on this node (aae.enabled = false)");
        return;
    }
    println!(
        "anti-entropy: one exchange every {} ms; {} partitions",
        info.exchange_interval_ms,
        info.partitions.len()
    );
    let held: u64 = info
        .partitions
        .iter()
        .map(|partition| partition.tombstones)
        .sum();
    if info.tombstones_mode == "keep" {
        println!("tombstones: kept (tombstones.mode = keep); {held} held");
    } else {
        println!(
            "tombstones: reaped {} s after the delete once safe; {held} held",
            info.tombstone_grace_secs
        );
    }
    println!(
        "{:>9}  {:<10}  {:>6}  {:>9}  {:>10}  last exchanges (peer: result, how long ago)  | last reap",
        "partition", "tree", "builds", "next due", "tombstones"
    );
    for partition in &info.partitions {
        let next = partition
            .next_due_ms
            .map_or("-".to_string(), |ms| format!("{:.1} s", ms as f64 / 1000.0));
        let exchanges: Vec<String> = partition
            .exchanges
            .iter()
            .map(|exchange| {
                format!(
                    "{}: {} ({:.1} s ago)",
                    exchange.peer,
                    exchange.result,
                    exchange.ago_ms as f64 / 1000.0
                )
            })
            .collect();
        let reap = partition.last_reap.as_ref().map_or(String::new(), |reap| {
            format!(
                "  | reap: {} ({:.1} s ago)",
                reap.result,
                reap.ago_ms as f64 / 1000.0
            )
        });
        println!(
            "{:>9}  {:<10}  {:>6}  {:>9}  {:>10}  {}{}",
            partition.partition,
            partition.tree,
            partition.builds,
            next,
            partition.tombstones,
            if exchanges.is_empty() {
                "none yet".to_string()
            } else {
                exchanges.join("; ")
            },
            reap
        );
    }
}
