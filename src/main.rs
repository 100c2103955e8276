//! The `shadowmig` binary: parses the command line, sets up logging, and hands each
//! command to the library. Errors become one line on stderr and a non-zero exit code.

use clap::Parser;

use shadowmig::cli::{Cli, Command, LogFormat};

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SHADOWMIG_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Subcommands of the contract that later issues build: say so on one line, exit 2.
fn not_built(name: &str) -> i32 {
    eprintln!("shadowmig {name}: not built yet");
    2
}

/// `shadowmig plan SPEC`: 0 when every check passes, 1 when one fails, 2 when the spec is
/// unreadable or a server unreachable. Errors never carry a password: spec and catalog
/// errors are built from redacted URLs.
fn plan_command(spec_path: &std::path::Path) -> i32 {
    let spec = match shadowmig::spec::Spec::load(spec_path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("shadowmig plan: {e}");
            return 2;
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("shadowmig plan: cannot start the async runtime: {e}");
            return 2;
        }
    };
    let result: anyhow::Result<shadowmig::plan::Plan> =
        rt.block_on(async { Ok(shadowmig::plan::plan(&spec).await?) });
    match result {
        Ok(plan) => {
            print!("{}", plan.render());
            if plan.ok() {
                0
            } else {
                1
            }
        }
        Err(e) => {
            eprintln!(
                "shadowmig plan: {}",
                shadowmig::spec::scrub_secrets(&format!("{e:#}")).replace('\n', " ")
            );
            2
        }
    }
}

/// `shadowmig verify SPEC [--json] [--keys-only]`: 0 equal, 1 differences, 2 error (unreadable
/// spec, unreachable server, missing table, keys apply never settled). Errors are one line on
/// stderr with every URL redacted.
fn verify_command(spec_path: &std::path::Path, json: bool, keys_only: bool) -> i32 {
    let spec = match shadowmig::spec::Spec::load(spec_path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("shadowmig verify: {e}");
            return 2;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("shadowmig verify: cannot start the async runtime: {e}");
            return 2;
        }
    };
    let opts = shadowmig::verify::VerifyOptions {
        keys_only,
        progress: true,
        ..Default::default()
    };
    match rt.block_on(shadowmig::verify::verify(&spec, &opts)) {
        Ok(shadowmig::verify::Outcome::Done(report)) => {
            if json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.render());
            }
            report.exit_code()
        }
        Ok(shadowmig::verify::Outcome::Interrupted { chunks }) => {
            eprintln!("shadowmig verify: stopped after {chunks} chunks; run again to continue");
            2
        }
        Err(e) => {
            eprintln!(
                "shadowmig verify: {}",
                shadowmig::spec::scrub_secrets(&e.to_string()).replace('\n', " ")
            );
            2
        }
    }
}

fn main() {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let code = match cli.command {
        Command::Plan { spec } => plan_command(&spec),
        Command::Verify {
            spec,
            json,
            keys_only,
        } => verify_command(&spec, json, keys_only),
        Command::Demo => not_built("demo"),
        other => not_built(other.name()),
    };
    std::process::exit(code);
}
