//! A child process owned by a test: killed and reaped when dropped, however
//! the test ends, so a failing test leaves no worker or server behind.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A child process killed when the test ends.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// The child's process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Panics if the process has exited.
    ///
    /// # Panics
    /// When it has, naming `what` and the exit status.
    pub fn assert_running(&mut self, what: &str) {
        if let Some(status) = self.0.try_wait().expect("wait") {
            panic!("{what} exited on its own with {status}");
        }
    }

    /// SIGTERM, then waits (up to 30 s) for a clean exit.
    ///
    /// # Panics
    /// When `kill` fails, the exit is not clean, or it does not stop.
    pub fn terminate(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.0.try_wait().expect("wait") {
                assert!(status.success(), "worker exited with {status}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "worker did not stop after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
