//! Identifiers shared by every part of the core: node ids (ring members) and actor ids
//! (the replica identity written into version vectors).

use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest node id accepted; node ids travel in every gossip digest and ring.
pub const MAX_NODE_ID_BYTES: usize = 64;

/// The name of a ring member, chosen by the operator (`dev1`, `kv-a.example`).
///
/// It is also the DNS name in the node's TLS certificate, so it is restricted to
/// lower-case letters, digits, `-` and `.`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeIdError {
    #[error("node id is empty")]
    Empty,
    #[error("node id is {length} bytes long; at most {MAX_NODE_ID_BYTES} are allowed")]
    TooLong { length: usize },
    #[error("node id {id:?} contains {character:?}; only a-z, 0-9, '-' and '.' are allowed")]
    BadCharacter { id: String, character: char },
}

impl NodeId {
    pub fn new(id: impl Into<String>) -> Result<Self, NodeIdError> {
        let id = id.into();
        if id.is_empty() {
            return Err(NodeIdError::Empty);
        }
        if id.len() > MAX_NODE_ID_BYTES {
            return Err(NodeIdError::TooLong { length: id.len() });
        }
        if let Some(character) = id
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '.'))
        {
            return Err(NodeIdError::BadCharacter { id, character });
        }
        Ok(NodeId(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NodeId {
    type Error = NodeIdError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        NodeId::new(value)
    }
}

impl From<NodeId> for String {
    fn from(value: NodeId) -> Self {
        value.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for NodeId {
    type Err = NodeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NodeId::new(s)
    }
}

/// The identity a replica writes into version vectors. It is drawn at random when a data
/// directory is created and never reused, so a node whose data is wiped comes back as a new
/// actor and can never reissue a dot it issued before (Riak's KV679 data-loss bug).
pub type Actor = u64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_validated() {
        assert!(NodeId::new("dev1").is_ok());
        assert_eq!(NodeId::new(""), Err(NodeIdError::Empty));
        assert!(matches!(
            NodeId::new("Dev1"),
            Err(NodeIdError::BadCharacter { character: 'D', .. })
        ));
        assert!(matches!(
            NodeId::new("a".repeat(65)),
            Err(NodeIdError::TooLong { length: 65 })
        ));
        let decoded: Result<NodeId, _> = rmp_serde::from_slice(&rmp_serde::to_vec("x y").unwrap());
        assert!(
            decoded.is_err(),
            "an invalid id on the wire must be refused"
        );
    }
}
