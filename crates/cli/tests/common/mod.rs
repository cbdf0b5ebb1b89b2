//! Running the `llmft` binary from the repository root.
#![allow(dead_code)]
use std::path::Path;
use std::process::Command;

/// The repository root.
pub fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// `llmft <args>` from the repository root, with no `LLMFT_MODEL__PATH`
/// from the environment: (exit code, stdout, stderr).
pub fn llmft(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_llmft"))
        .args(args)
        .current_dir(root())
        .env_remove("LLMFT_MODEL__PATH")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A fresh scratch folder under the system temp dir.
pub fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("llmft-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// How many ports [`port`] hands one test process (offsets `0..PORT_BLOCK`).
pub const PORT_BLOCK: u16 = 16;
/// Where the blocks start.
const PORTS_FROM: u16 = 20000;

/// Port `offset` of this test process's block, for the rendezvous stores
/// of the jobs it starts: the same block on every call.
///
/// The blocks lie below the kernel's ephemeral range, where the kernel puts
/// neither the local end of a connection nor a listener bound to port 0. A
/// store port inside that range can be taken by any connection made before
/// rank 0 listens (the rings and stores of the test running beside this
/// one), and is then held for a minute in TIME_WAIT, so rank 0's bind fails.
/// The block is picked by process id, skipping blocks with a port in use.
pub fn port(offset: u16) -> u16 {
    assert!(offset < PORT_BLOCK, "port offset {offset} of {PORT_BLOCK}");
    static BASE: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    *BASE.get_or_init(|| {
        let low = ephemeral_low();
        let slots = port_slots(low);
        let first = port_block(std::process::id(), low);
        (0..slots)
            .map(|k| PORTS_FROM + ((first - PORTS_FROM) / PORT_BLOCK + k) % slots * PORT_BLOCK)
            .find(|&b| {
                (b..b + PORT_BLOCK).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
            })
            .unwrap_or(first)
    }) + offset
}

/// How many blocks fit between [`PORTS_FROM`] and `ephemeral_low` (at least one).
fn port_slots(ephemeral_low: u16) -> u16 {
    (ephemeral_low.saturating_sub(PORTS_FROM) / PORT_BLOCK).max(1)
}

/// The first port of process `pid`'s block when the ephemeral range starts
/// at `ephemeral_low`.
pub fn port_block(pid: u32, ephemeral_low: u16) -> u16 {
    PORTS_FROM + (pid % u32::from(port_slots(ephemeral_low))) as u16 * PORT_BLOCK
}

/// The first port of the kernel's ephemeral range (Linux's default where it
/// cannot be read).
pub fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}
