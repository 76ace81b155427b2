//! `dynkv cert`: the cluster PKI for real deployments (`dynkv dev` makes its own).

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use dynkv::core::ids::NodeId;
use dynkv::net::tls::{self, CertifiedKey};
use std::path::{Path, PathBuf};

#[derive(Subcommand, Debug)]
pub enum CertCommand {
    /// Create a cluster CA: DIR/ca.pem and DIR/ca.key (keep the key offline).
    Ca {
        /// Directory to write into.
        #[arg(long)]
        dir: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "dynkv cluster CA")]
        name: String,
        /// Replace an existing CA.
        #[arg(long)]
        force: bool,
    },
    /// Issue a node certificate signed by the CA in DIR: DIR/ID.pem and DIR/ID.key.
    Node {
        /// Directory holding ca.pem and ca.key; the certificate is written there too.
        #[arg(long)]
        dir: PathBuf,
        /// The node id (its ring name and the certificate's DNS name).
        #[arg(long)]
        id: NodeId,
        /// Another DNS name or IP address clients and peers use to reach the node; repeat.
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
}

pub fn run(command: CertCommand) -> Result<()> {
    dynkv::net::tls::install_crypto_provider();
    match command {
        CertCommand::Ca { dir, name, force } => {
            let cert_path = dir.join("ca.pem");
            if cert_path.exists() && !force {
                bail!(
                    "{} exists; pass --force to replace the cluster CA",
                    cert_path.display()
                );
            }
            let ca = tls::generate_ca(&name).context("cannot generate the CA")?;
            write_pair(&dir, "ca", &ca)?;
            println!(
                "wrote {} and {}",
                cert_path.display(),
                dir.join("ca.key").display()
            );
        }
        CertCommand::Node { dir, id, hosts } => {
            let ca = read_pair(&dir, "ca")?;
            let node = tls::issue_node_certificate(&ca, &id, &hosts)
                .with_context(|| format!("cannot issue a certificate for {id}"))?;
            write_pair(&dir, id.as_str(), &node)?;
            println!(
                "wrote {}/{id}.pem and {}/{id}.key",
                dir.display(),
                dir.display()
            );
        }
    }
    Ok(())
}

pub fn read_pair(dir: &Path, name: &str) -> Result<CertifiedKey> {
    let read = |file: PathBuf| {
        std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))
    };
    Ok(CertifiedKey {
        cert_pem: read(dir.join(format!("{name}.pem")))?,
        key_pem: read(dir.join(format!("{name}.key")))?,
    })
}

pub fn write_pair(dir: &Path, name: &str, pair: &CertifiedKey) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let cert = dir.join(format!("{name}.pem"));
    std::fs::write(&cert, &pair.cert_pem)
        .with_context(|| format!("cannot write {}", cert.display()))?;
    let key = dir.join(format!("{name}.key"));
    write_private(&key, &pair.key_pem)
}

/// Private keys are readable by their owner only.
fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}
