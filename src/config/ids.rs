//! Identifiers as types: [`AgentId`], an agent's Matrix localpart, and [`ChannelId`], the
//! platform a conversation comes from. Both are plain strings on the wire, in the config
//! and in the store; the types only keep them from being mixed up with other strings.
//!
//! Both deref to `str`, so an id goes wherever a `&str` is read (`config.user_id(&id)`,
//! `format!`) while a parameter typed `&AgentId` cannot be handed a room ID by mistake.
//! Maps keyed by them are looked up with a `&str` ([`Borrow<str>`]).

use std::borrow::{Borrow, Cow};
use std::convert::Infallible;
use std::fmt;
use std::ops::Deref;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Matrix user ID grammar for localparts we create: `[a-z0-9._=\-/]+`.
pub fn is_valid_localpart(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'=' | b'-' | b'/'))
}

/// An agent's id: the localpart of its Matrix user `@<id>:<server_name>`.
///
/// [`AgentId::parse`] checks the localpart grammar. Deserializing does not, so that a bad
/// `agents[].id` is reported by [`Config::validate`](super::Config::validate) under its key,
/// beside every other problem of the file; ids of a config that validated are all valid.
// Shared, not owned: one id is cloned into every decision, session key and job it touches.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentId(Arc<str>);

/// A string that is not a localpart agentbus may create.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a valid Matrix localpart (use a-z, 0-9, . _ = - /)")]
pub struct InvalidAgentId(String);

impl AgentId {
    /// `id` as an agent id, if it is a valid localpart (`a-z`, `0-9`, `. _ = - /`).
    pub fn parse(id: impl AsRef<str>) -> Result<Self, InvalidAgentId> {
        let id = id.as_ref();
        if is_valid_localpart(id) {
            Ok(Self(Arc::from(id)))
        } else {
            Err(InvalidAgentId(id.to_owned()))
        }
    }

    /// Whether the id is a valid localpart; the error names it (for ids that were read
    /// from a file rather than parsed).
    pub fn validate(&self) -> Result<(), InvalidAgentId> {
        Self::parse(self.as_str()).map(drop)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for AgentId {
    type Err = InvalidAgentId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<&str> for AgentId {
    type Error = InvalidAgentId;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl TryFrom<String> for AgentId {
    type Error = InvalidAgentId;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(s)
    }
}

impl<'de> Deserialize<'de> for AgentId {
    /// Any string; see the type's doc for why it is not checked here.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|s| Self(Arc::from(s)))
    }
}

/// The channel a conversation comes from: `matrix` itself, or a bridged platform
/// (`telegram`, `slack`, …). Any name is a channel id; the config checks the names it
/// uses against [`KNOWN_CHANNELS`](super::KNOWN_CHANNELS).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelId(Cow<'static, str>);

impl ChannelId {
    /// Matrix itself: rooms on the homeserver agentbus is an appservice of.
    pub const MATRIX: ChannelId = ChannelId(Cow::Borrowed("matrix"));

    pub fn new(name: impl Into<String>) -> Self {
        Self(Cow::Owned(name.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for ChannelId {
    fn from(name: &str) -> Self {
        Self::new(name)
    }
}

impl From<String> for ChannelId {
    fn from(name: String) -> Self {
        Self::new(name)
    }
}

impl FromStr for ChannelId {
    type Err = Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self::new(s))
    }
}

impl<'de> Deserialize<'de> for ChannelId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self::new)
    }
}

/// What both ids share: a string inside, seen as one everywhere.
macro_rules! string_id {
    ($id:ident) => {
        impl Deref for $id {
            type Target = str;

            fn deref(&self) -> &str {
                self.as_str()
            }
        }

        impl AsRef<str> for $id {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }

        impl Borrow<str> for $id {
            fn borrow(&self) -> &str {
                self.as_str()
            }
        }

        impl fmt::Display for $id {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self.as_str(), f)
            }
        }

        /// As the string: `"damon"`, so logs and messages read as they did with strings.
        impl fmt::Debug for $id {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(self.as_str(), f)
            }
        }

        impl Serialize for $id {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl PartialEq<str> for $id {
            fn eq(&self, other: &str) -> bool {
                self.as_str() == other
            }
        }

        impl PartialEq<&str> for $id {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }

        impl PartialEq<String> for $id {
            fn eq(&self, other: &String) -> bool {
                self.as_str() == other
            }
        }

        impl PartialEq<$id> for str {
            fn eq(&self, other: &$id) -> bool {
                self == other.as_str()
            }
        }

        impl PartialEq<$id> for &str {
            fn eq(&self, other: &$id) -> bool {
                *self == other.as_str()
            }
        }

        impl PartialEq<$id> for String {
            fn eq(&self, other: &$id) -> bool {
                self == other.as_str()
            }
        }
    };
}

string_id!(AgentId);
string_id!(ChannelId);

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap, HashSet};

    use super::*;

    #[test]
    fn an_agent_id_is_a_localpart_we_may_create() {
        for good in ["damon", "coder-2", "a.b_c=d/e", "0"] {
            assert_eq!(AgentId::parse(good).unwrap(), good);
        }
        for bad in ["", "Damon", "da mon", "@damon", "damon:hs", "戴蒙"] {
            assert!(AgentId::parse(bad).is_err(), "{bad:?} must not parse");
        }
        assert_eq!(
            AgentId::parse("Coder").unwrap_err().to_string(),
            r#""Coder" is not a valid Matrix localpart (use a-z, 0-9, . _ = - /)"#
        );
        assert_eq!("damon".parse::<AgentId>().unwrap(), "damon");
        assert!(AgentId::try_from("Damon".to_owned()).is_err());
    }

    #[test]
    fn a_deserialized_agent_id_is_checked_by_validate_not_by_serde() {
        let read: AgentId = serde_json::from_str(r#""Not Valid""#).unwrap();
        assert_eq!(read, "Not Valid");
        assert_eq!(
            read.validate().unwrap_err().to_string(),
            r#""Not Valid" is not a valid Matrix localpart (use a-z, 0-9, . _ = - /)"#
        );
        assert_eq!(AgentId::parse("damon").unwrap().validate(), Ok(()));
        let not_a_string = serde_json::from_str::<AgentId>("7").unwrap_err();
        assert!(not_a_string.to_string().contains("expected a string"));
    }

    #[test]
    fn ids_print_and_debug_as_their_strings() {
        let damon = AgentId::parse("damon").unwrap();
        assert_eq!(damon.to_string(), "damon");
        assert_eq!(format!("@{damon}"), "@damon");
        assert_eq!(format!("{damon:?}"), r#""damon""#);
        assert_eq!(format!("{:?}", vec![damon.clone()]), r#"["damon"]"#);
        assert_eq!(format!("{damon:>7}"), "  damon");
        assert_eq!(ChannelId::MATRIX.to_string(), "matrix");
        assert_eq!(
            format!("{:?}", ChannelId::from("telegram")),
            r#""telegram""#
        );
    }

    #[test]
    fn ids_are_plain_strings_in_json_and_yaml() {
        let damon = AgentId::parse("damon").unwrap();
        assert_eq!(serde_json::to_string(&damon).unwrap(), r#""damon""#);
        assert_eq!(
            serde_json::from_str::<AgentId>(r#""damon""#).unwrap(),
            damon
        );
        let targets: Vec<AgentId> = serde_yaml::from_str("[damon, coder]").unwrap();
        assert_eq!(targets, ["damon", "coder"]);
        assert_eq!(
            serde_json::to_string(&targets).unwrap(),
            r#"["damon","coder"]"#
        );

        assert_eq!(
            serde_json::to_string(&ChannelId::MATRIX).unwrap(),
            r#""matrix""#
        );
        let channels: BTreeMap<ChannelId, u8> =
            serde_yaml::from_str("{ telegram: 1, matrix: 2 }").unwrap();
        assert_eq!(
            serde_json::to_string(&channels).unwrap(),
            r#"{"matrix":2,"telegram":1}"#
        );
    }

    #[test]
    fn maps_keyed_by_ids_are_looked_up_with_str() {
        let damon = AgentId::parse("damon").unwrap();
        let by_agent: HashMap<AgentId, u8> = [(damon.clone(), 1)].into();
        assert_eq!(by_agent.get("damon"), Some(&1));
        assert_eq!(by_agent.get("coder"), None);
        let set: HashSet<AgentId> = [damon].into();
        assert!(set.contains("damon"));

        let policies: BTreeMap<ChannelId, u8> = [(ChannelId::MATRIX, 1)].into();
        assert_eq!(policies.get("matrix"), Some(&1));
        assert_eq!(policies.get(&ChannelId::new("matrix")), Some(&1));
    }

    #[test]
    fn ids_compare_with_strings_and_order_as_strings() {
        let damon = AgentId::parse("damon").unwrap();
        let owned = String::from("damon");
        assert_eq!(damon, "damon");
        assert_eq!("damon", damon);
        assert_eq!(damon, *"damon");
        assert_eq!(*"damon", damon);
        assert_eq!(damon, owned);
        assert_eq!(owned, damon);
        assert_ne!(damon, "coder");
        let mut ids: Vec<AgentId> = ["b", "ab", "a"].map(|s| AgentId::parse(s).unwrap()).into();
        ids.sort();
        assert_eq!(ids, ["a", "ab", "b"]);

        // A constant and a parsed name are the same channel.
        assert_eq!(ChannelId::MATRIX, ChannelId::new("matrix"));
        assert_eq!("matrix".parse::<ChannelId>().unwrap(), ChannelId::MATRIX);
        assert!(ChannelId::new("ab") < ChannelId::new("b"));
        assert_eq!(ChannelId::MATRIX.as_str(), "matrix");
        assert!(ChannelId::MATRIX.starts_with("mat"), "derefs to str");
    }
}
