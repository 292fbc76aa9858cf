//! The stages a room worker runs for each decoded event, in order.
//!
//! A message goes through: the bridges' relay hook → which messages agents look at (not
//! our own users' unless agents may talk to each other, not edits, not notices) →
//! [`commands`](super::commands) → [`facts`](super::facts) → routing (pure) → recording
//! (room history, loop guard) → agents (queue a job for each routed agent, or the pairing
//! code). Memberships (join on invite; each member's time in the room), history
//! visibility changes (what newcomers may read, see [`crate::agents::audience`]) and
//! encrypted messages (say we cannot read them) have a stage each.

use ruma::events::room::member::MembershipState;
use ruma::{OwnedRoomId, RoomId};

use super::commands::{self, Command};
use super::decode::{Encrypted, HistoryVisibilityChange, Membership, Message, Reaction};
use super::facts::Facts;
use super::limits::Which;
use super::{Answers, Inbox, ManagementRequest, Processed, answer, held};
use crate::agents::{Delivery, Job, Quote, Submitted, Trigger, Turn, notices};
use crate::bridges::Relayable;
use crate::config::{AgentId, ChannelId};
use crate::router::{Admission, MessageFacts, RouteDecision, Strategy};
use crate::store::{HistoryEntry, PAIRING_TTL};

impl Inbox {
    /// A message, through every stage; returns the answers the event waits for.
    pub(super) async fn on_message(&self, message: &Message<'_>) -> Processed {
        self.relay(message).await;
        if !self.is_for_agents(message) {
            return Processed::default();
        }
        let command = commands::parse(message.text());
        let own = self.config.is_own_agent_or_bot(&message.sender);
        let mut gathered = None;
        if !own
            && message.text().trim_start().starts_with('!')
            && let Some(management) = self.management.get()
        {
            let facts = self.gather_facts(message).await;
            let bot = self.config.sender_user_id();
            let management_room = facts.room.joined.contains(&bot);
            let reply_as = if management_room {
                bot
            } else {
                facts
                    .room
                    .joined
                    .iter()
                    .find(|user| self.config.is_own_agent_or_bot(user))
                    .cloned()
                    .unwrap_or(bot)
            };
            let request = ManagementRequest {
                room_id: message.room_id.to_owned(),
                event_id: message.event_id.to_owned(),
                sender: message.sender.clone(),
                body: message.text().to_owned(),
                management_room,
                reply_as,
            };
            if management.handle(&request).await {
                return Processed::default();
            }
            gathered = Some(facts);
        }
        if command == Some(Command::Stop) && !own {
            self.stop_room(message);
            return Processed::default();
        }
        let facts = match gathered {
            Some(facts) => facts,
            None => self.gather_facts(message).await,
        };
        let decision = self.decide(message.room_id, &facts, facts.message(message));
        let decision = self.portal_agent(message, &facts, decision);
        metrics::counter!("agentbus_routing_decisions_total", "strategy" => decision.strategy.as_str())
            .increment(1);
        let line = self.record(message, &facts, &decision).await;
        Processed {
            answers: self.answer(message, &facts, decision, command).await,
            line,
        }
    }

    /// `!stop`: every team task and agent answer running in the room stops.
    fn stop_room(&self, message: &Message<'_>) {
        let tasks = self.collab.stop_room(message.room_id, &message.sender);
        let runs = self.runtime.cancel_room(message.room_id);
        tracing::info!(room_id = %message.room_id, sender = %message.sender, tasks, runs, "!stop");
    }

    /// A 🛑 or ❌ reaction from a person on a task's request or status stops the task.
    pub(super) fn on_reaction(&self, room_id: &RoomId, reaction: &Reaction) {
        if !commands::is_stop_reaction(&reaction.key)
            || self.config.is_own_agent_or_bot(&reaction.sender)
        {
            return;
        }
        if self
            .collab
            .stop_event(room_id, &reaction.target, &reaction.sender)
        {
            tracing::info!(room_id = %room_id, sender = %reaction.sender, target = %reaction.target, "stop reaction: task cancelled");
        }
    }

    /// The bridges' seam: a message in a portal room is relayed out to its platform (our
    /// agents' answers included, so it runs before anything filters them). It returns once
    /// the relay is recorded, so the event leaves the journal only after that.
    async fn relay(&self, message: &Message<'_>) {
        let Some(bridges) = self.bridges.get() else {
            return;
        };
        let (text, edit_of) = match &message.edit {
            Some(edit) => (
                edit.new_body.as_deref().unwrap_or(message.text()),
                edit.target.as_deref(),
            ),
            None => (message.text(), None),
        };
        bridges
            .relay(Relayable {
                room_id: message.room_id,
                event_id: message.event_id,
                sender: &message.sender,
                text,
                edit_of,
                streaming: message.streaming,
                notice: message.is_notice(),
            })
            .await;
    }

    /// In a portal of an account bound to an agent (`bridges.<platform>.accounts.<id>.agent`),
    /// a bridged person's message that names nobody goes to that agent: the account is the
    /// conversation's binding, and the platform has authenticated the sender already (a
    /// signature, a bot token), so neither a mention nor admission applies. Where the
    /// platform's people talk among themselves too (Telegram groups), only a message the
    /// bridge marked addressed, with the agent in `m.mentions`, goes to it. A message that
    /// addresses another agent routes as usual.
    fn portal_agent(
        &self,
        message: &Message<'_>,
        facts: &Facts,
        decision: RouteDecision,
    ) -> RouteDecision {
        if !decision.targets.is_empty() || !self.config.is_puppet(&message.sender) {
            return decision;
        }
        let Some(agent) = self.bridges.get().and_then(|b| {
            let none = std::collections::BTreeSet::new();
            let mentions = message.mentions.as_ref().map_or(&none, |m| &m.user_ids);
            b.portal_agent(message.room_id, mentions)
        }) else {
            return decision;
        };
        if !facts
            .room
            .joined
            .contains(&self.config.user_id(agent.as_str()))
        {
            return decision;
        }
        RouteDecision {
            reason: format!("the portal's account is bound to {agent}"),
            targets: vec![agent],
            strategy: Strategy::AutoReply,
            pairing_agent: None,
        }
    }

    /// Whether agents look at `message` at all: our own users' messages only when agents
    /// may talk to each other; edits are not new questions, and by convention bots never
    /// answer notices.
    fn is_for_agents(&self, message: &Message<'_>) -> bool {
        if self.config.is_own_agent_or_bot(&message.sender)
            && !self.config.routing.agent_to_agent.enabled
        {
            return false;
        }
        // A team's own posts for a task (hand-offs, status) are the task's, not requests.
        message.edit.is_none() && !message.is_notice() && !message.in_task
    }

    /// Routes a message under the current loop-guard state.
    pub(super) fn decide(
        &self,
        room_id: &RoomId,
        facts: &Facts,
        message: MessageFacts<'_>,
    ) -> RouteDecision {
        let guard = self.guard.lock().expect("loop guard lock");
        let context = facts.context();
        self.router
            .route(&facts.route_input(room_id, message, &context, &guard))
    }

    /// Logs the decision, adds a person's message to the room history (our agents'
    /// answers are recorded by the runtime as they are sent) and counts an agent's
    /// message to other agents in the loop guard. In a room none of our agents is in,
    /// nobody reads the line before the event is finished: it is returned, to be written
    /// with the finish.
    async fn record(
        &self,
        message: &Message<'_>,
        facts: &Facts,
        decision: &RouteDecision,
    ) -> Option<(OwnedRoomId, HistoryEntry)> {
        let mut deferred = None;
        let (room_id, sender, event_id) = (message.room_id, &message.sender, message.event_id);
        if decision.targets.is_empty() {
            tracing::debug!(
                room_id = %room_id, sender = %sender, event_id = %event_id,
                reason = %decision.reason, "routed to nobody"
            );
        } else {
            tracing::info!(
                room_id = %room_id, sender = %sender, event_id = %event_id,
                targets = ?decision.targets, strategy = ?decision.strategy, reason = %decision.reason, "routed"
            );
        }
        if !self.config.is_own_agent_or_bot(sender) {
            let entry = HistoryEntry {
                event_id: event_id.to_owned(),
                sender: sender.clone(),
                body: message.text().to_owned(),
                ts: message.ts,
                thread_root: message.thread_root.clone(),
                routed_to: decision.targets.clone(),
            };
            if facts.agents_here {
                self.append_history(room_id, &entry).await;
            } else {
                deferred = Some((room_id.to_owned(), entry));
            }
        }
        if let Some(from) = self.router.agent_of(sender) {
            let a2a = &self.config.routing.agent_to_agent;
            let mut guard = self.guard.lock().expect("loop guard lock");
            for target in &decision.targets {
                if guard.record(
                    &from.id,
                    target,
                    message.ts,
                    a2a.pair_limit,
                    a2a.pair_window,
                    a2a.cooldown,
                ) {
                    tracing::warn!(room_id = %room_id, from = %from.id, to = %target, "loop guard: agent pair cooled down");
                }
            }
        }
        deferred
    }

    /// Adds a line to the room's history; a store error is logged, not fatal.
    pub(super) async fn append_history(&self, room_id: &RoomId, entry: &HistoryEntry) {
        if let Err(e) = self.store.history.append_history(room_id, entry).await {
            tracing::warn!(room_id = %room_id, error = %e, "could not record message in history");
        }
    }

    /// The agents stage: the pairing code for an unknown DM sender, else a job for each
    /// routed agent — the command's, or answering the message — or the agent's "busy"
    /// notice when its session queue is full.
    async fn answer(
        &self,
        message: &Message<'_>,
        facts: &Facts,
        decision: RouteDecision,
        command: Option<Command>,
    ) -> Answers {
        if decision.targets.is_empty() && decision.strategy != Strategy::Pairing {
            return Vec::new();
        }
        let turn = self.turn(message, facts);
        if decision.strategy == Strategy::Pairing {
            if let Some(agent) = &decision.pairing_agent {
                return held(self.send_pairing_code(agent, &turn.trigger()).await);
            }
            return Vec::new();
        }
        if command.is_none()
            && !self.config.is_own_agent_or_bot(&message.sender)
            && let Err(limited) = self.limits.take(
                &message.sender,
                message.room_id,
                decision.targets.len(),
                std::time::Instant::now(),
            )
        {
            tracing::warn!(
                room_id = %turn.room_id, sender = %turn.sender, event_id = %turn.event_id,
                limit = ?limited.which, retry_after = ?limited.retry_after, "rate limited; not answered"
            );
            if !limited.first {
                return Vec::new();
            }
            let (answers, per) = limited.rate;
            let text = match limited.which {
                Which::Sender => notices::sender_limited(answers, per, limited.retry_after),
                Which::Room => notices::room_limited(answers, per, limited.retry_after),
            };
            let agent = &decision.targets[0];
            return held(
                self.runtime
                    .notice(agent, &turn.trigger(), "limited", &text)
                    .await,
            );
        }
        let mut answers = Vec::new();
        for team in decision
            .targets
            .iter()
            .filter(|id| self.config.team(id).is_some())
        {
            if command.is_some() {
                continue;
            }
            tracing::info!(team = %team, room_id = %turn.room_id, event_id = %turn.event_id, "task for the team");
            answers.push(self.collab.start(
                team,
                turn.clone(),
                decision.strategy == Strategy::Broadcast,
            ));
        }
        for agent in decision
            .targets
            .iter()
            .filter_map(|id| self.config.agents.iter().find(|a| a.id == *id))
        {
            let job = match command {
                Some(Command::Reset) => Job::reset(&agent.id, turn.clone()),
                // Our own agents' `!stop` is only words.
                Some(Command::Stop) | None => Job::reply(&agent.id, turn.clone()),
            };
            match self.runtime.submit(job) {
                // Nothing here cancels a run; the handle is not kept.
                Submitted::Queued { outcome, handle: _ } => {
                    tracing::info!(agent = %agent.id, room_id = %turn.room_id, event_id = %turn.event_id, "queued for the agent");
                    answers.push(answer(outcome));
                }
                Submitted::Busy => {
                    tracing::warn!(agent = %agent.id, room_id = %turn.room_id, event_id = %turn.event_id, "session queue full; message not queued");
                    let said = self
                        .runtime
                        .notice(&agent.id, &turn.trigger(), "busy", &notices::busy(agent))
                        .await;
                    answers.extend(held(said));
                }
                Submitted::Refused => {}
            }
        }
        answers
    }

    /// The message as the agents' job carries it: its text without a reply fallback, and
    /// what it replies to from the replied-to event itself.
    fn turn(&self, message: &Message<'_>, facts: &Facts) -> Turn {
        let reply_to = match (&facts.reply_to_sender, &facts.reply_to_text) {
            (Some(sender), Some(text)) => Some(Quote {
                sender: sender.clone(),
                sender_name: self.display_name(message.room_id, sender),
                text: text.clone(),
                ts: facts.reply_to_ts,
            }),
            _ => None,
        };
        Turn {
            room_id: message.room_id.to_owned(),
            event_id: message.event_id.to_owned(),
            sender: message.sender.clone(),
            sender_name: self.display_name(message.room_id, &message.sender),
            body: message.text().to_owned(),
            image: message.image.clone(),
            reply_to,
            thread_root: message.thread_root.clone(),
            hops: message.hops + 1,
            ts: message.ts,
            group: facts
                .room
                .joined
                .iter()
                .filter(|u| !self.config.is_own_agent_or_bot(u))
                .count()
                > 1,
        }
    }

    /// Tells an unknown DM sender their pairing code, and nothing else.
    async fn send_pairing_code(&self, agent_id: &AgentId, trigger: &Trigger<'_>) -> Delivery {
        let now = crate::unix_ms();
        let request = match self
            .store
            .pairing
            .pairing_request(
                &ChannelId::MATRIX,
                trigger.sender.as_str(),
                now,
                PAIRING_TTL,
            )
            .await
        {
            Ok((request, created)) => {
                if created {
                    tracing::info!(sender = %trigger.sender, code = %request.code, "pairing requested; approve with `agentbus pairing approve {}`", request.code);
                }
                request
            }
            Err(e) => {
                tracing::error!(sender = %trigger.sender, error = %e, "could not issue a pairing code");
                return Delivery::Undeliverable;
            }
        };
        let text = notices::pairing_code(&request.code, PAIRING_TTL);
        self.runtime
            .notice(agent_id, trigger, "pairing", &text)
            .await
    }

    /// A membership change: the room's cached members are stale, the member's time in the
    /// room (what they may read of its history) starts or ends; an agent invited joins.
    pub(super) async fn on_member(&self, room_id: &RoomId, member: &Membership) {
        self.forget_members(room_id);
        let Some(target) = &member.target else {
            return;
        };
        let audiences = self.runtime.audiences();
        if *target == self.config.sender_user_id() {
            return self.on_bot_member(room_id, member).await;
        }
        // Agents and teams join on invite alike.
        let Some(agent) = self.router.agent_of(target) else {
            if let Some(membership) = &member.membership {
                audiences.record_member(room_id, target, membership, member.ts);
            }
            return;
        };
        if member.membership == Some(MembershipState::Join) {
            // What happened while none of our agents was here never arrived: ask again.
            audiences.forget(room_id);
        }
        if matches!(
            member.membership,
            Some(MembershipState::Leave | MembershipState::Ban)
        ) {
            // Left, kicked or banned: the next post there has to join again.
            self.matrix.intent(target).forget_joined(room_id);
            return;
        }
        if member.membership != Some(MembershipState::Invite) {
            return;
        }
        // A team bringing its members in: ours to accept.
        if self.config.is_own_user(&member.sender) {
            if let Err(e) = self.matrix.intent(target).ensure_joined(room_id).await {
                tracing::warn!(agent = %agent.id, room_id = %room_id, error = %e, "could not join on our team's invite");
            }
            return;
        }
        // Invites are rare: the inviter's pairing is always looked up.
        let paired = self.sender_paired(&member.sender).await;
        if let Err(reason) = self.admit_invite(room_id, member, paired) {
            return self
                .decline(&agent.id, target, room_id, member, &reason)
                .await;
        }
        match self.matrix.intent(target).join_room(room_id).await {
            Ok(()) => {
                tracing::info!(agent = %agent.id, room_id = %room_id, inviter = %member.sender, "joined on invite")
            }
            Err(e) => {
                tracing::error!(agent = %agent.id, room_id = %room_id, error = %e, "could not join on invite")
            }
        }
    }

    /// The appservice's bot joins a room on an admin's invite (it becomes a management
    /// room) and declines anyone else's.
    async fn on_bot_member(&self, room_id: &RoomId, member: &Membership) {
        let bot = self.config.sender_user_id();
        match member.membership {
            Some(MembershipState::Invite) => {}
            Some(MembershipState::Leave | MembershipState::Ban) => {
                self.matrix.intent(&bot).forget_joined(room_id);
                return;
            }
            _ => return,
        }
        let intent = self.matrix.intent(&bot);
        let admin = self
            .management
            .get()
            .is_some_and(|m| m.may_manage(&member.sender));
        if admin {
            match intent.join_room(room_id).await {
                Ok(()) => {
                    tracing::info!(room_id = %room_id, inviter = %member.sender, "the bot joined a management room")
                }
                Err(e) => {
                    tracing::error!(room_id = %room_id, error = %e, "the bot could not join on an admin's invite")
                }
            }
        } else {
            tracing::info!(room_id = %room_id, inviter = %member.sender, "the bot declined an invite from a non-admin");
            if let Err(e) = intent
                .leave_room(
                    room_id,
                    "only the admins in admin.users may invite agentbus's bot",
                )
                .await
            {
                tracing::warn!(room_id = %room_id, error = %e, "could not decline the bot's invite");
            }
        }
    }

    /// Whether an invite from `member.sender` (`paired`: approved by pairing) is
    /// admitted, then whether it is within the sender's room cap; `Err` says why not.
    fn admit_invite(
        &self,
        room_id: &RoomId,
        member: &Membership,
        paired: bool,
    ) -> Result<(), String> {
        let admission = self.router.admit_invite(
            &ChannelId::MATRIX,
            &member.sender,
            paired,
            room_id,
            &self.aliases_of(room_id),
            member.is_direct,
        );
        if let Admission::Refuse { reason } = admission {
            return Err(reason);
        }
        if let Some(cap) = self.router.room_cap(&ChannelId::MATRIX, &member.sender) {
            let mut pulled = self.pulled.lock().expect("pulled-rooms lock");
            let rooms = pulled.entry(member.sender.clone()).or_default();
            if !rooms.contains(room_id) && rooms.len() >= cap {
                return Err(format!(
                    "{} has already brought agents into {cap} rooms (channels.matrix.max_rooms_per_sender)",
                    member.sender
                ));
            }
            rooms.insert(room_id.to_owned());
        }
        Ok(())
    }

    /// Declines an invite the admission policy refused, telling the inviter why in the
    /// membership's reason.
    async fn decline(
        &self,
        agent: &AgentId,
        target: &ruma::UserId,
        room_id: &RoomId,
        member: &Membership,
        reason: &str,
    ) {
        tracing::warn!(agent = %agent, room_id = %room_id, inviter = %member.sender, reason = %reason, "declined an invite");
        if let Err(e) = self
            .matrix
            .intent(target)
            .leave_room(room_id, &notices::invite_declined(reason))
            .await
        {
            tracing::error!(agent = %agent, room_id = %room_id, error = %e, "could not decline the invite");
        }
    }

    /// The room's history visibility changed: lines from now on are read under it.
    pub(super) fn on_history_visibility(&self, room_id: &RoomId, change: &HistoryVisibilityChange) {
        tracing::info!(room_id = %room_id, sender = %change.sender, visibility = %change.visibility, "history visibility changed");
        self.runtime
            .audiences()
            .record_visibility(room_id, change.visibility.clone(), change.ts);
    }

    /// An encrypted message cannot be read; the room's first agent says so rather than
    /// staying silent.
    pub(super) async fn on_encrypted(
        &self,
        room_id: &RoomId,
        event_id: &ruma::EventId,
        encrypted: &Encrypted,
    ) -> Delivery {
        if self.config.is_own_user(&encrypted.sender) {
            return Delivery::Delivered;
        }
        let room = self.room_facts(room_id).await;
        let Some(agent) = self
            .router
            .candidates()
            .iter()
            .find(|c| room.joined.contains(&c.user_id))
        else {
            return Delivery::Delivered;
        };
        let trigger = Trigger {
            room_id,
            event_id,
            sender: &encrypted.sender,
            body: "",
            thread_root: None,
            hops: 1,
        };
        self.runtime
            .notice(&agent.id, &trigger, "encrypted", notices::encrypted())
            .await
    }
}
