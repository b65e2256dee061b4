//! Helpers shared by the black-box integration tests in `tests/tests/`.

pub mod app;
pub mod env;
pub mod fleet;
pub mod load;
pub mod receiver;
pub mod relay;
pub mod servers;
pub mod user_tables;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A Standard Webhooks secret used only by tests; it signs nothing outside them.
pub const TEST_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The `sync-engine` binary under test: the engine's `main.rs` built by this package, so it
/// is always current (`CARGO_BIN_EXE_*` is set for integration tests only).
pub fn sync_engine_bin() -> PathBuf {
    let path = std::env::var_os("CARGO_BIN_EXE_sync-engine-under-test")
        .map(PathBuf::from)
        .or_else(|| {
            // Fallback for unit tests of this library: beside the test executable.
            let exe = std::env::current_exe().ok()?;
            Some(exe.parent()?.parent()?.join("sync-engine-under-test"))
        })
        .expect("the binary under test");
    assert!(path.exists(), "{} is missing", path.display());
    path
}

/// A `sync-engine` command with a clean environment apart from `PATH`, so that no
/// `SYNC_ENGINE__*` override or secret of the caller leaks in.
pub fn sync_engine() -> Command {
    let mut command = Command::new(sync_engine_bin());
    command.env_clear();
    if let Ok(path) = std::env::var("PATH") {
        command.env("PATH", path);
    }
    command.current_dir(repo_root());
    command
}

/// Both webhook secrets of the default configuration, set to [`TEST_SECRET`].
pub fn with_default_secrets(command: &mut Command) -> &mut Command {
    command
        .env("PAYLOAD_WEBHOOK_SECRET", TEST_SECRET)
        .env("BETTER_AUTH_WEBHOOK_SECRET", TEST_SECRET)
}

/// Standard output and error of a finished command, as text.
pub fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
