//! [`ClientId`]: who sent an update, as the server names it.
//!
//! A leaf module: admission, detectors, aggregators and audit records all
//! name clients with it, and none of them owns it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A client's identity, as the server names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClientId(pub String);

impl ClientId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for ClientId {
    fn from(s: &str) -> Self {
        ClientId(s.to_owned())
    }
}

impl From<String> for ClientId {
    fn from(s: String) -> Self {
        ClientId(s)
    }
}

impl From<u64> for ClientId {
    fn from(id: u64) -> Self {
        ClientId(id.to_string())
    }
}

impl From<usize> for ClientId {
    fn from(id: usize) -> Self {
        ClientId(id.to_string())
    }
}

impl From<u32> for ClientId {
    fn from(id: u32) -> Self {
        ClientId(id.to_string())
    }
}

impl PartialEq<str> for ClientId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for ClientId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}
