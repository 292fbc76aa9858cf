//! How bridged things are named on Matrix: puppets' localparts and the portals' `m.bridge`
//! state. Pure, so the mapping is tested without a homeserver.

use ruma::UserId;
use serde_json::{Value, json};

use crate::config::ChannelId;

/// The localpart of the puppet of remote user `id` on `platform`: `<prefix><platform>_<id>`,
/// with `id` mapped into the characters a localpart may hold the way the spec suggests
/// ([mapping from other character sets](https://spec.matrix.org/v1.18/appendices/#mapping-from-other-character-sets)):
/// `a-z 0-9 . -` stay, `_` becomes `__`, an uppercase letter `_` and its lowercase, and any
/// other byte `=` and two hex digits. Distinct IDs give distinct localparts.
pub fn puppet_localpart(prefix: &str, platform: &ChannelId, id: &str) -> String {
    let mut out = format!("{prefix}{platform}_");
    for byte in id.bytes() {
        match byte {
            b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' => out.push(byte as char),
            b'_' => out.push_str("__"),
            b'A'..=b'Z' => {
                out.push('_');
                out.push(byte.to_ascii_lowercase() as char);
            }
            other => out.push_str(&format!("={other:02x}")),
        }
    }
    out
}

/// The `m.bridge` state event of a portal ([MSC2346](https://github.com/matrix-org/matrix-spec-proposals/pull/2346)):
/// the bot that bridges it, the protocol (the platform), the network (the account) and
/// the channel (the remote chat). Its state key names all three, so one room could carry
/// more than one bridge.
pub fn bridge_state(
    bridgebot: &UserId,
    platform: &ChannelId,
    account: &str,
    chat: &str,
    chat_name: &str,
) -> Value {
    json!({
        "type": "m.bridge",
        "state_key": format!("io.agentbus://{platform}/{account}/{chat}"),
        "content": {
            "bridgebot": bridgebot,
            "protocol": { "id": platform.as_str(), "displayname": platform.as_str() },
            "network": { "id": account, "displayname": account },
            "channel": { "id": chat, "displayname": chat_name },
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn puppets_are_named_in_the_reserved_namespace_and_stay_distinct() {
        let webhook = ChannelId::new("webhook");
        assert_eq!(
            puppet_localpart("_bridge_", &webhook, "u-42"),
            "_bridge_webhook_u-42"
        );
        assert_eq!(
            puppet_localpart("_bridge_", &webhook, "U42"),
            "_bridge_webhook__u42"
        );
        assert_eq!(
            puppet_localpart("_bridge_", &webhook, "a_b"),
            "_bridge_webhook_a__b"
        );
        assert_eq!(
            puppet_localpart("_bridge_", &webhook, "ä @x"),
            "_bridge_webhook_=c3=a4=20=40x"
        );
        let ids = ["U1", "_u1", "u1", "=55", "u 1", "u=201"];
        let names: std::collections::BTreeSet<String> = ids
            .iter()
            .map(|id| puppet_localpart("_bridge_", &webhook, id))
            .collect();
        assert_eq!(names.len(), ids.len(), "{names:?}");
        for name in &names {
            assert!(crate::config::is_valid_localpart(name), "{name}");
        }
    }

    #[test]
    fn the_bridge_state_names_bot_protocol_network_and_channel() {
        let bot = ruma::user_id!("@agentbus:example.org");
        let state = bridge_state(bot, &ChannelId::new("webhook"), "shop", "c-1", "Orders");
        assert_eq!(state["type"], "m.bridge");
        assert_eq!(state["state_key"], "io.agentbus://webhook/shop/c-1");
        assert_eq!(state["content"]["bridgebot"], "@agentbus:example.org");
        assert_eq!(state["content"]["protocol"]["id"], "webhook");
        assert_eq!(state["content"]["network"]["id"], "shop");
        assert_eq!(state["content"]["channel"]["id"], "c-1");
        assert_eq!(state["content"]["channel"]["displayname"], "Orders");
    }
}
