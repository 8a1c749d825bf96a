//! What can go wrong, and the exit code and the one line each gives.

use std::error::Error as _;
use std::process::ExitCode;

use stem::{BackendError, BrokerError, StemError};

/// A failed command. Printed as one `error: ...` line on stderr with its
/// causes; [`CliError::exit_code`] says how the process ends.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CliError {
    /// The command was given something it cannot use (a task id that is
    /// not a UUID, a destructive command without `--yes` off a terminal).
    /// Exit 2, as clap's own usage errors.
    #[error("{0}")]
    Usage(String),

    /// The operation ran and did not succeed: something was not found, a
    /// task failed, a wait timed out. Exit 1.
    #[error("{0}")]
    Failed(String),

    /// The broker, the result backend or the configuration refused. Exit 1.
    #[error(transparent)]
    Stem(#[from] StemError),

    /// Reading the answer to a question, or writing the output. Exit 1.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

impl From<BrokerError> for CliError {
    fn from(e: BrokerError) -> Self {
        Self::Stem(e.into())
    }
}

impl From<BackendError> for CliError {
    fn from(e: BackendError) -> Self {
        Self::Stem(e.into())
    }
}

impl CliError {
    /// 2 for bad usage, 1 for everything else.
    pub(crate) fn exit_code(&self) -> ExitCode {
        match self {
            Self::Usage(_) => ExitCode::from(2),
            _ => ExitCode::from(1),
        }
    }

    /// Whether this is only stdout having gone away (`stem queues | head`):
    /// not worth a line.
    pub(crate) fn is_broken_pipe(&self) -> bool {
        matches!(self, Self::Io { source, .. } if source.kind() == std::io::ErrorKind::BrokenPipe)
    }

    /// The message and its causes on one line, each cause once: a cause
    /// whose text its parent already shows is not repeated.
    pub(crate) fn line(&self) -> String {
        let mut line = self.to_string();
        let mut cause = self.source();
        while let Some(c) = cause {
            let text = c.to_string();
            if !text.is_empty() && !line.contains(&text) {
                line.push_str(": ");
                line.push_str(&text);
            }
            cause = c.source();
        }
        // One line, whatever a cause's text holds.
        line.replace(['\n', '\r'], " ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_exits_2_and_everything_else_1() {
        assert_eq!(CliError::Usage("x".into()).exit_code(), ExitCode::from(2));
        assert_eq!(CliError::Failed("x".into()).exit_code(), ExitCode::from(1));
        let e: CliError = BrokerError::Invalid("nope".into()).into();
        assert_eq!(e.exit_code(), ExitCode::from(1));
    }

    #[test]
    fn the_line_has_each_cause_once_and_no_newline() {
        let e = CliError::Io {
            what: "reading the answer",
            source: std::io::Error::other("line one\nline two"),
        };
        assert_eq!(e.line(), "reading the answer: line one line two");
    }
}
