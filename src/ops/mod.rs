//! Operations: the startup checks, the admin API and metrics, the scheduler of tasks and
//! heartbeats ([`schedule`]); monitors to come.

pub mod api;
pub mod checks;
pub mod schedule;
