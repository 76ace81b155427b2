//! `dynkv get|put|delete|ping`: the CLI client. With no `--node` it reaches the local dev
//! cluster through the file `dynkv dev` writes.

use super::dev::{DevCluster, default_dev_dir};
use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use clap::Args;
use dynkv::client::{Client, ClientConfig, ClientLibError};
use dynkv::core::object::Content;
use dynkv::core::quorum::Quorum;
use dynkv::protocol::{GetOptions, NewContent, PutOptions};
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct ConnectArgs {
    /// Client address of a node to talk to; repeat to give fallbacks [default: the dev cluster's nodes].
    #[arg(long = "node")]
    nodes: Vec<SocketAddr>,
    /// Cluster CA certificate [default: the dev cluster's].
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Directory of the dev cluster to reach [default: $DYNKV_DEV_DIR or ~/.local/share/dynkv/dev].
    #[arg(long)]
    dev_dir: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Client token of nodes that require one (their `client_token`).
    #[arg(long, env = "DYNKV_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Args, Debug)]
pub struct GetArgs {
    bucket: String,
    key: String,
    /// Replies needed: one, quorum, all, default or a number.
    #[arg(long, default_value = "default")]
    r: Quorum,
    /// Replies needed from primary replicas.
    #[arg(long, default_value = "default")]
    pr: Quorum,
    /// Request timeout in milliseconds [default: the node's].
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Let fallbacks stand in for down primaries (false: primaries only).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    sloppy_quorum: bool,
    /// Ask every replica at once, as Riak does (default: only as many as r and pr need,
    /// and the rest if those fail or are slow); the later replies feed read repair.
    #[arg(long)]
    all_replicas: bool,
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(Args, Debug)]
pub struct WriteOptionArgs {
    /// Acknowledgements needed: one, quorum, all, default or a number.
    #[arg(long, default_value = "default")]
    w: Quorum,
    /// Durable (fsynced) acknowledgements needed.
    #[arg(long, default_value = "default")]
    dw: Quorum,
    /// Acknowledgements needed from primary replicas.
    #[arg(long, default_value = "default")]
    pw: Quorum,
    /// Request timeout in milliseconds [default: the node's].
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// The context printed by `get`: the write supersedes exactly what that read returned.
    #[arg(long)]
    context: Option<String>,
    /// Let fallbacks stand in for down primaries (false: primaries only).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    sloppy_quorum: bool,
}

#[derive(Args, Debug)]
pub struct PutArgs {
    bucket: String,
    key: String,
    /// The value; read from stdin when absent.
    value: Option<String>,
    #[arg(long, default_value = "text/plain")]
    content_type: String,
    /// Print the stored siblings after the write.
    #[arg(long)]
    return_body: bool,
    #[command(flatten)]
    options: WriteOptionArgs,
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    bucket: String,
    key: String,
    /// Without `--context`, the delete first reads the key at this level and deletes what
    /// the read returned (Riak's `r` of a delete).
    #[arg(long, default_value = "default")]
    r: Quorum,
    #[command(flatten)]
    options: WriteOptionArgs,
    #[command(flatten)]
    connect: ConnectArgs,
}

#[derive(Args, Debug)]
pub struct PingArgs {
    #[command(flatten)]
    connect: ConnectArgs,
}

/// The client addresses and the CA certificate (PEM) to use: those given, or the dev
/// cluster's (from `dev_dir`, else the default dev directory) for what is not given.
pub fn cluster_endpoints(
    nodes: &[SocketAddr],
    ca: Option<&Path>,
    dev_dir: Option<&Path>,
) -> Result<(Vec<SocketAddr>, String)> {
    let (nodes, ca_path) = match (nodes.is_empty(), ca) {
        (false, Some(ca)) => (nodes.to_vec(), ca.to_path_buf()),
        _ => {
            let dir = dev_dir
                .map(Path::to_path_buf)
                .unwrap_or_else(default_dev_dir);
            let cluster = DevCluster::load(&dir).with_context(|| {
                format!(
                    "no --node/--ca given and no dev cluster found in {}; start one with `dynkv dev` or pass --node ADDR --ca FILE",
                    dir.display()
                )
            })?;
            let nodes = if nodes.is_empty() {
                cluster.nodes.iter().map(|node| node.client_addr).collect()
            } else {
                nodes.to_vec()
            };
            (nodes, ca.map(Path::to_path_buf).unwrap_or(cluster.ca_cert))
        }
    };
    let ca_pem = std::fs::read_to_string(&ca_path)
        .with_context(|| format!("cannot read the CA certificate {}", ca_path.display()))?;
    Ok((nodes, ca_pem))
}

pub async fn connect(args: &ConnectArgs) -> Result<Client> {
    let (nodes, ca_pem) =
        cluster_endpoints(&args.nodes, args.ca.as_deref(), args.dev_dir.as_deref())?;
    let mut config = ClientConfig::new(nodes, ca_pem);
    config.token = args.token.clone();
    Client::connect(config)
        .await
        .context("cannot connect to the cluster")
}

fn decode_context(text: &Option<String>) -> Result<Option<Vec<u8>>> {
    text.as_deref()
        .map(|text| {
            BASE64
                .decode(text.trim())
                .context("--context is not the base64 text that `dynkv get` printed")
        })
        .transpose()
}

fn write_options(args: &WriteOptionArgs, return_body: bool) -> PutOptions {
    PutOptions {
        w: args.w,
        dw: args.dw,
        pw: args.pw,
        timeout_ms: args.timeout_ms,
        return_body,
        sloppy_quorum: Some(args.sloppy_quorum),
        r: None,
    }
}

fn sibling_json(content: &Content) -> serde_json::Value {
    serde_json::json!({
        "value": String::from_utf8_lossy(&content.value),
        "content_type": content.content_type,
        "last_modified_micros": content.last_modified_micros,
        "metadata": content.user_metadata,
    })
}

fn print_siblings(json: bool, found: bool, siblings: &[Content], context: Option<&[u8]>) {
    let context = context.map(|bytes| BASE64.encode(bytes));
    if json {
        let document = serde_json::json!({
            "found": found,
            "siblings": siblings.iter().map(sibling_json).collect::<Vec<_>>(),
            "context": context,
        });
        println!("{document}");
        return;
    }
    if !found {
        println!("not found");
    } else if siblings.len() > 1 {
        println!("{} siblings:", siblings.len());
    }
    for (index, sibling) in siblings.iter().enumerate() {
        let value = String::from_utf8_lossy(&sibling.value);
        if siblings.len() > 1 {
            println!("  [{}] {value}", index + 1);
        } else {
            println!("{value}");
        }
    }
    if let Some(context) = context {
        println!("context: {context}");
    }
}

/// Server-side errors (bad option, quorum unmet) are printed as the node worded them.
pub fn report(error: ClientLibError) -> anyhow::Error {
    match error {
        ClientLibError::Server(error) => anyhow::anyhow!("{}", error.message),
        other => anyhow::Error::new(other),
    }
}

pub async fn get(args: GetArgs) -> Result<()> {
    let client = connect(&args.connect).await?;
    let options = GetOptions {
        r: args.r,
        pr: args.pr,
        timeout_ms: args.timeout_ms,
        sloppy_quorum: Some(args.sloppy_quorum),
        ask_all_replicas: args.all_replicas.then_some(true),
    };
    let result = client
        .get(args.bucket.as_bytes(), args.key.as_bytes(), options)
        .await
        .map_err(report)?;
    let found = !result.siblings.is_empty();
    print_siblings(
        args.connect.json,
        found,
        &result.siblings,
        result.context.as_deref(),
    );
    if !found {
        std::process::exit(1);
    }
    Ok(())
}

pub async fn put(args: PutArgs) -> Result<()> {
    let value = match args.value {
        Some(value) => value.into_bytes(),
        None => {
            let mut bytes = Vec::new();
            std::io::stdin()
                .read_to_end(&mut bytes)
                .context("cannot read the value from stdin")?;
            bytes
        }
    };
    let context = decode_context(&args.options.context)?;
    let client = connect(&args.connect).await?;
    let content = NewContent {
        value,
        content_type: args.content_type,
        user_metadata: Vec::new(),
    };
    let result = client
        .put(
            args.bucket.as_bytes(),
            args.key.as_bytes(),
            context.as_deref(),
            content,
            write_options(&args.options, args.return_body),
        )
        .await
        .map_err(report)?;
    if args.return_body || args.connect.json {
        print_siblings(
            args.connect.json,
            true,
            &result.siblings,
            Some(&result.context),
        );
    } else {
        println!("stored");
    }
    Ok(())
}

pub async fn delete(args: DeleteArgs) -> Result<()> {
    let context = decode_context(&args.options.context)?;
    let client = connect(&args.connect).await?;
    client
        .delete(
            args.bucket.as_bytes(),
            args.key.as_bytes(),
            context.as_deref(),
            PutOptions {
                r: Some(args.r),
                ..write_options(&args.options, false)
            },
        )
        .await
        .map_err(report)?;
    println!("deleted");
    Ok(())
}

pub async fn ping(args: PingArgs) -> Result<()> {
    let client = connect(&args.connect).await?;
    let node = client.ping().await.map_err(report)?;
    match client.connected_node() {
        Some(address) => println!("pong from {node} at {address}"),
        None => bail!("no node answered"),
    }
    Ok(())
}
