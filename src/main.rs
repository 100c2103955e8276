//! The `shadowmig` binary: parses the command line, sets up logging, and hands each
//! command to the library. Errors become one line on stderr and a non-zero exit code.

use clap::Parser;

use shadowmig::cli::{Cli, Command, LogFormat};

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SHADOWMIG_LOG")
        // The driver logs server NOTICEs at info; they are noise for an operator.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tokio_postgres=warn"));
    // Colours only on a terminal: a log file or a collector must get plain `key=value` text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
    let rt = match runtime("plan", false) {
        Ok(rt) => rt,
        Err(code) => return code,
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

fn runtime(name: &str, multi: bool) -> Result<tokio::runtime::Runtime, i32> {
    let mut b = if multi {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    b.enable_all().build().map_err(|e| {
        eprintln!("shadowmig {name}: cannot start the async runtime: {e}");
        2
    })
}

fn load_spec(name: &str, path: &std::path::Path) -> Result<(shadowmig::spec::Spec, String), i32> {
    let spec = shadowmig::spec::Spec::load(path).map_err(|e| {
        eprintln!("shadowmig {name}: {e}");
        2
    })?;
    let text = std::fs::read_to_string(path).unwrap_or_default();
    Ok((spec, text))
}

/// A watch that turns true on the first SIGINT or SIGTERM.
fn shutdown_signal() -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        let _ = tx.send(true);
    });
    rx
}

/// One line for an error: secrets scrubbed, newlines folded.
fn one_line(e: &dyn std::fmt::Display) -> String {
    shadowmig::spec::scrub_secrets(&e.to_string()).replace('\n', " ")
}

/// `shadowmig run SPEC`: preflight (the plan's checks), then set-up, backfill and streaming.
/// Exit 0 when stopped by a signal or caught up, 1 on a failed check or fatal error, 3 when
/// the migration paused for the operator (source DDL or TRUNCATE).
fn run_command(path: &std::path::Path, exit_when_caught_up: bool) -> i32 {
    let (spec, text) = match load_spec("run", path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let rt = match runtime("run", true) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async {
        match shadowmig::plan::plan(&spec).await {
            Ok(plan) if !plan.ok() => {
                eprint!("{}", plan.render());
                eprintln!(
                    "shadowmig run: preflight checks failed (see above); nothing was changed"
                );
                return 1;
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("shadowmig run: preflight: {}", one_line(&e));
                return 2;
            }
        }
        let shutdown = shutdown_signal();
        let opts = shadowmig::run::RunOptions {
            exit_when_caught_up,
            ..Default::default()
        };
        // The run goes on a worker thread rather than block_on's own: the stream's reader,
        // the event loop and the batch writer then wake each other on the same worker (a
        // task woken by a task runs next on its thread) instead of through a futex to the
        // main thread — per source commit under a steady load (BENCHMARKS.md, pgbench).
        let run =
            tokio::spawn(async move { shadowmig::run::run(&spec, &text, &opts, shutdown).await });
        let result = match run.await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("shadowmig run: internal error: {e}");
                return 1;
            }
        };
        match result {
            Ok(shadowmig::run::Outcome::Stopped) => {
                tracing::info!("stopped: the last batch is committed and confirmed");
                0
            }
            Ok(shadowmig::run::Outcome::CaughtUp) => 0,
            Ok(shadowmig::run::Outcome::Paused(msg)) => {
                eprintln!("shadowmig run: paused: {}", one_line(&msg));
                3
            }
            Err(e) => {
                eprintln!("shadowmig run: {}", one_line(&e));
                1
            }
        }
    })
}

/// `shadowmig status SPEC [--json]`.
fn status_command(path: &std::path::Path, json: bool) -> i32 {
    let (spec, _) = match load_spec("status", path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let rt = match runtime("status", false) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(shadowmig::status::gather(&spec)) {
        Ok(st) => {
            if json {
                match serde_json::to_string_pretty(&st) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("shadowmig status: {e}");
                        return 2;
                    }
                }
            } else {
                print!("{}", st.render());
            }
            0
        }
        Err(e) => {
            eprintln!("shadowmig status: {}", one_line(&e));
            2
        }
    }
}

/// `shadowmig abort SPEC`.
fn abort_command(path: &std::path::Path) -> i32 {
    let (spec, _) = match load_spec("abort", path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let rt = match runtime("abort", false) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(shadowmig::abort::abort(&spec)) {
        Ok(done) => {
            for line in done {
                println!("{line}");
            }
            0
        }
        Err(e) => {
            eprintln!(
                "shadowmig abort: {} (run abort again to finish)",
                one_line(&e)
            );
            1
        }
    }
}

type ControlFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<String, shadowmig::control::ControlError>>>,
>;

/// `pause`, `resume`, `throttle`: one line on stdout, exit 0; or one line on stderr, exit 1.
fn control_command(
    name: &str,
    path: &std::path::Path,
    f: impl FnOnce(shadowmig::spec::Spec) -> ControlFuture,
) -> i32 {
    let (spec, _) = match load_spec(name, path) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let rt = match runtime(name, false) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(f(spec)) {
        Ok(line) => {
            println!("{line}");
            0
        }
        Err(e) => {
            eprintln!("shadowmig {name}: {}", one_line(&e));
            1
        }
    }
}

/// `shadowmig tail`: exit 0 on Ctrl-C/SIGTERM, 1 with one line on stderr for bad input.
fn tail_command(opts: shadowmig::tail::TailOptions) -> i32 {
    let rt = match runtime("tail", false) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async {
        let shutdown = shutdown_signal();
        let stdout = std::io::stdout();
        let out = std::io::BufWriter::new(stdout.lock());
        match shadowmig::tail::run_tail(&opts, shutdown, out).await {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("shadowmig tail: {}", one_line(&e));
                1
            }
        }
    })
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
        Command::Run {
            spec,
            exit_when_caught_up,
        } => run_command(&spec, exit_when_caught_up),
        Command::Status { spec, json } => status_command(&spec, json),
        Command::Abort { spec } => abort_command(&spec),
        Command::Pause { spec } => control_command("pause", &spec, |s| {
            Box::pin(async move { shadowmig::control::set_paused(&s, true).await })
        }),
        Command::Resume { spec } => control_command("resume", &spec, |s| {
            Box::pin(async move { shadowmig::control::set_paused(&s, false).await })
        }),
        Command::Throttle {
            spec,
            chunk_rows,
            workers,
            max_lag_bytes,
            max_apply_lag_ms,
        } => {
            let t = shadowmig::control::Throttle {
                chunk_rows,
                workers,
                max_lag_bytes,
                max_apply_lag_ms,
            };
            control_command("throttle", &spec, move |s| {
                Box::pin(async move { shadowmig::control::throttle(&s, &t).await })
            })
        }
        Command::Tail {
            url,
            table,
            slot,
            from_now,
        } => tail_command(shadowmig::tail::TailOptions {
            url,
            table,
            slot,
            from_now,
        }),
        Command::Demo => not_built("demo"),
        other => not_built(other.name()),
    };
    std::process::exit(code);
}
