//! The `weir` binary as a user meets it: what every command says when the broker is unreachable,
//! and what `--help` says about every option.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// Every subcommand that talks to the broker, with the arguments it needs to get that far.
const BROKER_COMMANDS: &[&[&str]] = &[
    &["run"],
    &["topics", "apply"],
    &["topics", "apply", "--dry-run"],
    &["workflows", "apply"],
    &["workflows", "apply", "--dry-run"],
    &["workflows", "list"],
    &["produce"],
    &["dlq", "list"],
    &["dlq", "show", "0:0"],
    &["dlq", "redrive"],
    &["bench", "--scenario", "evaluate", "--duration", "1s"],
    &["demo", "--events", "10"],
];

/// Every leaf subcommand, for `--help`.
const ALL_COMMANDS: &[&[&str]] = &[
    &["run"],
    &["topics", "apply"],
    &["workflows", "apply"],
    &["workflows", "list"],
    &["produce"],
    &["dlq", "list"],
    &["dlq", "show"],
    &["dlq", "redrive"],
    &["bench"],
    &["demo"],
    &["status"],
];

/// A port nothing listens on: bound by the OS, then released.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `weir <args>` in an empty directory (so no `weir.yaml`: built-in defaults), with the given
/// brokers, its stdin empty.
fn weir(dir: &std::path::Path, brokers: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_weir"));
    command
        .args(args)
        .current_dir(dir)
        .env("WEIR_BROKERS", brokers)
        .env_remove("WEIR_CONFIG")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

#[test]
fn every_command_gives_the_same_single_message_when_the_broker_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let brokers = format!("127.0.0.1:{}", closed_port());
    // All at once: each waits for the broker's timeout, and they do not share anything.
    let children: Vec<_> = BROKER_COMMANDS
        .iter()
        .map(|args| (args, weir(dir.path(), &brokers, args).spawn().expect("starting the weir binary")))
        .collect();
    let mut messages = Vec::new();
    for (args, mut child) in children {
        // Only a guard against a hang, far above the check's bound: the command must end by itself.
        let guard = Instant::now() + Duration::from_secs(120);
        while child.try_wait().unwrap().is_none() && Instant::now() < guard {
            std::thread::sleep(Duration::from_millis(100));
        }
        if child.try_wait().unwrap().is_none() {
            let _ = child.kill();
            panic!("`weir {}` did not end against an unreachable broker", args.join(" "));
        }
        let out = child.wait_with_output().unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let command = format!("weir {}", args.join(" "));
        assert_eq!(out.status.code(), Some(1), "{command}: exit status\n{stdout}{stderr}");
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{command}: one error message\n{stderr}");
        let message = errors[0];
        assert!(message.contains(&brokers) && message.contains("did not answer"), "{command}: {message}");
        assert!(message.contains("WEIR_BROKERS"), "{command}: says what to do: {message}");
        assert!(
            stderr.matches("BrokerTransportFailure").count() <= 1,
            "{command}: librdkafka's repeated errors\n{stderr}"
        );
        assert!(!stderr.contains("librdkafka"), "{command}: librdkafka's own log lines\n{stderr}");
        assert!(!stderr.contains("ERROR"), "{command}: error log lines beside the message\n{stderr}");
        // The cause in parentheses is librdkafka's word for it; the rest is the same everywhere.
        messages.push(message.split(" (").next().unwrap_or(message).to_string());
    }
    messages.dedup();
    assert_eq!(messages.len(), 1, "every command says the same: {messages:#?}");
}

/// The options and arguments of `weir <args> --help`, each with what follows its name: clap
/// prints `  -c, --config <CONFIG>  Config file. …` and, for one without a doc comment, only
/// the name and `[default: …]`.
fn documented(help: &str) -> Vec<(String, String)> {
    let mut items = Vec::new();
    let mut section = "";
    for line in help.lines().filter(|l| !l.trim().is_empty()) {
        if !line.starts_with(' ') {
            section = line.trim_end_matches(':');
            continue;
        }
        if !matches!(section, "Options" | "Arguments") {
            continue;
        }
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        // An item starts at the items' indentation; deeper lines continue its description.
        if indent <= 6 && (trimmed.starts_with('-') || trimmed.starts_with('[') || trimmed.starts_with('<')) {
            let (name, rest) = trimmed.split_once("  ").unwrap_or((trimmed, ""));
            items.push((name.to_string(), rest.to_string()));
        } else if let Some((_, rest)) = items.last_mut() {
            rest.push(' ');
            rest.push_str(trimmed);
        }
    }
    items
}

#[test]
fn every_option_of_every_command_has_a_description() {
    for args in ALL_COMMANDS {
        let out = Command::new(env!("CARGO_BIN_EXE_weir")).args(*args).arg("--help").output().unwrap();
        assert!(out.status.success(), "weir {} --help", args.join(" "));
        let help = String::from_utf8(out.stdout).unwrap();
        let items = documented(&help);
        assert!(items.iter().any(|(name, _)| name.contains("--help")), "parsed the help of {args:?}:\n{help}");
        for (name, rest) in items {
            // What is left once the default and possible values are taken out is the description.
            let rest = rest.trim();
            let description = if rest.starts_with('[') { "" } else { rest.split(" [").next().unwrap_or("") };
            assert!(!description.is_empty(), "weir {} --help: {name} has no description:\n{help}", args.join(" "));
        }
    }
}
