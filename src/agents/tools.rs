//! Placeholder until the tools module lands.

use ruma::RoomId;

use crate::config::ToolsConfig;
use crate::llm::{ToolCall, ToolSpec};
use crate::store::Store;

pub struct ToolContext<'a> {
    pub store: &'a dyn Store,
    pub room_id: &'a RoomId,
}

pub struct ToolOutcome {
    pub ok: bool,
    pub text: String,
}

#[derive(Default)]
pub struct Tools;

impl Tools {
    pub fn new() -> Self {
        Self
    }
    pub fn allowed(config: &ToolsConfig, name: &str) -> bool {
        let _ = (config, name);
        false
    }
    pub fn specs(&self, config: &ToolsConfig) -> Vec<ToolSpec> {
        let _ = config;
        Vec::new()
    }
    pub async fn call(
        &self,
        config: &ToolsConfig,
        ctx: &ToolContext<'_>,
        call: &ToolCall,
    ) -> ToolOutcome {
        let _ = (config, ctx);
        ToolOutcome {
            ok: false,
            text: format!("error: no tool {}", call.name),
        }
    }
}
