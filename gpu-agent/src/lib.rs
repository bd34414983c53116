//! Kiln's GPU agent.
