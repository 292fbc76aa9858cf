//! Table-driven tests of every strategy, precedence pair and policy, and property tests of
//! the router's invariants.

use std::collections::BTreeSet;

use proptest::prelude::{any, prop_assert, prop_assert_eq, prop_assert_ne, prop_assume, proptest};
use proptest::strategy::Strategy as Generator;
use ruma::events::Mentions;
use ruma::{EventId, OwnedEventId, OwnedRoomId, OwnedUserId, UserId};

use super::*;
use crate::config::Config;

fn agent(id: &str) -> AgentId {
    AgentId::parse(id).unwrap()
}

/// A line of history as the inbox would hand it over (the store's record, in its shape).
#[derive(Debug, Clone)]
struct HistoryEntry {
    event_id: OwnedEventId,
    sender: OwnedUserId,
    #[allow(dead_code)]
    body: String,
    ts: u64,
    thread_root: Option<OwnedEventId>,
    routed_to: Vec<AgentId>,
}

impl ContextLine for HistoryEntry {
    fn event_id(&self) -> &EventId {
        &self.event_id
    }
    fn sender(&self) -> &UserId {
        &self.sender
    }
    fn ts(&self) -> u64 {
        self.ts
    }
    fn thread_root(&self) -> Option<&EventId> {
        self.thread_root.as_deref()
    }
    fn routed_to(&self) -> &[AgentId] {
        &self.routed_to
    }
}

const CONFIG: &str = r#"
homeserver: { url: "http://127.0.0.1:8008", server_name: hs }
appservice: { id: agentbus }
providers: { echo: { api: echo } }
agents:
  - { id: damon, display_name: Damon, aliases: ["戴蒙"], mention_patterns: ["^hey damon\\b"], provider: echo }
  - { id: coder, display_name: Code Monkey, provider: echo }
  - { id: researcher, provider: echo }
routing:
  keyword:
    rules:
      - { keywords: ["代码", "编程", "debug"], agent: coder }
      - { keywords: ["搜索", "调研", "查资料"], agent: researcher }
  context: { lookback: 5, idle_timeout: 10m }
  # Alice (every case's default sender) is an admin and may broadcast.
  broadcast: { allow_from: ["@alice:hs"] }
"#;

/// Milliseconds; "now" in every case.
const NOW: u64 = 1_000_000_000;
const MINUTE: u64 = 60_000;

fn user(s: &str) -> OwnedUserId {
    UserId::parse(s).unwrap()
}

/// The test config with `extra` YAML merged in (mappings merge key by key).
fn router_with(extra: &str) -> Router {
    router_from(CONFIG, extra)
}

/// `base` with `extra` merged in.
fn router_from(base: &str, extra: &str) -> Router {
    fn merge(base: &mut serde_yaml::Value, extra: serde_yaml::Value) {
        match (base, extra) {
            (serde_yaml::Value::Mapping(base), serde_yaml::Value::Mapping(extra)) => {
                for (key, value) in extra {
                    match base.get_mut(&key) {
                        Some(slot) => merge(slot, value),
                        None => {
                            base.insert(key, value);
                        }
                    }
                }
            }
            (slot, value) => *slot = value,
        }
    }
    let mut yaml: serde_yaml::Value = serde_yaml::from_str(base).unwrap();
    if !extra.trim().is_empty() {
        merge(&mut yaml, serde_yaml::from_str(extra).unwrap());
    }
    let config = Config::parse(&serde_yaml::to_string(&yaml).unwrap()).unwrap();
    config.validate().unwrap();
    Router::new(&config)
}

/// One routing case: a message in a room, built up field by field.
#[derive(Debug, Clone)]
struct Case {
    sender: OwnedUserId,
    body: String,
    formatted: Option<String>,
    mentions: Option<Mentions>,
    reply_to: Option<OwnedUserId>,
    thread: Option<OwnedEventId>,
    hops: u32,
    joined: Vec<&'static str>,
    aliases: Vec<String>,
    recent: Vec<HistoryEntry>,
    paired: bool,
    /// A person other than the sender approved by pairing is joined (vouches for a group).
    paired_member: bool,
    room: OwnedRoomId,
}

impl Case {
    /// Alice in a group room with Bob and all three agents.
    fn group(body: &str) -> Self {
        Self {
            sender: user("@alice:hs"),
            body: body.into(),
            formatted: None,
            mentions: None,
            reply_to: None,
            thread: None,
            hops: 0,
            joined: vec![
                "@alice:hs",
                "@bob:hs",
                "@damon:hs",
                "@coder:hs",
                "@researcher:hs",
            ],
            aliases: Vec::new(),
            recent: Vec::new(),
            paired: false,
            // A team room: Bob was approved by pairing, so the room is vouched for.
            paired_member: true,
            room: ruma::owned_room_id!("!room:hs"),
        }
    }

    /// Alice alone with Damon.
    fn dm(body: &str) -> Self {
        Self {
            joined: vec!["@alice:hs", "@damon:hs"],
            ..Self::group(body)
        }
    }

    fn from(mut self, sender: &str) -> Self {
        self.sender = user(sender);
        self
    }

    fn mentions(mut self, users: &[&str]) -> Self {
        let mut m = Mentions::new();
        m.user_ids = users.iter().map(|u| user(u)).collect();
        self.mentions = Some(m);
        self
    }

    fn reply_to(mut self, sender: &str) -> Self {
        self.reply_to = Some(user(sender));
        self
    }

    fn in_thread(mut self, root: &str) -> Self {
        self.thread = Some(EventId::parse(root).unwrap());
        self
    }

    /// Adds a history line `minutes_ago` before now.
    fn said(
        mut self,
        sender: &str,
        minutes_ago: u64,
        routed_to: &[&str],
        thread: Option<&str>,
    ) -> Self {
        let n = self.recent.len();
        self.recent.push(HistoryEntry {
            event_id: EventId::parse(format!("$h{n}")).unwrap(),
            sender: user(sender),
            body: format!("line {n}"),
            ts: NOW - minutes_ago * MINUTE,
            thread_root: thread.map(|t| EventId::parse(t).unwrap()),
            routed_to: routed_to.iter().map(|s| agent(s)).collect(),
        });
        self
    }

    fn route(&self, router: &Router) -> RouteDecision {
        self.route_guarded(router, &LoopGuard::default())
    }

    fn route_guarded(&self, router: &Router, guard: &LoopGuard) -> RouteDecision {
        let room = RoomFacts {
            joined: self.joined.iter().map(|u| user(u)).collect::<BTreeSet<_>>(),
            aliases: self.aliases.clone(),
        };
        let recent: Vec<&dyn ContextLine> =
            self.recent.iter().map(|e| e as &dyn ContextLine).collect();
        let input = RouteInput {
            channel: &ChannelId::MATRIX,
            room_id: &self.room,
            room: &room,
            message: MessageFacts {
                sender: &self.sender,
                body: &self.body,
                formatted_body: self.formatted.as_deref(),
                mentions: self.mentions.as_ref(),
                reply_to_sender: self.reply_to.as_deref(),
                thread_root: self.thread.as_deref(),
                hops: self.hops,
                ts: NOW,
            },
            recent: &recent,
            sender_paired: self.paired,
            paired_member_joined: self.paired_member,
            guard,
        };
        router.route(&input)
    }
}

/// Open DMs and groups that answer without a mention, for strategy tests.
const OPEN: &str = r#"
channels:
  matrix:
    dm_policy: open
    groups: { "*": { require_mention: false } }
"#;

fn check(router: &Router, case: &Case, targets: &[&str], strategy: Strategy) -> RouteDecision {
    let decision = case.route(router);
    assert_eq!(
        (decision.targets.as_slice(), decision.strategy),
        (
            targets
                .iter()
                .map(|t| agent(t))
                .collect::<Vec<_>>()
                .as_slice(),
            strategy
        ),
        "body {:?}: {}",
        case.body,
        decision.reason
    );
    decision
}

#[test]
fn typed_mentions_in_a_group() {
    let router = router_with(OPEN);
    let cases: &[(&str, &[&str])] = &[
        ("@coder fix this", &["coder"]),
        ("hey @Coder, fix this", &["coder"]),
        ("@damon:hs what's up", &["damon"]),
        ("@戴蒙 你好", &["damon"]),
        ("你好@戴蒙帮我看看", &["damon"]),
        ("@code monkey please", &["coder"]),
        ("@damon and @coder both", &["damon", "coder"]),
        (
            "@coder and @damon: order is config order",
            &["damon", "coder"],
        ),
        ("hey damon, a pattern", &["damon"]),
    ];
    for (body, expected) in cases {
        check(&router, &Case::group(body), expected, Strategy::Mention);
    }
    let not_mentions = [
        "@damonx is not damon",
        "mail bob@damon.org",
        "> <@alice:hs> @damon said\n\nthanks all",
        "they said hey damon",
    ];
    for body in not_mentions {
        check(&router, &Case::group(body), &[], Strategy::Nobody);
    }
}

#[test]
fn m_mentions_and_pills() {
    let router = router_with(OPEN);
    let d = check(
        &router,
        &Case::group("Damon's idea: @damon look").mentions(&["@coder:hs"]),
        &["coder"],
        Strategy::Mention,
    );
    assert_eq!(d.reason, "mentioned @coder (m.mentions)");
    // An empty m.mentions (Element, typed name without a pill) falls back to the text.
    check(
        &router,
        &Case::group("@damon look").mentions(&[]),
        &["damon"],
        Strategy::Mention,
    );
    let mut pill = Case::group("Coder: look");
    pill.formatted = Some(r#"<a href="https://matrix.to/#/%40coder%3Ahs">Coder</a>: look"#.into());
    let d = check(&router, &pill, &["coder"], Strategy::Mention);
    assert_eq!(d.reason, "mentioned @coder (matrix.to pill)");
}

#[test]
fn a_reply_to_an_agent_goes_to_that_agent_even_though_m_mentions_names_it() {
    let router = router_with("");
    let case = Case::group("and what about tests?")
        .reply_to("@damon:hs")
        .mentions(&["@damon:hs"]);
    let d = check(&router, &case, &["damon"], Strategy::Reply);
    assert_eq!(d.reason, "reply to a message of @damon");
    // A reply to a person is not routed by the reply.
    check(
        &router,
        &Case::group("sure").reply_to("@bob:hs"),
        &[],
        Strategy::Nobody,
    );
}

#[test]
fn a_thread_continues_with_the_agent_that_answered_in_it() {
    let router = router_with("");
    let case = Case::group("more detail please")
        .in_thread("$root")
        .said("@alice:hs", 30, &["coder"], None)
        .said("@coder:hs", 29, &[], Some("$root"));
    check(&router, &case, &["coder"], Strategy::Thread);
    // A thread on an agent's own message continues with that agent.
    let mut case = Case::group("why?").in_thread("$h0");
    case = case.said("@researcher:hs", 90, &[], None);
    check(&router, &case, &["researcher"], Strategy::Thread);
    // A thread where no agent spoke does not route.
    let case = Case::group("hm")
        .in_thread("$root")
        .said("@bob:hs", 1, &[], Some("$root"));
    check(&router, &case, &[], Strategy::Nobody);
}

#[test]
fn broadcast_reaches_every_allowed_agent() {
    let router = router_with("");
    for body in ["@all what do you think?", "@ALL 大家好", "hello @room"] {
        let d = check(
            &router,
            &Case::group(body),
            &["damon", "coder", "researcher"],
            Strategy::Broadcast,
        );
        assert!(d.reason.starts_with("broadcast ("), "{}", d.reason);
    }
    let mut room_mention = Case::group("everyone");
    room_mention.mentions = Some(Mentions::with_room_mention());
    check(
        &router,
        &room_mention,
        &["damon", "coder", "researcher"],
        Strategy::Broadcast,
    );
    // Only agents allowed in the room.
    let listed = router_with(
        r#"
channels: { matrix: { groups: { "!room:hs": { agents: [damon, researcher] } } } }
"#,
    );
    check(
        &listed,
        &Case::group("@all hi"),
        &["damon", "researcher"],
        Strategy::Broadcast,
    );
    let custom = router_with(
        "  broadcast: { trigger: \"@everyone\" }\n"
            .replace("  broadcast", "routing:\n  broadcast")
            .as_str(),
    );
    check(
        &custom,
        &Case::group("@everyone hi"),
        &["damon", "coder", "researcher"],
        Strategy::Broadcast,
    );
    check(&custom, &Case::group("@all hi"), &[], Strategy::Nobody);
}

#[test]
fn only_admins_broadcast_unless_the_room_opts_in() {
    let router = router_with("channels: { matrix: { allow_from: ['@ops:hs'] } }\n");
    let everyone = &["damon", "coder", "researcher"];
    // Bob is neither in routing.broadcast.allow_from nor in allow_from: his @all is an
    // ordinary message, and so is a room mention.
    let bob = Case::group("@all what do you think?").from("@bob:hs");
    check(&router, &bob, &[], Strategy::Nobody);
    let mut room_mention = Case::group("everyone").from("@bob:hs");
    room_mention.mentions = Some(Mentions::with_room_mention());
    check(&router, &room_mention, &[], Strategy::Nobody);
    // Other strategies still apply to it.
    check(
        &router,
        &Case::group("@all @coder what now?").from("@bob:hs"),
        &["coder"],
        Strategy::Mention,
    );
    // The channel's allow_from admits broadcasting too.
    let ops = Case::group("@all hi")
        .from("@ops:hs")
        .with_member("@ops:hs");
    check(&router, &ops, everyone, Strategy::Broadcast);
    // A room that opts in lets anyone there broadcast.
    let open =
        router_with("channels: { matrix: { groups: { '!room:hs': { broadcast: true } } } }\n");
    check(&open, &bob, everyone, Strategy::Broadcast);
}

#[test]
fn keywords_route_in_groups_and_skip_agents_not_in_the_room() {
    let router = router_with("");
    let d = check(
        &router,
        &Case::group("帮我看看这段代码"),
        &["coder"],
        Strategy::Keyword,
    );
    assert_eq!(
        d.reason,
        "keyword \"代码\" → @coder (routing.keyword.rules[0])"
    );
    check(
        &router,
        &Case::group("please DEBUG this"),
        &["coder"],
        Strategy::Keyword,
    );
    check(
        &router,
        &Case::group("帮我查资料"),
        &["researcher"],
        Strategy::Keyword,
    );
    // In a DM with Damon the coder is not there: the DM's agent answers.
    let dm = Case::dm("帮我看看这段代码");
    check(&router_with(OPEN), &dm, &["damon"], Strategy::DirectMessage);
}

#[test]
fn a_follow_up_continues_with_the_last_agent() {
    let router = router_with(OPEN);
    let talked = Case::group("and then?")
        .said("@alice:hs", 3, &["coder"], None)
        .said("@coder:hs", 2, &[], None);
    let d = check(&router, &talked, &["coder"], Strategy::Context);
    assert!(d.reason.contains("last exchange 2m ago"), "{}", d.reason);
    // Idle for longer than idle_timeout (10m): starts afresh.
    let stale = Case::group("and then?")
        .said("@alice:hs", 13, &["coder"], None)
        .said("@coder:hs", 11, &[], None);
    check(&router, &stale, &[], Strategy::Nobody);
    // Further back than lookback (5) messages.
    let mut buried = Case::group("and then?").said("@alice:hs", 5, &["coder"], None);
    for _ in 0..5 {
        buried = buried.said("@bob:hs", 1, &[], None);
    }
    check(&router, &buried, &[], Strategy::Nobody);
    // Someone else's exchange is not Alice's conversation.
    let bobs = Case::group("and then?").said("@bob:hs", 1, &["coder"], None);
    check(&router, &bobs, &[], Strategy::Nobody);
    // The last exchange went to several agents: no single one to continue with.
    let all = Case::group("and then?").said("@alice:hs", 1, &["damon", "coder"], None);
    check(&router, &all, &[], Strategy::Nobody);
    // By default groups require a mention, so there is no implicit follow-up.
    check(&router_with(""), &talked, &[], Strategy::Nobody);
}

#[test]
fn each_strategy_can_be_switched_off() {
    let off = |key: &str| {
        router_with(&format!(
            "{OPEN}\nrouting:\n  {key}: {{ enabled: false }}\n"
        ))
    };
    let cases: Vec<(&str, Case)> = vec![
        ("mention", Case::group("@coder hi")),
        ("keyword", Case::group("debug this")),
        ("broadcast", Case::group("@all hi")),
        ("context", Case::group("go on").reply_to("@damon:hs")),
        (
            "context",
            Case::group("go on").said("@alice:hs", 1, &["coder"], None),
        ),
    ];
    for (key, case) in cases {
        assert_ne!(
            case.route(&router_with(OPEN)).strategy,
            Strategy::Nobody,
            "{key} on"
        );
        let d = case.route(&off(key));
        assert_eq!(d.strategy, Strategy::Nobody, "{key} off: {}", d.reason);
    }
}

/// Every pair of strategies: a message that triggers both is decided by the higher one.
#[test]
fn precedence_of_every_pair() {
    let router = router_with(
        r#"
channels:
  matrix:
    groups: { "*": { require_mention: false, auto_reply: true } }
bindings:
  - { agent: researcher, match: { peer: "!room:hs" } }
"#,
    );
    type Trigger = fn(Case) -> Case;
    let order: [(Strategy, Trigger); 7] = [
        (Strategy::Mention, |c| Case {
            body: format!("{} @researcher", c.body),
            ..c
        }),
        (Strategy::Reply, |c| c.reply_to("@damon:hs")),
        (Strategy::Thread, |c| {
            c.in_thread("$root")
                .said("@coder:hs", 1, &[], Some("$root"))
        }),
        (Strategy::Broadcast, |c| Case {
            body: format!("{} @all", c.body),
            ..c
        }),
        (Strategy::Keyword, |c| Case {
            body: format!("{} 代码", c.body),
            ..c
        }),
        // Context looks at the same thread or timeline as the message.
        (Strategy::Context, |c| {
            let thread = c.thread.as_ref().map(|t| t.to_string());
            c.said("@alice:hs", 1, &["damon"], thread.as_deref())
        }),
        (Strategy::AutoReply, |c| c),
    ];
    for (i, (high, add_high)) in order.iter().enumerate() {
        for (low, add_low) in &order[i + 1..] {
            // Apply the lower trigger first so history lines come out in either order.
            let case = add_high(add_low(Case::group("hello")));
            let d = case.route(&router);
            assert_eq!(d.strategy, *high, "{high:?} over {low:?}: {}", d.reason);
        }
    }
}

#[test]
fn dm_policies() {
    let policy = |p: &str| router_with(&format!("channels: {{ matrix: {{ {p} }} }}\n"));
    let alice = Case::dm("hello");

    let pairing = router_with("");
    let d = check(&pairing, &alice, &[], Strategy::Pairing);
    assert_eq!(d.pairing_agent.as_deref(), Some("damon"));
    let paired = Case {
        paired: true,
        ..alice.clone()
    };
    check(&pairing, &paired, &["damon"], Strategy::DirectMessage);
    let glob = policy("dm_policy: pairing, allow_from: ['@*:hs']");
    check(&glob, &alice, &["damon"], Strategy::DirectMessage);
    check(
        &glob,
        &alice
            .clone()
            .from("@eve:evil.org")
            .with_member("@eve:evil.org"),
        &[],
        Strategy::Pairing,
    );

    let allowlist = policy("dm_policy: allowlist, allow_from: ['@alice:hs', '@*:corp.example']");
    check(&allowlist, &alice, &["damon"], Strategy::DirectMessage);
    let bob = Case::dm("hi")
        .from("@bob:corp.example")
        .with_member("@bob:corp.example");
    check(&allowlist, &bob, &["damon"], Strategy::DirectMessage);
    let eve = Case::dm("hi").from("@eve:hs").with_member("@eve:hs");
    let d = check(&allowlist, &eve, &[], Strategy::Refused);
    assert_eq!(
        d.reason,
        "@eve:hs is not in channels.matrix.allow_from (dm_policy: allowlist)"
    );
    // Paired is not enough under allowlist.
    check(
        &allowlist,
        &Case {
            paired: true,
            ..eve
        },
        &[],
        Strategy::Refused,
    );

    check(
        &policy("dm_policy: open"),
        &alice,
        &["damon"],
        Strategy::DirectMessage,
    );
    check(
        &policy("dm_policy: disabled"),
        &paired,
        &[],
        Strategy::Refused,
    );
    // DM policy does not apply to group rooms.
    check(
        &policy("dm_policy: disabled"),
        &Case::group("@damon hi"),
        &["damon"],
        Strategy::Mention,
    );
}

impl Case {
    /// Replaces Alice with `member` in the room.
    fn with_member(mut self, member: &'static str) -> Self {
        self.joined.retain(|m| *m != "@alice:hs");
        self.joined.push(member);
        self
    }
}

/// The admission table (router/admission.rs): every room × sender × act has an outcome.
/// Alice is admitted by `allow_from`, Carol is paired, Eve is unknown.
#[test]
fn admission_table_for_invites_and_messages() {
    let router =
        router_with("channels: { matrix: { dm_policy: pairing, allow_from: ['@alice:hs'] } }\n");
    let standings = [
        ("@alice:hs", false),
        ("@carol:hs", true),
        ("@eve:hs", false),
    ];
    // (room, its members besides the sender and the agents, paired member present)
    let dm = |sender: &'static str, paired: bool| Case {
        paired,
        paired_member: false,
        joined: vec![sender, "@damon:hs"],
        ..Case::dm("hello").from(sender)
    };
    let team = |sender: &'static str, paired: bool| Case {
        paired,
        paired_member: false,
        joined: vec!["@alice:hs", sender, "@damon:hs", "@coder:hs"],
        ..Case::group("@damon hello").from(sender)
    };
    let eves_room = |sender: &'static str, paired: bool| Case {
        paired,
        paired_member: false,
        joined: vec!["@eve:hs", "@mallory:hs", sender, "@damon:hs", "@coder:hs"],
        ..Case::group("@damon hello").from(sender)
    };
    let admit = Admission::Admit;
    let pair = |a: &Admission| matches!(a, Admission::Pair { .. });
    let refuse = |a: &Admission| matches!(a, Admission::Refuse { .. });

    for (i, &(sender, paired)) in standings.iter().enumerate() {
        let unknown = i == 2;
        let who = user(sender);
        // Messages.
        let d = dm(sender, paired).route(&router);
        let want = if unknown {
            Strategy::Pairing
        } else {
            Strategy::DirectMessage
        };
        assert_eq!(d.strategy, want, "DM, {sender}: {}", d.reason);
        let d = team(sender, paired).route(&router);
        assert_eq!(
            d.strategy,
            Strategy::Mention,
            "team room, {sender}: {}",
            d.reason
        );
        assert_eq!(d.targets, [agent("damon")]);
        let d = eves_room(sender, paired).route(&router);
        let want = if unknown {
            Strategy::Pairing
        } else {
            Strategy::Mention
        };
        assert_eq!(d.strategy, want, "Eve's room, {sender}: {}", d.reason);
        if unknown {
            assert_eq!(d.pairing_agent.as_deref(), Some("damon"));
            assert!(d.targets.is_empty());
        }
        // Invites (a room's members are not visible before joining: both group rooms
        // look alike then).
        let room = ruma::owned_room_id!("!room:hs");
        let invite =
            |direct| router.admit_invite(&ChannelId::MATRIX, &who, paired, &room, &[], direct);
        if unknown {
            assert!(pair(&invite(true)), "DM invite from {sender}");
            assert!(refuse(&invite(false)), "group invite from {sender}");
        } else {
            assert_eq!(invite(true), admit, "DM invite from {sender}");
            assert_eq!(invite(false), admit, "group invite from {sender}");
        }
    }

    // A room with its own `groups:` entry vouches for itself, at an invite too.
    let listed =
        router_with("channels: { matrix: { dm_policy: pairing, groups: { '#team:hs': {} } } }\n");
    let eve = user("@eve:hs");
    let room = ruma::owned_room_id!("!room:hs");
    assert_eq!(
        listed.admit_invite(
            &ChannelId::MATRIX,
            &eve,
            false,
            &room,
            &["#team:hs".into()],
            false
        ),
        admit
    );
    let d = Case {
        aliases: vec!["#team:hs".into()],
        ..eves_room("@eve:hs", false)
    }
    .route(&listed);
    assert_eq!(d.strategy, Strategy::Mention, "{}", d.reason);
    // Under allowlist an unknown sender is refused, not paired, everywhere.
    let strict =
        router_with("channels: { matrix: { dm_policy: allowlist, allow_from: ['@alice:hs'] } }\n");
    assert!(refuse(&strict.admit_invite(
        &ChannelId::MATRIX,
        &eve,
        false,
        &room,
        &[],
        true
    )));
    assert_eq!(
        dm("@eve:hs", false).route(&strict).strategy,
        Strategy::Refused
    );
    assert_eq!(
        eves_room("@eve:hs", false).route(&strict).strategy,
        Strategy::Refused
    );
    // Our own agents and bot bring agents anywhere.
    assert_eq!(
        strict.admit_invite(
            &ChannelId::MATRIX,
            &user("@coder:hs"),
            false,
            &room,
            &[],
            false
        ),
        admit
    );
}

#[test]
fn group_policies_and_room_settings() {
    let policy = |p: &str| router_with(&format!("channels: {{ matrix: {{ {p} }} }}\n"));
    let hi = Case::group("@damon hi");
    check(
        &policy("group_policy: open"),
        &hi,
        &["damon"],
        Strategy::Mention,
    );
    check(
        &policy("group_policy: disabled"),
        &hi,
        &[],
        Strategy::Refused,
    );
    let allow = policy(
        "group_policy: allowlist, groups: { '#project:hs': {}, '*': { require_mention: false } }",
    );
    check(&allow, &hi, &[], Strategy::Refused);
    let aliased = Case {
        aliases: vec!["#project:hs".into()],
        ..hi.clone()
    };
    check(&allow, &aliased, &["damon"], Strategy::Mention);
    let senders = policy("group_allow_from: ['@bob:*']");
    check(&senders, &hi, &[], Strategy::Refused);
    check(
        &senders,
        &hi.clone().from("@bob:hs"),
        &["damon"],
        Strategy::Mention,
    );
    // Agents not listed for the room never answer there, even when mentioned.
    let listed = policy("groups: { '!room:hs': { agents: [coder] } }");
    check(&listed, &hi, &[], Strategy::Nobody);
    check(
        &listed,
        &Case::group("@all hi"),
        &["coder"],
        Strategy::Broadcast,
    );
    // auto_reply: the room's bound agent answers what nobody else was addressed by.
    let auto = router_with(
        r#"
channels: { matrix: { groups: { "!room:hs": { auto_reply: true } } } }
bindings:
  - { agent: coder, match: { channel: matrix } }
  - { agent: researcher, match: { peer: "!room:hs" } }
"#,
    );
    let d = check(
        &auto,
        &Case::group("anyone?"),
        &["researcher"],
        Strategy::AutoReply,
    );
    assert_eq!(
        d.reason,
        "auto_reply: @researcher owns this room by bindings[1] (peer)"
    );
    // A thread in the room inherits the room's binding.
    let threaded = Case::group("anyone?").in_thread("$t");
    let d = check(&auto, &threaded, &["researcher"], Strategy::AutoReply);
    assert!(
        d.reason.ends_with("bindings[1] (parent peer)"),
        "{}",
        d.reason
    );
    // Without bindings the default agent (first, or `default: true`) owns the room.
    let default = router_with("channels: { matrix: { groups: { '*': { auto_reply: true } } } }\n");
    check(
        &default,
        &Case::group("anyone?"),
        &["damon"],
        Strategy::AutoReply,
    );
    let marked = router_from(
        &CONFIG.replace("{ id: coder,", "{ id: coder, default: true,"),
        "channels: { matrix: { groups: { '*': { auto_reply: true } } } }\n",
    );
    check(
        &marked,
        &Case::group("anyone?"),
        &["coder"],
        Strategy::AutoReply,
    );
}

const A2A: &str = r#"
routing:
  agent_to_agent: { enabled: true, allow: [damon, coder], max_hops: 3 }
"#;

#[test]
fn agents_messages_route_only_when_agent_to_agent_allows() {
    let from_damon = Case::group("@coder please review").from("@damon:hs");
    check(&router_with(""), &from_damon, &[], Strategy::Nobody);
    let router = router_with(A2A);
    check(&router, &from_damon, &["coder"], Strategy::Mention);
    // The researcher is not in the allow list, neither as sender nor as target.
    check(
        &router,
        &Case::group("@coder hi").from("@researcher:hs"),
        &[],
        Strategy::Refused,
    );
    check(
        &router,
        &Case::group("@researcher hi").from("@damon:hs"),
        &[],
        Strategy::Nobody,
    );
    // Only explicit mentions: no keyword, broadcast, reply or follow-up from an agent.
    for body in ["debug this", "@all hi", "just talking"] {
        check(
            &router,
            &Case::group(body).from("@damon:hs").reply_to("@coder:hs"),
            &[],
            Strategy::Nobody,
        );
    }
    // An agent never answers itself.
    check(
        &router,
        &Case::group("@damon hi").from("@damon:hs"),
        &[],
        Strategy::Nobody,
    );
    // The appservice bot never routes.
    check(
        &router,
        &Case::group("@coder hi").from("@agentbus:hs"),
        &[],
        Strategy::Nobody,
    );
}

#[test]
fn the_hop_counter_caps_chains() {
    let router = router_with(A2A);
    let mut case = Case::group("@coder go on").from("@damon:hs");
    case.hops = 2;
    check(&router, &case, &["coder"], Strategy::Mention);
    case.hops = 3;
    let d = check(&router, &case, &[], Strategy::Refused);
    assert_eq!(
        d.reason,
        "loop guard: hop 3 reached routing.agent_to_agent.max_hops = 3"
    );
}

#[test]
fn a_chatty_pair_is_cooled_down() {
    let router = router_with(A2A);
    let mut guard = LoopGuard::default();
    for i in 0..21 {
        guard.record(
            &agent("damon"),
            &agent("coder"),
            NOW - 30_000 + i,
            20,
            Duration::from_secs(60),
            Duration::from_secs(60),
        );
    }
    let case = Case::group("@coder again").from("@damon:hs");
    let d = case.route_guarded(&router, &guard);
    assert_eq!(d.strategy, Strategy::Refused, "{}", d.reason);
    assert!(d.reason.contains("@coder cooling down"), "{}", d.reason);
    // People are not affected by the agents' cooldown.
    let d = Case::group("@coder hi").route_guarded(&router, &guard);
    assert_eq!(d.targets, ["coder"]);
}

#[test]
fn rooms_without_agents_and_two_agent_rooms() {
    let router = router_with(OPEN);
    let mut empty = Case::group("@damon hi");
    empty.joined = vec!["@alice:hs", "@bob:hs"];
    let d = check(&router, &empty, &[], Strategy::Nobody);
    assert_eq!(d.reason, "no agent is joined to this room");
    // Two agents and no person: not a DM.
    let mut agents_only = Case::group("hi");
    agents_only.joined = vec!["@damon:hs", "@coder:hs"];
    check(&router, &agents_only, &[], Strategy::Nobody);
}

#[test]
fn decisions_serialise_for_the_api() {
    let d = check(
        &router_with(""),
        &Case::group("@coder hi"),
        &["coder"],
        Strategy::Mention,
    );
    assert_eq!(
        serde_json::to_value(&d).unwrap(),
        serde_json::json!({ "targets": ["coder"], "strategy": "mention", "reason": "mentioned @coder (typed @name)" })
    );
}

// ---- properties ----

const WORDS: &[&str] = &[
    "@damon",
    "@coder",
    "@researcher",
    "@all",
    "@room",
    "代码",
    "debug",
    "调研",
    "hello",
    "你好",
    "@戴蒙",
    "bob@damon.org",
    "> quote",
    "\n",
];
const PEOPLE: &[&str] = &["@alice:hs", "@bob:hs"];
const AGENTS: &[&str] = &["@damon:hs", "@coder:hs", "@researcher:hs"];

fn arb_case() -> impl Generator<Value = (Case, usize)> {
    (
        proptest::collection::vec(proptest::sample::select(WORDS), 0..6),
        proptest::sample::select(vec![
            "@alice:hs",
            "@bob:hs",
            "@damon:hs",
            "@coder:hs",
            "@researcher:hs",
            "@agentbus:hs",
        ]),
        proptest::collection::vec(any::<bool>(), 5),
        proptest::option::of(proptest::sample::select(
            AGENTS.iter().chain(PEOPLE).copied().collect::<Vec<_>>(),
        )),
        any::<bool>(),
        proptest::collection::vec(
            (
                proptest::sample::select(vec!["@alice:hs", "@bob:hs", "@damon:hs", "@coder:hs"]),
                0u64..20,
                any::<bool>(),
            ),
            0..8,
        ),
        0u32..5,
        0usize..4,
    )
        .prop_map(
            |(words, sender, members, reply, threaded, lines, hops, config)| {
                let mut case = Case::group(&words.join(" ")).from(sender);
                case.joined = PEOPLE
                    .iter()
                    .chain(AGENTS)
                    .zip(&members)
                    .filter(|(_, on)| **on)
                    .map(|(m, _)| *m)
                    .collect();
                case.reply_to = reply.map(user);
                if threaded {
                    case = case.in_thread("$h0");
                }
                for (who, ago, routed) in lines {
                    let routed: &[&str] = if routed { &["coder"] } else { &[] };
                    case = case.said(who, ago, routed, None);
                }
                case.hops = hops;
                (case, config)
            },
        )
}

fn config_variants() -> Vec<Router> {
    vec![
        router_with(""),
        router_with(OPEN),
        router_with(&format!(
            "{A2A}channels: {{ matrix: {{ groups: {{ '*': {{ agents: [damon, coder], require_mention: false }} }} }} }}\n"
        )),
        router_with(&format!(
            "{A2A}channels: {{ matrix: {{ dm_policy: open, groups: {{ '!room:hs': {{ agents: [researcher], auto_reply: true }} }} }} }}\n"
        )),
    ]
}

/// Agents allowed in the case's room under config variant `v`.
fn allowed_in(case: &Case, v: usize) -> Vec<&'static str> {
    let listed: &[&str] = match v {
        2 => &["damon", "coder"],
        3 => &["researcher"],
        _ => &["damon", "coder", "researcher"],
    };
    let people = case.joined.iter().filter(|m| !AGENTS.contains(m)).count();
    let agents: Vec<&'static str> = AGENTS
        .iter()
        .filter(|a| case.joined.contains(a))
        .map(|a| &a[1..a.find(':').unwrap()])
        .collect();
    let is_dm = agents.len() == 1 && people == 1 && case.joined.contains(&case.sender.as_str());
    agents
        .into_iter()
        .filter(|a| is_dm || listed.contains(a))
        .collect()
}

proptest! {
    #[test]
    fn targets_are_always_allowed_in_the_room((case, v) in arb_case()) {
        let routers = config_variants();
        let decision = case.route(&routers[v]);
        let allowed = allowed_in(&case, v);
        for target in &decision.targets {
            prop_assert!(allowed.contains(&target.as_str()), "{target} not allowed in {:?}: {}", case.joined, decision.reason);
            prop_assert_ne!(format!("@{target}:hs"), case.sender.to_string());
        }
        if matches!(decision.strategy, Strategy::Refused | Strategy::Nobody | Strategy::Pairing) {
            prop_assert!(decision.targets.is_empty());
        }
    }

    #[test]
    fn without_agent_to_agent_our_own_users_never_route((case, v) in arb_case()) {
        let routers = config_variants();
        prop_assume!(v < 2);
        let own = AGENTS.contains(&case.sender.as_str()) || case.sender.as_str() == "@agentbus:hs";
        prop_assume!(own);
        let decision = case.route(&routers[v]);
        prop_assert!(decision.targets.is_empty(), "{}", decision.reason);
    }

    #[test]
    fn the_decision_is_deterministic((case, v) in arb_case()) {
        let routers = config_variants();
        let again = config_variants();
        prop_assert_eq!(case.route(&routers[v]), case.route(&again[v]));
        prop_assert_eq!(case.route(&routers[v]), case.clone().route(&routers[v]));
    }
}

#[test]
fn a_strategy_is_named_in_the_metrics_as_in_the_json() {
    use super::Strategy::*;
    for strategy in [
        Mention,
        Reply,
        Thread,
        Broadcast,
        Keyword,
        Context,
        DirectMessage,
        AutoReply,
        Team,
        Pairing,
        Refused,
        Nobody,
    ] {
        assert_eq!(
            serde_json::to_value(strategy).unwrap(),
            serde_json::Value::from(strategy.as_str())
        );
    }
}
