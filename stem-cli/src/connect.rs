//! Opening the broker and the result backend a command needs, through the
//! `stem` facade, and reaching their optional administration traits.

use std::sync::Arc;

use stem::{Broker, BrokerError, DeadLetters, QueueAdmin, ResultBackend};

use crate::error::CliError;

/// Where the deployment is: the global flags.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    pub(crate) broker_url: Option<String>,
    pub(crate) backend_url: Option<String>,
    pub(crate) namespace: String,
}

impl Target {
    /// `--broker-url`, else the embedded default every Stem process uses
    /// without `STEM_BROKER_URL` (the SQLite file of the two-terminal
    /// walkthrough).
    fn broker_url(&self) -> Result<String, CliError> {
        link_adapters();
        match &self.broker_url {
            Some(url) if !url.trim().is_empty() => Ok(url.clone()),
            _ => stem::url::embedded_default_url().ok_or_else(|| {
                CliError::Usage(String::from(
                    "no broker URL: pass --broker-url or set STEM_BROKER_URL",
                ))
            }),
        }
    }

    /// The broker only (queue and dead-letter commands open no backend).
    pub(crate) async fn broker(&self) -> Result<Arc<dyn Broker>, CliError> {
        link_adapters();
        Ok(stem::client::open_broker(&self.broker_url()?, &self.namespace).await?)
    }

    /// A client (broker and, when there is one, result backend), for the
    /// control plane, events and enqueue.
    pub(crate) async fn client(&self) -> Result<stem::Stem, CliError> {
        link_adapters();
        Ok(stem::connect_with(
            &self.broker_url()?,
            self.backend_url.as_deref(),
            &self.namespace,
        )
        .await?)
    }

    /// The result backend: `--backend-url`, else the broker's own store.
    pub(crate) async fn backend(&self) -> Result<Arc<dyn ResultBackend>, CliError> {
        link_adapters();
        let url = match self.backend_url.as_deref() {
            Some(u) => u.to_owned(),
            None => self.broker_url()?,
        };
        Ok(stem::client::open_backend(&url, &self.namespace).await?)
    }
}

/// The adapters register their URL schemes from their own crate; a binary
/// with no `#[stem::task]` must name them once so the linker keeps them.
fn link_adapters() {
    stem::__private::link_adapters();
}

/// The broker's queue administration, or why there is none.
pub(crate) fn queues(b: &dyn Broker) -> Result<&dyn QueueAdmin, CliError> {
    b.queues().ok_or_else(|| {
        BrokerError::Unsupported {
            adapter: "this broker",
            operation: "queue administration (stats, list, purge)",
            hint: "use an adapter that has it (memory, sqlite, redis, postgres)",
        }
        .into()
    })
}

/// The broker's dead-letter administration, or why there is none.
pub(crate) fn dead_letters(b: &dyn Broker) -> Result<&dyn DeadLetters, CliError> {
    b.dead_letters().ok_or_else(|| {
        BrokerError::Unsupported {
            adapter: "this broker",
            operation: "dead-letter administration",
            hint: "use an adapter that has it (memory, sqlite, redis, postgres)",
        }
        .into()
    })
}

/// Parses a task id; a bad one is bad usage (exit 2).
pub(crate) fn task_id(s: &str) -> Result<stem::TaskId, CliError> {
    s.parse()
        .map_err(|e: stem::EnvelopeError| CliError::Usage(e.to_string()))
}
