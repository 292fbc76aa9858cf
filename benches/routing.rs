//! One routing decision with 50 agents and 200 keyword rules, on realistic Chinese and
//! English messages (mentions, keywords, follow-ups, nothing at all), in a group room with
//! every agent and 20 lines of recent history.
//!
//! `cargo bench --bench routing`

use std::collections::BTreeSet;
use std::hint::black_box;

use agentbus::config::{AgentId, ChannelId, Config};
use agentbus::router::{ContextLine, LoopGuard, MessageFacts, RoomFacts, RouteInput, Router};
use agentbus::store::HistoryEntry;
use criterion::{Criterion, criterion_group, criterion_main};
use ruma::{EventId, OwnedUserId, RoomId, UserId};

const AGENTS: usize = 50;
const RULES: usize = 200;

/// Topic words the keyword rules are made of: Chinese and English, as teams write them.
const TOPICS: &[&str] = &[
    "代码",
    "编程",
    "调试",
    "部署",
    "测试",
    "数据库",
    "前端",
    "后端",
    "接口",
    "性能",
    "安全",
    "日志",
    "监控",
    "文档",
    "翻译",
    "设计",
    "产品",
    "需求",
    "预算",
    "合同",
    "招聘",
    "报销",
    "会议",
    "周报",
    "debug",
    "deploy",
    "review",
    "refactor",
    "benchmark",
    "migration",
    "kubernetes",
    "docker",
    "invoice",
    "budget",
    "roadmap",
    "hiring",
    "meeting",
    "report",
    "translate",
    "design",
    "sql",
    "latency",
    "outage",
    "incident",
    "security",
    "release",
    "rollback",
    "pipeline",
    "terraform",
    "analytics",
];

fn config() -> Config {
    let mut yaml = String::from(
        "homeserver: { url: \"http://127.0.0.1:8008\", server_name: example.org }\n\
         appservice: { id: agentbus }\nproviders: { echo: { api: echo } }\nagents:\n",
    );
    for i in 0..AGENTS {
        yaml.push_str(&format!(
            "  - {{ id: agent{i}, display_name: \"Agent {i}\", aliases: [\"助手{i}\"], provider: echo }}\n"
        ));
    }
    yaml.push_str("routing:\n  keyword:\n    rules:\n");
    for r in 0..RULES {
        let words: Vec<String> = (0..3)
            .map(|k| {
                // The first rules use the plain words, later ones variants of them.
                let variant = match r / TOPICS.len() {
                    0 => String::new(),
                    n => n.to_string(),
                };
                format!("\"{}{variant}\"", TOPICS[(r * 3 + k) % TOPICS.len()])
            })
            .collect();
        let priority = r % 3;
        yaml.push_str(&format!(
            "      - {{ keywords: [{}], agent: agent{}, priority: {priority} }}\n",
            words.join(", "),
            r % AGENTS
        ));
    }
    yaml.push_str("channels:\n  matrix:\n    groups: { \"*\": { require_mention: false } }\n");
    let config = Config::parse(&yaml).expect("bench config parses");
    config.validate().expect("bench config is valid");
    config
}

const MESSAGES: &[&str] = &[
    "@agent17 能帮我看看这个接口为什么超时吗？日志里全是 connection reset",
    "Can someone review the migration before we deploy3 it to production tonight?",
    "帮我写一下本周的周报1，重点是性能优化和数据库迁移的进度",
    "thanks, that fixed it!",
    "我们下午三点开会讨论一下预算，大家有空吗",
    "The latency on the checkout service doubled after the last release — any idea why?",
    "@all 请大家在周五之前提交报销单",
    "ok 收到",
];

fn bench_routing(c: &mut Criterion) {
    let config = config();
    let router = Router::new(&config);
    let room_id = RoomId::parse("!project:example.org").unwrap();
    let alice: OwnedUserId = UserId::parse("@alice:example.org").unwrap();
    let mut joined: BTreeSet<OwnedUserId> = (0..AGENTS)
        .map(|i| config.user_id(&format!("agent{i}")))
        .collect();
    joined.insert(alice.clone());
    joined.insert(UserId::parse("@bob:example.org").unwrap());
    let room = RoomFacts {
        joined,
        aliases: vec!["#project:example.org".into()],
    };
    let now = 1_700_000_000_000u64;
    let recent: Vec<HistoryEntry> = (0..20)
        .map(|i| HistoryEntry {
            event_id: EventId::parse(format!("$e{i}")).unwrap(),
            sender: if i % 2 == 0 {
                alice.clone()
            } else {
                config.user_id(&format!("agent{}", i % AGENTS))
            },
            body: MESSAGES[i % MESSAGES.len()].to_owned(),
            ts: now - (20 - i as u64) * 30_000,
            thread_root: None,
            routed_to: if i % 2 == 0 {
                vec![AgentId::parse(format!("agent{}", (i + 1) % AGENTS)).unwrap()]
            } else {
                Vec::new()
            },
        })
        .collect();
    let recent: Vec<&dyn ContextLine> = recent.iter().map(|e| e as &dyn ContextLine).collect();
    let guard = LoopGuard::default();
    let input = |body: &'static str| RouteInput {
        channel: &ChannelId::MATRIX,
        room_id: &room_id,
        room: &room,
        message: MessageFacts {
            sender: &alice,
            body,
            formatted_body: None,
            mentions: None,
            reply_to_sender: None,
            thread_root: None,
            hops: 0,
            ts: now,
        },
        recent: &recent,
        sender_paired: false,
        paired_member_joined: true,
        guard: &guard,
    };
    // Every message must actually exercise a strategy, or the numbers mean little.
    for body in MESSAGES {
        let decision = router.route(&input(body));
        eprintln!("{body:?} → {:?} {:?}", decision.strategy, decision.targets);
    }

    let mut group = c.benchmark_group("route");
    group.bench_function("50 agents, 200 rules, mixed zh/en message", |b| {
        let mut i = 0;
        b.iter(|| {
            let body = MESSAGES[i % MESSAGES.len()];
            i += 1;
            black_box(router.route(black_box(&input(body))))
        })
    });
    for (name, body) in [
        ("keyword (zh)", MESSAGES[2]),
        ("keyword (en)", MESSAGES[1]),
        ("mention (zh)", MESSAGES[0]),
        ("follow-up (context)", MESSAGES[3]),
        ("broadcast", MESSAGES[6]),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| black_box(router.route(black_box(&input(body)))))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_routing);
criterion_main!(benches);
